"""Manifests of real corpora and a Dataset that reads them.

A manifest is a JSON-lines file, one utterance per line:

    {"path": "/data/vox1/wav/id10001/1zcIwhmdeo4/00001.wav", "duration": 8.12, "speaker": "id10001"}
    {"path": "LibriSpeech/dev-clean/84/121123/84-121123-0000.flac", "duration": 1.96,
     "speaker": "84", "text": "GO DO YOU HEAR"}
    {"path": "...", "duration": 1.0, "tokens": [3, 7, 7, 2]}

"path" and "duration" (seconds) are required; "speaker", "text" and "tokens" are optional.
A relative path is relative to the manifest's folder. `data_scripts/prepare_*.py` write these
from a local copy of VoxCeleb1, LibriSpeech or Speech Commands.

`ManifestDataset` returns the same item dicts as the synthetic corpora: "feats" (T, 80) always,
"label"/"speaker" (int index into `dataset.speakers`) when the entry has a speaker, and "tokens"
(int64; given, or the characters of "text" mapped through `vocab`) when it has a transcript.
"""

import json
import math
import numbers
import os

import torch
from torch.utils.data import Dataset

from ._checks import check_float, check_int
from .audio import MAX_RATE, MIN_RATE, load_audio
from .features import SAMPLE_RATE, fbank

# Character vocabulary for transcripts: index 0 is the blank, then space, apostrophe, a..z.
DEFAULT_VOCAB = ("<blank>", " ", "'") + tuple("abcdefghijklmnopqrstuvwxyz")
TASKS = (None, "speaker", "asr")


def _check_entry(entry, where):
    if not isinstance(entry, dict):
        raise TypeError(f"{where}: a manifest entry must be a JSON object, got {type(entry).__name__}")
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        raise ValueError(f"{where}: 'path' must be a non-empty string, got {entry.get('path')!r}")
    d = entry.get("duration")
    if isinstance(d, bool) or not isinstance(d, numbers.Real) or not (d >= 0 and math.isfinite(d)):
        raise ValueError(f"{where}: 'duration' must be a number of seconds >= 0 and finite, got {d!r}")
    if "text" in entry and not isinstance(entry["text"], str):
        raise ValueError(f"{where}: 'text' must be a string, got {entry['text']!r}")
    if "tokens" in entry:
        t = entry["tokens"]
        if not isinstance(t, list) or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x < 2**63
                                              for x in t):
            raise ValueError(f"{where}: 'tokens' must be a list of ints >= 1 (0 is the blank), got {t!r:.80}")
    if "speaker" in entry and (isinstance(entry["speaker"], bool) or not isinstance(entry["speaker"], (str, int))):
        raise ValueError(f"{where}: 'speaker' must be a string or an int, got {entry['speaker']!r}")
    return entry


def text_lines(path):
    """(line number, line without its newline) of a UTF-8 text file (a leading byte-order mark is
    dropped); a line that is not UTF-8 is a ValueError naming ``path:lineno``."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); expected UTF-8 text") from None
            yield lineno, line.rstrip("\r\n")


def write_manifest(path, entries):
    """Write entries (dicts with "path", "duration", optional "speaker", "text", "tokens") as
    JSON lines; returns the number written."""
    entries = list(entries)
    for i, e in enumerate(entries):
        _check_entry(e, f"entries[{i}]")
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    return len(entries)


def read_manifest(path):
    """List of entry dicts from a JSON-lines manifest; relative paths are made absolute against
    the manifest's folder."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest does not exist: {path}")
    root = os.path.dirname(os.path.abspath(path))
    entries = []
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')}); "
                             f"expected one JSON object per line") from None
        _check_entry(entry, f"{path}:{lineno}")
        entry["path"] = os.path.join(root, entry["path"])  # no-op for absolute paths
        entries.append(entry)
    return entries


