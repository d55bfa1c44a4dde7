"""Procedural voices: a source-filter speech synthesizer that is fast because it is vectorised.

A *voice* is a handful of numbers drawn from a generator seeded only by a global speaker id:
pitch (f0, its per-utterance spread, intonation, vibrato, jitter, shimmer), vocal-tract length
(a factor that scales every formant), a personal "accent" (small per-vowel formant offsets),
the higher formants F4/F5, formant bandwidths, spectral tilt, breathiness, a nasal pole-zero pair
and a speaking rate. A *plan* is a list of segments (silence, voiced with formants that may glide,
frication, bursts). `render` turns a plan into 16 kHz audio:

    excitation  pulse train at f0(t) (+ breath noise) and white noise for frication
    filter      short-time spectra multiplied by a per-frame envelope: cascade formant
                resonators (Klatt-style magnitude responses), tilt, nasal pair, noise bands
    session     a random smooth channel EQ, background noise at a random SNR, a random gain

Everything is done on whole arrays (numpy for the control tracks, one torch STFT/ISTFT pair),
so two seconds of audio cost about 5 ms of one CPU core; no Python loop runs over samples or
frames.

References: Fant, "Acoustic Theory of Speech Production" (1960) for the source-filter model;
Klatt, "Software for a cascade/parallel formant synthesizer", JASA 67 (1980) for the resonator
magnitude response and bandwidths; Peterson & Barney, JASA 24 (1952) for the vowel formants.
"""

from dataclasses import dataclass

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 256  # 50% overlap of a Hann window: perfect reconstruction
_FREQS = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)  # (257,) Hz of each STFT bin
_SPEAKER_SALT = 0x5EED5BEA

# Average adult formants (F1, F2, F3 in Hz) of ten American English vowels (Peterson & Barney).
VOWELS = ("i", "ɪ", "ɛ", "æ", "ɑ", "ɔ", "ʊ", "u", "ʌ", "ɝ")
VOWEL_FORMANTS = np.array(
    [
        [270, 2290, 3010],
        [390, 1990, 2550],
        [530, 1840, 2480],
        [660, 1720, 2410],
        [730, 1090, 2440],
        [570, 840, 2410],
        [440, 1020, 2240],
        [300, 870, 2240],
        [640, 1190, 2390],
        [490, 1350, 1690],
    ],
    dtype=np.float64,
)  # (10, 3)


@dataclass(frozen=True)
class Voice:
    """The parameters of one synthetic speaker (see `make_voice`)."""

    speaker: int
    f0: float  # Hz, the speaker's median pitch
    f0_spread: float  # log-sd of the per-utterance pitch around f0
    intonation: float  # log-depth of the slow pitch movements within an utterance
    vibrato_depth: float  # log-depth of a sinusoidal pitch modulation
    vibrato_rate: float  # Hz
    jitter: float  # sd of each period's length, as a fraction of the period
    shimmer: float  # sd of each pulse's amplitude, as a fraction
    vtl: float  # vocal-tract-length factor: every formant frequency is multiplied by it
    accent: tuple  # (10, 3) multiplicative per-vowel formant offsets, as nested tuples
    f4: float  # Hz
    f5: float  # Hz
    bandwidth: float  # factor on the formant bandwidths
    tilt_db: float  # dB per octave on the voiced source (negative: darker)
    breath: float  # amplitude of aspiration noise relative to the pulse train
    nasal: float  # 0..1 strength of the nasal pole-zero pair
    nasal_pole: float  # Hz
    nasal_zero: float  # Hz
    rate: float  # factor on segment durations (> 1: slower speaker)

    def vowel(self, v):
        """Formants (F1, F2, F3) in Hz of vowel index `v` as this speaker says it."""
        return VOWEL_FORMANTS[v] * np.asarray(self.accent[v]) * self.vtl  # (3,)


def make_voice(speaker):
    """The voice of global speaker id `speaker` (an int >= 0); it depends on nothing else, so
    the same id is the same voice in every corpus, and other ids are other voices."""
    r = np.random.default_rng([_SPEAKER_SALT, int(speaker)])
    low = r.random() < 0.5  # two broad groups, like adult male / female voices
    if low:
        f0 = 115.0 * np.exp(r.normal(0.0, 0.15))
        vtl = r.normal(0.97, 0.045)
    else:
        f0 = 205.0 * np.exp(r.normal(0.0, 0.13))
        vtl = r.normal(1.13, 0.045)
    accent = np.exp(r.normal(0.0, 0.05, size=(len(VOWELS), 3)))
    return Voice(
        speaker=int(speaker),
        f0=float(f0),
        f0_spread=float(r.uniform(0.04, 0.09)),
        intonation=float(r.uniform(0.03, 0.12)),
        vibrato_depth=float(r.uniform(0.0, 0.02)),
        vibrato_rate=float(r.uniform(4.0, 7.0)),
        jitter=float(r.uniform(0.003, 0.02)),
        shimmer=float(r.uniform(0.02, 0.12)),
        vtl=float(vtl),
        accent=tuple(tuple(float(a) for a in row) for row in accent),
        f4=float(r.uniform(3200.0, 3900.0) * vtl),
        f5=float(r.uniform(4200.0, 5000.0) * vtl),
        bandwidth=float(np.exp(r.uniform(np.log(0.7), np.log(1.5)))),
        tilt_db=float(r.uniform(-9.0, -3.0)),
        breath=float(np.exp(r.uniform(np.log(0.02), np.log(0.35)))),
        nasal=float(r.uniform(0.0, 0.8)),
        nasal_pole=float(r.uniform(230.0, 400.0)),
        nasal_zero=float(r.uniform(700.0, 1600.0)),
        rate=float(np.exp(r.uniform(np.log(0.8), np.log(1.25)))),
    )


