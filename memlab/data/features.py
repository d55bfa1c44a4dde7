"""Features and batching: 80-dim log mel filterbanks (Kaldi-compatible, via torchaudio) and the
collate functions that pad a list of items into a batch.

Reference: Povey et al., "The Kaldi Speech Recognition Toolkit" (2011) for the fbank recipe
(25 ms Povey window, 10 ms shift, pre-emphasis 0.97); `torchaudio.compliance.kaldi.fbank`
implements it.
"""

import numpy as np
import torch
from torchaudio.compliance import kaldi

from ._checks import check_float, check_int

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
MIN_SAMPLES = 400  # one 25 ms frame at 16 kHz


def fbank(wave, sample_rate=SAMPLE_RATE, num_mel_bins=NUM_MEL_BINS):
    """Log mel filterbank with per-utterance mean normalisation.

    wave: (N,) or (1, N) float audio in [-1, 1] at `sample_rate` (tensor or numpy).
    Returns (T, num_mel_bins) float32 with T = 1 + (N - 400) // 160 at 16 kHz.
    """
    sample_rate = check_float("sample_rate", sample_rate, minimum=1000, maximum=768000)
    num_mel_bins = check_int("num_mel_bins", num_mel_bins, minimum=3, maximum=1024)
    if isinstance(wave, np.ndarray):
        if not np.issubdtype(wave.dtype, np.number):
            raise TypeError(f"wave must hold numbers, got a numpy array of dtype {wave.dtype}")
        wave = torch.from_numpy(np.ascontiguousarray(wave))
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"wave must be a torch.Tensor or numpy array, got {type(wave).__name__}")
    if wave.dim() == 2 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.dim() != 1:
        raise ValueError(f"wave must have shape (N,) or (1, N), got {tuple(wave.shape)}")
    min_samples = int(round(MIN_SAMPLES * sample_rate / SAMPLE_RATE))
    if wave.numel() < min_samples:
        raise ValueError(
            f"wave must hold at least one 25 ms frame ({min_samples} samples), got {wave.numel()}"
        )
    if not wave.is_floating_point():
        raise TypeError(f"wave must be floating point, got {wave.dtype}")
    x = wave.detach().to(torch.float32).cpu()[None] * 32768.0  # (1, N) Kaldi's int16 scale
    feats = kaldi.fbank(
        x, num_mel_bins=num_mel_bins, sample_frequency=sample_rate, dither=0.0
    )  # (T, F)
    return (feats - feats.mean(0, keepdim=True)).contiguous()  # (T, F)


def _pad_feats(items, fn):
    if not isinstance(items, (list, tuple)) or len(items) == 0:
        raise ValueError(f"{fn}: items must be a non-empty list of item dicts, got {items!r:.80}")
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "feats" not in it:
            raise TypeError(f"{fn}: items[{i}] must be a dict with a 'feats' tensor, got {type(it).__name__}")
        f = it["feats"]
        if not isinstance(f, torch.Tensor) or f.dim() != 2:
            raise ValueError(f"{fn}: items[{i}]['feats'] must be a (T, F) tensor, got {getattr(f, 'shape', f)!r}")
        if f.shape[1] != items[0]["feats"].shape[1]:
            raise ValueError(
                f"{fn}: items[{i}]['feats'] has {f.shape[1]} bins, items[0] has {items[0]['feats'].shape[1]}"
            )
    lengths = torch.tensor([it["feats"].shape[0] for it in items], dtype=torch.int64)  # (B,)
    feats = torch.zeros(len(items), int(lengths.max()), items[0]["feats"].shape[1])  # (B, T, F)
    for i, it in enumerate(items):
        feats[i, : lengths[i]] = it["feats"]
    return feats, lengths


def collate_speaker(items):
    """[{"feats": (T_i, F), "label": int}, ...] -> feats (B, T, F) zero-padded, lengths (B,)
    int64, labels (B,) int64."""
    feats, lengths = _pad_feats(items, "collate_speaker")
    for i, it in enumerate(items):
        if "label" not in it:
            raise ValueError(f"collate_speaker: items[{i}] has no 'label' (keys: {sorted(it)})")
    labels = torch.tensor([int(it["label"]) for it in items], dtype=torch.int64)  # (B,)
    return feats, lengths, labels


def collate_asr(items):
    """[{"feats": (T_i, F), "tokens": (U_i,) int64}, ...] -> feats (B, T, F) zero-padded,
    feat_lengths (B,) int64, targets (B, U) int64 padded with 0 (the blank), target_lengths (B,)."""
    feats, lengths = _pad_feats(items, "collate_asr")
    toks = []
    for i, it in enumerate(items):
        if "tokens" not in it:
            raise ValueError(f"collate_asr: items[{i}] has no 'tokens' (keys: {sorted(it)})")
        t = torch.as_tensor(it["tokens"], dtype=torch.int64)
        if t.dim() != 1:
            raise ValueError(f"collate_asr: items[{i}]['tokens'] must be 1-D, got shape {tuple(t.shape)}")
        toks.append(t)
    target_lengths = torch.tensor([len(t) for t in toks], dtype=torch.int64)  # (B,)
    targets = torch.zeros(len(toks), int(target_lengths.max()), dtype=torch.int64)  # (B, U)
    for i, t in enumerate(toks):
        targets[i, : len(t)] = t
    return feats, lengths, targets, target_lengths
