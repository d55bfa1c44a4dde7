"""A large-vocabulary synthetic ASR corpus: every token is a syllable, onset x nucleus.

    SyllableCorpus(600, vocab_size=321, seconds=4.0)    # 320 syllables + the blank, ~4 s each

Why. ``TokenCorpus`` has at most 63 distinct sounds, so the transducer's B x T x (U+1) x V joiner
tensor stays small and the sample-wise loss has nothing to save. Real ASR vocabularies have
hundreds to thousands of subwords; this corpus has several hundred tokens that a small
Transducer still learns in minutes, because they are *compositional*: token t is one of
``len(ONSETS)`` consonant-like onsets followed by one of ``len(NUCLEI)`` vowel-like nuclei, so
an encoder that recognises 16 onsets and 20 nuclei recognises all 320 syllables (the joiner's
output layer only has to combine the two).

* onsets: none (vowel-initial), six fricative noise bands, five plosives (closure + burst at
  five centres), four voiced murmurs (nasal / approximant-like low formants gliding into the
  vowel);
* nuclei: ten steady vowels (Peterson & Barney formants) and ten diphthongs (the ten most
  distant vowel-to-vowel glides).

Token ``t`` (1-based, 0 is the blank) is ``syllable(t) = (onset, nucleus)`` with
``k = t - 1``, ``onset = k % 16``, ``nucleus = (17 * (k // 16) + k % 16) % 20``: a bijection
(17 and 20 are coprime) that makes even a small vocabulary mix onsets and nuclei. Utterances
last about ``seconds`` (3.5 syllables per second, +-20 %, times the speaker's rate), spoken by
a few voices, deterministic from (seed, index), 16 kHz, 80-dim fbank; nothing is downloaded.
Items: ``{"feats": (T, 80) float32, "tokens": (U,) int64, "speaker": int}`` as ``TokenCorpus``.
"""

from math import gcd

import numpy as np
import torch

from ._checks import check_float, check_int
from .synth import _FRAME_LENGTH, _FRAME_SHIFT, _SynthCorpus, _frames, _glides, _ms
from .voice import NOISE, SILENCE, VOICED, Segment, Session, make_voice, render

__all__ = ["SyllableCorpus", "ONSETS", "NUCLEI", "MAX_SYLLABLE_VOCAB", "SYLLABLES_PER_SECOND",
           "syllable", "syllable_factors"]

_SYLLABLE_CORPUS_SALT = 0x5B1A
SYLLABLES_PER_SECOND = 3.5

# (name, kind, design): kind "none" | "fricative" (centre Hz, octaves) | "plosive" (burst centre
# Hz) | "voiced" (F1, F2, F3 of the murmur)
ONSETS = (
    ("-", "none", None),
    ("s", "fricative", (4800.0, 0.30)), ("sh", "fricative", (2500.0, 0.35)),
    ("f", "fricative", (6800.0, 0.25)), ("h", "fricative", (1500.0, 0.40)),
    ("x", "fricative", (3600.0, 0.30)), ("th", "fricative", (5800.0, 0.30)),
    ("p", "plosive", 1000.0), ("k", "plosive", 1800.0), ("t", "plosive", 2800.0),
    ("ch", "plosive", 4000.0), ("ts", "plosive", 6000.0),
    ("m", "voiced", (250.0, 1000.0, 2200.0)), ("n", "voiced", (250.0, 1700.0, 2600.0)),
    ("l", "voiced", (350.0, 1100.0, 2700.0)), ("w", "voiced", (300.0, 700.0, 2200.0)),
)
_VOWEL_NAMES = ("i", "I", "e", "ae", "a", "o", "U", "u", "V", "r")
NUCLEI = tuple(("vowel", v) for v in range(10)) + tuple(("glide", p) for p in _glides()[:10])
MAX_SYLLABLE_VOCAB = 1 + len(ONSETS) * len(NUCLEI)       # 321: every syllable + the blank
assert gcd(len(ONSETS) + 1, len(NUCLEI)) == 1            # syllable() is a bijection


def syllable(token: int):
    """(onset index, nucleus index) of ``token`` (1 .. MAX_SYLLABLE_VOCAB - 1)."""
    token = check_int("token", token, minimum=1, maximum=MAX_SYLLABLE_VOCAB - 1)
    k = token - 1
    o, q = k % len(ONSETS), k // len(ONSETS)
    return o, ((len(ONSETS) + 1) * q + o) % len(NUCLEI)


def syllable_factors(vocab_size: int = MAX_SYLLABLE_VOCAB) -> torch.Tensor:
    """(vocab_size, 2) int64: (onset, nucleus) of every token, the blank (0) as the extra onset
    len(ONSETS) and nucleus len(NUCLEI): the sub-units of a factored output layer
    (memlab.models.Transducer's ``output_factors``)."""
    vocab_size = check_int("vocab_size", vocab_size, minimum=2, maximum=MAX_SYLLABLE_VOCAB)
    rows = [(len(ONSETS), len(NUCLEI))] + [syllable(t) for t in range(1, vocab_size)]
    return torch.tensor(rows, dtype=torch.int64)