# A segment of a plan. kind: 0 silence, 1 voiced, 2 frication/burst (noise band).
SILENCE, VOICED, NOISE = 0, 1, 2


@dataclass
class Segment:
    kind: int
    n: int  # samples
    formants: np.ndarray | None = None  # (3,) Hz at the start (voiced)
    formants_end: np.ndarray | None = None  # (3,) Hz at the end (voiced glides), else = start
    band: tuple = (3000.0, 0.5)  # (centre Hz, width in octaves) of a noise band
    level_db: float = 0.0


@dataclass(frozen=True)
class Session:
    """Recording conditions of one utterance."""

    snr_db: float = 20.0  # background noise, over the whole utterance
    channel_db: float = 3.0  # sd (dB) of the random smooth channel EQ
    gain: float = 0.5  # peak amplitude of the output


def _resonance(f, centre, half_bw):
    """|H(f)| of a 2-pole resonator at `centre` with half-bandwidth `half_bw` (Klatt), normalised
    to 1 at DC. Tensors that broadcast, e.g. f: (1, F, 1), centre and half_bw: (K, 1, R)."""
    b2 = half_bw * half_bw
    lo = f - centre
    hi = f + centre
    den = (lo * lo + b2) * (hi * hi + b2)
    return (centre * centre + b2) * torch.rsqrt(den)


def _smooth(x, taps):
    """Moving average along axis 0 with edge padding; x: (K, ...) -> (K, ...)."""
    if taps <= 1 or x.shape[0] < 2:
        return x
    kernel = np.hanning(taps + 2)[1:-1]
    kernel = kernel / kernel.sum()
    pad = taps // 2
    xp = np.concatenate([np.repeat(x[:1], pad, 0), x, np.repeat(x[-1:], pad, 0)], 0)
    windows = np.lib.stride_tricks.sliding_window_view(xp, taps, axis=0)  # (K, ..., taps)
    return windows @ kernel


def _control_tracks(voice, plan, frames):
    """Per-STFT-frame amplitudes, formants and noise bands from a plan (amplitude changes are
    smoothed by the overlap-add of the synthesis windows)."""
    n = np.array([s.n for s in plan])
    starts = np.concatenate([[0], np.cumsum(n)[:-1]])
    t = np.arange(frames) * HOP  # (K,) sample at the centre of each frame
    seg = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(plan) - 1)  # (K,)
    frac = np.clip((t - starts[seg]) / np.maximum(n[seg], 1), 0.0, 1.0)  # (K,)

    neutral = np.array([500.0, 1500.0, 2500.0]) * voice.vtl
    f_start = np.stack([s.formants if s.formants is not None else neutral for s in plan])  # (S, 3)
    f_end = np.stack(
        [s.formants_end if s.formants_end is not None else f_start[i] for i, s in enumerate(plan)]
    )  # (S, 3)
    kind = np.array([s.kind for s in plan])  # (S,)
    amp = 10.0 ** (np.array([s.level_db for s in plan]) / 20.0)  # (S,)
    band = np.array([s.band for s in plan], dtype=np.float64)  # (S, 2)

    formants = f_start[seg] + frac[:, None] * (f_end[seg] - f_start[seg])  # (K, 3)
    voiced_amp = np.where(kind[seg] == VOICED, amp[seg], 0.0)  # (K,)
    noise_amp = np.where(kind[seg] == NOISE, amp[seg], 0.0)  # (K,)
    formants = _smooth(formants, 3)  # coarticulation: formants move smoothly between segments
    return voiced_amp, noise_amp, formants, band[seg]  # (K,), (K,), (K, 3), (K, 2)


