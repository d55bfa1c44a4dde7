"""Speech data for memlab: synthetic corpora (no download), fbank features, batching, and
manifests of real corpora prepared by `data_scripts/`."""

from .features import collate_asr, collate_speaker, fbank
from .manifest import ManifestDataset, read_manifest, write_manifest
from .synth import SpeakerCorpus, TokenCorpus, make_trials
from .syllables import SyllableCorpus, syllable_factors
from .voice import Voice, make_voice

__all__ = [
    "SpeakerCorpus",
    "TokenCorpus",
    "SyllableCorpus",
    "syllable_factors",
    "make_trials",
    "fbank",
    "collate_speaker",
    "collate_asr",
    "ManifestDataset",
    "read_manifest",
    "write_manifest",
    "Voice",
    "make_voice",
]