def syllable_name(token: int) -> str:
    """A readable spelling, e.g. 'sa' or 'm(i-u)'."""
    o, n = syllable(token)
    kind, design = NUCLEI[n]
    vowel = _VOWEL_NAMES[design] if kind == "vowel" else \
        f"({_VOWEL_NAMES[design[0]]}-{_VOWEL_NAMES[design[1]]})"
    return ("" if ONSETS[o][1] == "none" else ONSETS[o][0]) + vowel


def _syllable_plan(voice, tokens, r):
    """Syllables separated by short pauses; returns (plan, [(start, end) samples per token])."""
    plan = [Segment(SILENCE, _ms(r, 50, 200))]
    spans, pos = [], plan[0].n
    for i, t in enumerate(tokens):
        o, n = syllable(t)
        kind, design = NUCLEI[n]
        start_f = voice.vowel(design if kind == "vowel" else design[0])
        end_f = start_f if kind == "vowel" else voice.vowel(design[1])
        start_f = start_f * np.exp(r.normal(0.0, 0.02, 3))
        level = r.normal(0.0, 1.5)
        segs = []
        _name, okind, odesign = ONSETS[o]
        if okind == "fricative":
            centre, width = odesign
            band = (min(centre * voice.vtl ** 0.5 * np.exp(r.normal(0.0, 0.03)), 7600.0), width)
            segs.append(Segment(NOISE, _ms(r, 60, 100, voice.rate), band=band, level_db=level - 6))
        elif okind == "plosive":
            segs.append(Segment(SILENCE, _ms(r, 30, 50, voice.rate)))
            segs.append(Segment(NOISE, _ms(r, 12, 20), band=(odesign * np.exp(r.normal(0, .03)),
                                                             1.0), level_db=level - 3))
        elif okind == "voiced":
            murmur = np.asarray(odesign) * voice.vtl
            segs.append(Segment(VOICED, _ms(r, 50, 80, voice.rate), murmur, start_f,
                                level_db=level - 8))
        lo, hi = (120, 190) if kind == "vowel" else (160, 230)
        segs.append(Segment(VOICED, _ms(r, lo, hi, voice.rate), start_f, end_f, level_db=level))
        n_syl = sum(s.n for s in segs)
        plan.extend(segs)
        spans.append((pos, pos + n_syl))
        pos += n_syl
        gap = Segment(SILENCE, _ms(r, 15, 60) if i < len(tokens) - 1 else _ms(r, 50, 200))
        plan.append(gap)
        pos += gap.n
    return plan, spans


class SyllableCorpus(_SynthCorpus):
    """num_utts utterances of about ``seconds`` each; tokens are syllables from
    1..vocab_size-1 (``syllable(t)``), utterance i spoken by speaker
    speaker_offset + i % num_speakers.

    Item: {"feats": (T, 80) float32, "tokens": (U,) int64, "speaker": int}; ``alignment(i)``
    gives the fbank frames of each syllable (onset included).
    """

    _salt = _SYLLABLE_CORPUS_SALT

    def __init__(self, num_utts, vocab_size=MAX_SYLLABLE_VOCAB, seconds=4.0, seed=0,
                 speaker_offset=0, num_speakers=8, cache=True):
        self.num_utts = check_int("num_utts", num_utts, minimum=1)
        self.vocab_size = check_int("vocab_size", vocab_size, minimum=2,
                                    maximum=MAX_SYLLABLE_VOCAB)
        self.seconds = check_float("seconds", seconds, minimum=0.3, maximum=60.0)
        self.speaker_offset = check_int("speaker_offset", speaker_offset, minimum=0)
        self.num_speakers = check_int("num_speakers", num_speakers, minimum=1)
        super().__init__(seed, cache)
        self.voices = [make_voice(self.speaker_offset + k) for k in range(self.num_speakers)]

    def __len__(self):
        return self.num_utts

    def _plan(self, index):
        voice = self.voices[index % self.num_speakers]
        r = self._rng(index)
        mean = self.seconds * SYLLABLES_PER_SECOND / voice.rate
        u = max(1, int(round(mean * r.uniform(0.8, 1.2))))
        tokens = r.integers(1, self.vocab_size, size=u)              # (U,) never 0, the blank
        session = Session(snr_db=r.uniform(15.0, 35.0), channel_db=r.uniform(0.5, 3.0),
                          gain=r.uniform(0.05, 0.9))
        plan, spans = _syllable_plan(voice, tokens.tolist(), r)
        return voice, r, tokens, session, plan, spans

    def _make(self, index):
        voice, r, tokens, session, plan, spans = self._plan(index)
        wave = render(voice, plan, session, r)
        frames = _frames(len(wave))
        spans = np.array(spans)                                      # (U, 2) samples
        align = np.clip(-((_FRAME_LENGTH // 2 - spans) // _FRAME_SHIFT), 0, frames)
        item = {"tokens": torch.from_numpy(tokens.astype(np.int64)), "speaker": voice.speaker}
        return wave, item, torch.from_numpy(align.astype(np.int64))

    def alignment(self, index):
        """(U, 2) int64: [start, end) fbank frames of each syllable of item `index`."""
        return self._get(index)[1].clone()