def _pulse_train(voice, n, r):
    """Unit-RMS glottal pulse train with a random pitch contour; (n,) float64."""
    step = 64  # the contour is smooth: compute it every 4 ms and interpolate
    tc = np.arange(0, n + step, step) / SAMPLE_RATE  # (C,) seconds
    dur = n / SAMPLE_RATE
    contour = np.log(voice.f0) + r.normal(0.0, voice.f0_spread)  # this utterance's pitch
    contour = contour + r.uniform(0.0, 0.12) * (0.5 - tc / max(dur, 1e-3))  # declination
    rates = r.uniform(0.4, 3.0, size=(3, 1))  # Hz, slow intonation movements
    phases = r.uniform(0, 2 * np.pi, size=(3, 1))
    depths = r.normal(0.0, voice.intonation, size=(3, 1)) / np.sqrt(3)
    contour = contour + (depths * np.sin(2 * np.pi * rates * tc + phases)).sum(0)
    contour = contour + voice.vibrato_depth * np.sin(2 * np.pi * voice.vibrato_rate * tc + r.uniform(0, 2 * np.pi))
    f0 = np.interp(np.arange(n), np.arange(len(tc)) * step, np.exp(contour))  # (n,) Hz
    phase = np.cumsum(f0) / SAMPLE_RATE  # (n,) cycles
    pos = np.flatnonzero(np.diff(np.floor(phase))) + 1  # sample index of each glottal closure
    period = SAMPLE_RATE / f0[pos]  # (P,) samples
    pos = np.clip(np.round(pos + r.normal(0.0, voice.jitter, size=pos.shape) * period), 0, n - 1)
    amps = np.sqrt(period) * np.maximum(1.0 + r.normal(0.0, voice.shimmer, size=pos.shape), 0.1)
    return np.bincount(pos.astype(np.int64), weights=amps, minlength=n)  # (n,)


def render(voice, plan, session, r):
    """Audio (float32 numpy, 16 kHz) for a plan spoken by `voice` under `session`.
    r: a numpy Generator that drives every random choice (so the output is reproducible)."""
    n = int(sum(s.n for s in plan))
    frames = n // HOP + 1  # torch.stft with center=True
    voiced_amp, noise_amp, formants, band = _control_tracks(voice, plan, frames)
    g = torch.Generator().manual_seed(int(r.integers(2**62)))  # the bulk noise comes from torch
    as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731

    # excitations -> short-time spectra
    pulses = as_t(_pulse_train(voice, n, r))  # (n,)
    noise = torch.randn(2, n, generator=g)  # (2, n) breath, frication
    x = torch.stack([pulses + voice.breath * noise[0], noise[1]])  # (2, n)
    window = torch.hann_window(N_FFT)
    spec = torch.stft(x, N_FFT, HOP, window=window, return_complex=True)  # (2, 257, K)

    freqs = as_t(_FREQS)  # (257,)
    # voiced filter: cascade of F1..F5 resonators, nasal pole-zero pair, spectral tilt
    centres = as_t(formants)[:, None, :]  # (K, 1, 3) F1..F3 move
    half_bw = 0.5 * voice.bandwidth * (40.0 + 0.05 * centres)  # (K, 1, 3)
    h = _resonance(freqs[None, :, None], centres, half_bw).prod(-1)  # (K, 257)
    high = as_t([voice.f4, voice.f5])  # (2,) F4, F5 stay
    h = h * _resonance(freqs[:, None], high, 0.5 * voice.bandwidth * (40.0 + 0.05 * high)).prod(-1)
    nasal = _resonance(freqs, voice.nasal_pole, 30.0) / _resonance(freqs, voice.nasal_zero, 40.0)  # (257,)
    tilt = 10.0 ** (voice.tilt_db / 20 * torch.log2(freqs.clamp(min=60.0) / 200.0))  # (257,)
    h = h * (nasal**voice.nasal * tilt)[None, :] * as_t(voiced_amp)[:, None]  # (K, 257)
    # noise bands: Gaussian in log-frequency
    band = as_t(band)  # (K, 2)
    octaves = torch.log2(freqs.clamp(min=30.0)[None, :] / band[:, :1])  # (K, 257)
    b = torch.exp(-0.5 * (octaves / band[:, 1:]) ** 2) * as_t(noise_amp)[:, None]  # (K, 257)
    y = spec[0] * h.T + spec[1] * b.T  # (257, K)

    # session: smooth random channel EQ on a log-frequency axis, then background noise
    u = np.log2(np.maximum(_FREQS, 50.0) / 50.0) / np.log2(SAMPLE_RATE / 2 / 50.0)  # (257,) 0..1
    j = np.arange(1, 5)[:, None]
    eq_db = (r.normal(0.0, session.channel_db, (4, 1)) * np.cos(np.pi * j * u + r.uniform(0, 2 * np.pi, (4, 1)))).sum(0)
    y = y * as_t(10.0 ** (eq_db / 20.0))[:, None]  # (257, K)
    noise_tilt = r.uniform(-6.0, 0.0)  # dB/oct: white to brownish noise
    shape = as_t(10.0 ** (noise_tilt / 20 * np.log2(np.maximum(_FREQS, 60.0) / 500.0)))  # (257,)
    bg = torch.randn(y.shape, dtype=torch.complex64, generator=g) * shape[:, None]  # (257, K)
    p_speech = torch.view_as_real(y).square().sum(-1).mean().clamp(min=1e-12)  # > 0: never silent
    p_noise = torch.view_as_real(bg).square().sum(-1).mean()
    y = y + bg * torch.sqrt(p_speech / p_noise * 10.0 ** (-session.snr_db / 10.0))

    wave = torch.istft(y, N_FFT, HOP, window=window, length=n)  # (n,)
    peak = wave.abs().max().clamp(min=1e-9)
    return (wave * (session.gain / peak)).numpy().astype(np.float32)
