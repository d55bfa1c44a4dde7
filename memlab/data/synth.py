"""Synthetic speech corpora that need no download: a speaker-identification corpus and a
token-transcribed (ASR) corpus, deterministic from a seed.

    SpeakerCorpus  speakers differ in pitch, formants (vocal-tract length + a personal accent) and
                   timbre (tilt, breathiness, nasality); every utterance says a different random
                   string of syllables under a different channel, noise level and gain, so that
                   the speaker has to be recognised through substantial within-speaker variation.
    TokenCorpus    tokens 1..vocab_size-1 are distinct sounds (steady vowels, noise bands, formant
                   glides) of 80-200 ms, spoken by a few voices; 0 is the blank and is never spoken.

Voices depend only on the global speaker id (see `voice.make_voice`); the utterances depend on
(seed, index). So `SpeakerCorpus(10, 20, seed=0)` and `SpeakerCorpus(10, 5, seed=1)` are a
train / test split of the same 10 speakers, and `speaker_offset=1000` gives speakers never seen
with offset 0. Items are generated on first access and cached.

Audio is rendered by `memlab.data.voice.render`; features by `memlab.data.features.fbank`.
"""

from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset

from ._checks import check_float, check_int
from .features import fbank
from .voice import NOISE, SAMPLE_RATE, SILENCE, VOICED, VOWEL_FORMANTS, Segment, Session, make_voice, render

_SPEAKER_CORPUS_SALT = 0x51AB
_TOKEN_CORPUS_SALT = 0x70C3
_FRAME_SHIFT, _FRAME_LENGTH = 160, 400  # samples, fbank at 16 kHz


def _ms(r, lo, hi, scale=1.0):
    """A random duration in samples, uniform in [lo, hi] ms times `scale`."""
    return int(r.uniform(lo, hi) * scale * SAMPLE_RATE / 1000)


# ----------------------------------------------------------------------------------------------
# token inventory: steady vowels, frication bands, vowel-to-vowel glides, interleaved so that even
# a small vocabulary mixes the three kinds

_VOWEL_ORDER = (0, 4, 7, 3, 9, 2, 5, 1, 8, 6)  # i ɑ u æ ɝ ɛ ɔ ɪ ʌ ʊ: far-apart vowels first
_FRICATIVES = (
    (2500.0, 0.35), (4800.0, 0.30), (6800.0, 0.25), (1500.0, 0.40),
    (3600.0, 0.30), (5800.0, 0.30), (7400.0, 0.20), (3000.0, 1.60),
)  # (centre Hz, width in octaves)


def _glides():
    f = np.log(VOWEL_FORMANTS[:, :2])  # (10, 2) log F1, F2
    pairs = [(a, b) for a in range(len(f)) for b in range(len(f)) if a != b]
    return sorted(pairs, key=lambda p: (-np.linalg.norm(f[p[0]] - f[p[1]]), p))


def _token_designs():
    kinds = [
        [("vowel", v) for v in _VOWEL_ORDER],
        [("noise", band) for band in _FRICATIVES],
        [("glide", p) for p in _glides()],
    ]
    out = []
    for i in range(max(len(k) for k in kinds)):
        out.extend(k[i] for k in kinds if i < len(k))
    return out


TOKEN_DESIGNS = _token_designs()  # token t (1-based) is TOKEN_DESIGNS[t - 1]
MAX_VOCAB_SIZE = 64


# ----------------------------------------------------------------------------------------------
# plans