class ManifestDataset(Dataset):
    """Items from a manifest (a path, or a list of entry dicts).

    task: None (whatever each entry has), "speaker" (every entry needs a speaker) or "asr"
        (every entry needs "tokens" or "text").
    speakers: the label order; default: sorted speaker names of this manifest. Pass the training
        set's `speakers` to a test set to share labels.
    vocab: characters for "text" (index = token id, index 0 is the blank). Lower-cased.
    max_seconds: crop each utterance to its first max_seconds (None: whole).
    """

    def __init__(self, manifest, task=None, speakers=None, vocab=DEFAULT_VOCAB, max_seconds=None,
                 sample_rate=SAMPLE_RATE):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if isinstance(manifest, (str, os.PathLike)):
            self.entries = read_manifest(manifest)
        elif isinstance(manifest, (list, tuple)):
            self.entries = [_check_entry(dict(e), f"manifest[{i}]") for i, e in enumerate(manifest)]
        else:
            raise TypeError(f"manifest must be a path or a list of entries, got {type(manifest).__name__}")
        if not self.entries:
            raise ValueError("manifest must hold at least one entry, got 0")
        self.task = task
        self.sample_rate = check_int("sample_rate", sample_rate, minimum=MIN_RATE, maximum=MAX_RATE)
        self.max_seconds = None if max_seconds is None else check_float("max_seconds", max_seconds, minimum=0.025)
        self.vocab = tuple(vocab)
        if len(self.vocab) < 2:
            raise ValueError(f"vocab must hold the blank and at least one symbol, got {self.vocab!r}")
        self._char_to_id = {c: i for i, c in enumerate(self.vocab) if i > 0}

        for i, e in enumerate(self.entries):
            if task == "speaker" and "speaker" not in e:
                raise ValueError(f"task='speaker' needs a 'speaker' in every entry; entry {i} ({e['path']}) has none")
            if task == "asr" and "tokens" not in e and "text" not in e:
                raise ValueError(f"task='asr' needs 'tokens' or 'text' in every entry; entry {i} ({e['path']}) has neither")
        names = sorted({str(e["speaker"]) for e in self.entries if "speaker" in e})
        self.speakers = list(names) if speakers is None else [str(s) for s in speakers]
        self._speaker_to_label = {s: k for k, s in enumerate(self.speakers)}
        missing = set(names) - set(self._speaker_to_label)
        if missing:
            raise ValueError(f"speakers is missing {len(missing)} speaker(s) of the manifest, e.g. {sorted(missing)[:3]}")

    def __len__(self):
        return len(self.entries)

    @property
    def labels(self):
        """Speaker label of every entry (-1 where there is none); list of int."""
        return [self._speaker_to_label.get(str(e["speaker"]), -1) if "speaker" in e else -1 for e in self.entries]

    def encode(self, text):
        """Token ids (int64 tensor) of a transcript's characters."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__} {text!r:.80}")
        ids = []
        for ch in text.lower():
            if ch not in self._char_to_id:
                raise ValueError(f"text has a character {ch!r} that is not in vocab; text={text!r:.80}")
            ids.append(self._char_to_id[ch])
        return torch.tensor(ids, dtype=torch.int64)  # (U,)

    def __getitem__(self, index):
        e = self.entries[index]
        wave = load_audio(e["path"], self.sample_rate)  # (N,)
        if self.max_seconds is not None:
            wave = wave[: int(self.max_seconds * self.sample_rate)]
        try:
            item = {"feats": fbank(wave, self.sample_rate)}  # (T, 80)
        except ValueError as err:  # e.g. shorter than one frame: say which file
            raise ValueError(f"{e['path']}: {err}") from None
        if "speaker" in e:
            item["label"] = item["speaker"] = self._speaker_to_label[str(e["speaker"])]
        if "tokens" in e:
            item["tokens"] = torch.tensor(e["tokens"], dtype=torch.int64)  # (U,)
        elif "text" in e:
            try:
                item["tokens"] = self.encode(e["text"])
            except ValueError as err:
                raise ValueError(f"{e['path']}: {err}") from None
        return item


def write_corpus(dataset, out_dir, sample_rate=16000):
    """Write a synthetic corpus (SpeakerCorpus / TokenCorpus) as 16 kHz WAVs plus
    ``manifest.jsonl`` (paths relative to ``out_dir``); returns the manifest's path.

    The manifest is the same format the ``data_scripts/`` write for real corpora, so a corpus
    written here reads back with ``ManifestDataset``.
    """
    from .audio import save_wav

    if not hasattr(dataset, "wave"):
        raise TypeError(f"dataset must be a memlab synthetic corpus with .wave(i), "
                        f"got {type(dataset).__name__}")
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "wav"), exist_ok=True)
    entries = []
    for i in range(len(dataset)):
        wave = dataset.wave(i)
        item = dataset[i]
        rel = os.path.join("wav", f"{i:06d}.wav")
        save_wav(os.path.join(out_dir, rel), wave, sample_rate)
        entry = {"path": rel, "duration": round(len(wave) / sample_rate, 4)}
        if "speaker" in item:
            entry["speaker"] = int(item["speaker"])
        if "tokens" in item:
            entry["tokens"] = [int(t) for t in item["tokens"]]
        entries.append(entry)
    path = os.path.join(out_dir, "manifest.jsonl")
    write_manifest(path, entries)
    return path