def _speaker_plan(voice, n, r):
    """Random syllables (optional consonant onset + vowel, maybe a glide) filling n samples."""
    plan = [Segment(SILENCE, min(_ms(r, 0, 200), n // 4))]
    total = plan[0].n
    while total < n:
        u = r.random()
        if u < 0.35:  # fricative onset, speaker-independent band
            band = (r.choice([1800.0, 2600.0, 3500.0, 4500.0, 6000.0]) * r.uniform(0.9, 1.1), r.uniform(0.3, 0.8))
            plan.append(Segment(NOISE, _ms(r, 50, 130, voice.rate), band=band, level_db=r.uniform(-10, -3)))
        elif u < 0.6:  # plosive onset: closure + burst
            plan.append(Segment(SILENCE, _ms(r, 20, 50, voice.rate)))
            plan.append(Segment(NOISE, _ms(r, 8, 20), band=(r.uniform(1000, 4000), 1.5), level_db=r.uniform(-12, -4)))
        v = r.integers(len(VOWEL_FORMANTS))
        start = voice.vowel(v) * np.exp(r.normal(0.0, 0.03, 3))
        end = voice.vowel(r.integers(len(VOWEL_FORMANTS))) if r.random() < 0.3 else start
        plan.append(Segment(VOICED, _ms(r, 90, 280, voice.rate), start, end, level_db=r.normal(0, 2)))
        if r.random() < 0.25:
            plan.append(Segment(SILENCE, _ms(r, 40, 250)))
        total = sum(s.n for s in plan)
    excess = total - n  # cut the end so the plan lasts exactly n samples
    while excess > 0:
        cut = min(excess, plan[-1].n)
        plan[-1].n -= cut
        excess -= cut
        if plan[-1].n == 0 and len(plan) > 1:
            plan.pop()
    return plan


def _token_plan(voice, tokens, r):
    """Tokens separated by short pauses; returns (plan, [(start, end) sample span per token])."""
    plan = [Segment(SILENCE, _ms(r, 50, 200))]
    spans = []
    pos = plan[0].n
    for i, t in enumerate(tokens):
        kind, design = TOKEN_DESIGNS[t - 1]
        n = int(np.clip(r.uniform(80, 200) * voice.rate, 80, 200) * SAMPLE_RATE / 1000)
        level = r.normal(0.0, 1.5)
        if kind == "vowel":
            f = voice.vowel(design) * np.exp(r.normal(0.0, 0.02, 3))
            seg = Segment(VOICED, n, f, f, level_db=level)
        elif kind == "noise":
            centre, width = design
            band = (min(centre * voice.vtl**0.5 * np.exp(r.normal(0.0, 0.03)), 7600.0), width)
            seg = Segment(NOISE, n, band=band, level_db=level - 6.0)
        else:
            a, b = design
            seg = Segment(VOICED, n, voice.vowel(a), voice.vowel(b), level_db=level)
        plan.append(seg)
        spans.append((pos, pos + n))
        pos += n
        gap = Segment(SILENCE, _ms(r, 15, 60) if i < len(tokens) - 1 else _ms(r, 50, 200))
        plan.append(gap)
        pos += gap.n
    return plan, spans


@contextmanager
def _one_thread():
    """Synthesis is many small tensor ops: one intra-op thread is as fast on a quiet machine and
    avoids the large slowdowns of thread hand-offs on a busy one."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _frames(n):
    return 1 + (n - _FRAME_LENGTH) // _FRAME_SHIFT


# ----------------------------------------------------------------------------------------------
# datasets


class _SynthCorpus(Dataset):
    _salt = 0

    def __init__(self, seed, cache):
        self.seed = check_int("seed", seed, minimum=0)
        self._cache = {} if cache else None

    def __len__(self):
        raise NotImplementedError

    def _index(self, index):
        if isinstance(index, torch.Tensor) and index.numel() == 1:
            index = index.item()
        index = check_int("index", index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index must be in [0, {len(self)}), got {index}")
        return index % len(self)

    def _rng(self, index):
        return np.random.default_rng([self._salt, self.seed, index])

    def _make(self, index):  # -> (wave, item without feats, extra)
        raise NotImplementedError

    def wave(self, index):
        """The 16 kHz audio of item `index`, float32 numpy (N,), for listening."""
        with _one_thread():
            return self._make(self._index(index))[0]

    def _get(self, index):
        index = self._index(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        with _one_thread():
            wave, item, extra = self._make(index)
            entry = ({"feats": fbank(wave), **item}, extra)
        if self._cache is not None:
            self._cache[index] = entry
        return entry

    def __getitem__(self, index):
        return dict(self._get(index)[0])  # a fresh dict; the tensors are the cached ones

    def _plan(self, index):  # -> (voice, rng, tokens, session, plan, spans): corpora of tokens
        raise NotImplementedError(f"{type(self).__name__} has no token lengths")

    def lengths(self, index):
        """(fbank frames, tokens) of item `index` without synthesising it (its plan only): the
        shapes a batch of these items pads to."""
        _voice, _r, tokens, _session, plan, _spans = self._plan(self._index(index))
        return _frames(int(sum(seg.n for seg in plan))), len(tokens)

    def precompute(self):
        """Generate (and cache) every item now; returns self."""
        for i in range(len(self)):
            self._get(i)
        return self


class SpeakerCorpus(_SynthCorpus):
    """num_speakers voices x utts_per_speaker utterances of `seconds` each.

    Item i: {"feats": (T, 80) float32, "label": i % num_speakers, "speaker": speaker_offset +
    label}, with T = 1 + (16000 * seconds - 400) // 160 (198 for 2 s).
    """

    _salt = _SPEAKER_CORPUS_SALT

    def __init__(self, num_speakers, utts_per_speaker, seconds=2.0, seed=0, speaker_offset=0, cache=True):
        self.num_speakers = check_int("num_speakers", num_speakers, minimum=2)
        self.utts_per_speaker = check_int("utts_per_speaker", utts_per_speaker, minimum=1)
        self.seconds = check_float("seconds", seconds, minimum=0.1, maximum=60.0)
        self.speaker_offset = check_int("speaker_offset", speaker_offset, minimum=0)
        super().__init__(seed, cache)
        self.voices = [make_voice(self.speaker_offset + k) for k in range(self.num_speakers)]

    def __len__(self):
        return self.num_speakers * self.utts_per_speaker

    @property
    def labels(self):
        """Label of every item (without generating any audio); list of int."""
        return [i % self.num_speakers for i in range(len(self))]

    def _make(self, index):
        label = index % self.num_speakers
        voice = self.voices[label]
        r = self._rng(index)
        n = int(round(self.seconds * SAMPLE_RATE))
        session = Session(snr_db=r.uniform(5.0, 30.0), channel_db=r.uniform(1.0, 4.0), gain=r.uniform(0.05, 0.9))
        wave = render(voice, _speaker_plan(voice, n, r), session, r)
        return wave, {"label": label, "speaker": voice.speaker}, None


class TokenCorpus(_SynthCorpus):
    """num_utts utterances of tokens_per_utt random tokens from 1..vocab_size-1, utterance i
    spoken by speaker speaker_offset + i % num_speakers.

    Item: {"feats": (T, 80) float32, "tokens": (U,) int64, "speaker": int}. `alignment(i)` gives
    the fbank frames of each token.
    """

    _salt = _TOKEN_CORPUS_SALT

    def __init__(self, num_utts, vocab_size=16, tokens_per_utt=(3, 8), seed=0, speaker_offset=0,
                 num_speakers=8, cache=True):
        self.num_utts = check_int("num_utts", num_utts, minimum=1)
        self.vocab_size = check_int("vocab_size", vocab_size, minimum=2, maximum=MAX_VOCAB_SIZE)
        if isinstance(tokens_per_utt, (int, np.integer)) and not isinstance(tokens_per_utt, bool):
            tokens_per_utt = (tokens_per_utt, tokens_per_utt)
        if not isinstance(tokens_per_utt, (tuple, list)) or len(tokens_per_utt) != 2:
            raise TypeError(f"tokens_per_utt must be an int or a (min, max) pair, got {tokens_per_utt!r}")
        lo = check_int("tokens_per_utt[0]", tokens_per_utt[0], minimum=1)
        hi = check_int("tokens_per_utt[1]", tokens_per_utt[1], minimum=lo)
        self.tokens_per_utt = (lo, hi)
        self.speaker_offset = check_int("speaker_offset", speaker_offset, minimum=0)
        self.num_speakers = check_int("num_speakers", num_speakers, minimum=1)
        super().__init__(seed, cache)
        self.voices = [make_voice(self.speaker_offset + k) for k in range(self.num_speakers)]

    def __len__(self):
        return self.num_utts

    def _plan(self, index):
        voice = self.voices[index % self.num_speakers]
        r = self._rng(index)
        u = r.integers(self.tokens_per_utt[0], self.tokens_per_utt[1] + 1)
        tokens = r.integers(1, self.vocab_size, size=u)  # (U,) never 0, the blank
        session = Session(snr_db=r.uniform(10.0, 35.0), channel_db=r.uniform(0.5, 3.0), gain=r.uniform(0.05, 0.9))
        plan, spans = _token_plan(voice, tokens.tolist(), r)
        return voice, r, tokens, session, plan, spans

    def _make(self, index):
        voice, r, tokens, session, plan, spans = self._plan(index)
        wave = render(voice, plan, session, r)
        frames = _frames(len(wave))
        # token frames: those whose centre (160 k + 200) falls inside the token's samples
        spans = np.array(spans)  # (U, 2) samples
        align = np.clip(-((_FRAME_LENGTH // 2 - spans) // _FRAME_SHIFT), 0, frames)  # ceil((s-200)/160)
        item = {"tokens": torch.from_numpy(tokens.astype(np.int64)), "speaker": voice.speaker}
        return wave, item, torch.from_numpy(align.astype(np.int64))

    def alignment(self, index):
        """(U, 2) int64: [start, end) fbank frames of each token of item `index`."""
        return self._get(index)[1].clone()


def make_trials(labels, num_trials, seed=0):
    """Speaker-verification trials over items with these labels: a shuffled list of
    (i, j, target) with i != j, num_trials // 2 target pairs (same label) and the rest non-target;
    no pair is repeated. labels: sequence of int (or a 1-D tensor)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    labels = np.asarray(list(labels))
    if labels.ndim != 1 or len(labels) < 2:
        raise ValueError(f"labels must be a 1-D sequence of at least 2 labels, got shape {labels.shape}")
    num_trials = check_int("num_trials", num_trials, minimum=2)
    seed = check_int("seed", seed, minimum=0)
    n_target = num_trials // 2
    n_nontarget = num_trials - n_target
    classes, counts = np.unique(labels, return_counts=True)
    avail_target = int((counts * (counts - 1) // 2).sum())
    avail_nontarget = len(labels) * (len(labels) - 1) // 2 - avail_target
    if avail_target < n_target or avail_nontarget < n_nontarget:
        most = min(2 * avail_target + (avail_nontarget > avail_target), 2 * avail_nontarget)
        raise ValueError(
            f"num_trials must be <= {most} for these labels ({avail_target} target and "
            f"{avail_nontarget} non-target pairs exist), got {num_trials}"
        )
    r = np.random.default_rng([0x7A1, seed])
    by_class = {c: np.flatnonzero(labels == c) for c in classes}
    weights = counts * (counts - 1) / 2.0
    weights = weights / weights.sum()
    seen, target, nontarget = set(), [], []
    while len(target) < n_target:
        c = classes[r.choice(len(classes), p=weights)]
        i, j = sorted(r.choice(by_class[c], 2, replace=False).tolist())
        if (i, j) not in seen:
            seen.add((i, j))
            target.append((i, j, True))
    while len(nontarget) < n_nontarget:
        i, j = sorted(r.choice(len(labels), 2, replace=False).tolist())
        if labels[i] != labels[j] and (i, j) not in seen:
            seen.add((i, j))
            nontarget.append((i, j, False))
    trials = target + nontarget
    order = r.permutation(len(trials))
    return [trials[k] for k in order]
