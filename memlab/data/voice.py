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
so an utterance costs a couple of milliseconds; no Python loop runs over samples or frames.

References: Fant, "Acoustic Theory of Speech Production" (1960) for the source-filter model;
Klatt, "Software for a cascade/parallel formant synthesizer", JASA 67 (1980) for the resonator
magnitude response and bandwidths; Peterson & Barney, JASA 24 (1952) for the vowel formants.
"""

from dataclasses import dataclass

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 128
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


def _resonance_log(f, centre, half_bw):
    """log |H(f)| of a 2-pole resonator at `centre` with half-bandwidth `half_bw` (Klatt),
    normalised to 1 at DC. f: (1, F, 1) Hz; centre, half_bw: (K, 1, R) -> (K, F, R)."""
    num = np.log(centre**2 + half_bw**2)
    den = 0.5 * (np.log((f - centre) ** 2 + half_bw**2) + np.log((f + centre) ** 2 + half_bw**2))
    return num - den


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
    """Per-STFT-frame amplitudes, formants and noise bands from a plan."""
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
    return (
        _smooth(voiced_amp, 3),
        _smooth(noise_amp, 3),
        _smooth(formants, 5),  # coarticulation: formants move smoothly between segments
        band[seg],  # (K, 2)
    )


def _pulse_train(voice, n, r):
    """Unit-RMS glottal pulse train with a random pitch contour; (n,) float64."""
    t = np.arange(n) / SAMPLE_RATE  # (n,) seconds
    dur = n / SAMPLE_RATE
    log_f0 = np.log(voice.f0) + r.normal(0.0, voice.f0_spread)
    contour = r.uniform(0.0, 0.12) * (0.5 - t / max(dur, 1e-3))  # declination
    rates = r.uniform(0.4, 3.0, size=3)
    phases = r.uniform(0, 2 * np.pi, size=3)
    depths = r.normal(0.0, voice.intonation, size=3) / np.sqrt(3)
    contour = contour + (depths[:, None] * np.sin(2 * np.pi * rates[:, None] * t + phases[:, None])).sum(0)
    vib = voice.vibrato_depth * np.sin(2 * np.pi * voice.vibrato_rate * t + r.uniform(0, 2 * np.pi))
    f0 = np.exp(log_f0 + contour + vib)  # (n,) Hz
    phase = np.cumsum(f0) / SAMPLE_RATE  # (n,) cycles
    pos = np.flatnonzero(np.diff(np.floor(phase))) + 1  # sample index of each glottal closure
    period = SAMPLE_RATE / f0[pos]  # (P,) samples
    pos = np.clip(np.round(pos + r.normal(0.0, voice.jitter, size=pos.shape) * period), 0, n - 1)
    amps = np.sqrt(period) * np.maximum(1.0 + r.normal(0.0, voice.shimmer, size=pos.shape), 0.1)
    out = np.zeros(n)
    np.add.at(out, pos.astype(np.int64), amps)
    return out


def render(voice, plan, session, r):
    """Audio (float32 numpy, 16 kHz) for a plan spoken by `voice` under `session`.
    r: a numpy Generator that drives every random choice (so the output is reproducible)."""
    n = int(sum(s.n for s in plan))
    frames = n // HOP + 1  # torch.stft with center=True
    voiced_amp, noise_amp, formants, band = _control_tracks(voice, plan, frames)

    # excitations -> short-time spectra
    source = _pulse_train(voice, n, r) + voice.breath * r.standard_normal(n)  # (n,)
    frication = r.standard_normal(n)  # (n,)
    x = torch.from_numpy(np.stack([source, frication]).astype(np.float32))  # (2, n)
    window = torch.hann_window(N_FFT)
    spec = torch.stft(x, N_FFT, HOP, window=window, return_complex=True).numpy()  # (2, 257, K)

    f = _FREQS[None, :, None]  # (1, 257, 1)
    # voiced filter: cascade of F1..F5 resonators + nasal pole-zero + spectral tilt
    centres = np.concatenate(
        [formants, np.broadcast_to([voice.f4, voice.f5], (frames, 2))], 1
    )[:, None, :]  # (K, 1, 5)
    half_bw = 0.5 * voice.bandwidth * (40.0 + 0.05 * centres)  # (K, 1, 5)
    log_h = _resonance_log(f, centres, half_bw).sum(-1)  # (K, 257)
    nasal = _resonance_log(f[0], np.array([voice.nasal_pole]), np.array([60.0]))[..., 0] - _resonance_log(
        f[0], np.array([voice.nasal_zero]), np.array([80.0])
    )[..., 0]  # (257, 1) -> (257,)
    log_h = log_h + voice.nasal * nasal.reshape(1, -1)
    log_h = log_h + voice.tilt_db / 20 * np.log(10) * np.log2(np.maximum(_FREQS, 60.0) / 200.0)
    log_h = log_h + np.log(voiced_amp + 1e-8)[:, None]  # (K, 257)
    # noise bands: Gaussian in log-frequency
    octaves = np.log2(np.maximum(_FREQS, 30.0)[None, :] / band[:, :1])  # (K, 257)
    log_b = -0.5 * (octaves / band[:, 1:]) ** 2 + np.log(noise_amp + 1e-8)[:, None]  # (K, 257)

    y = spec[0] * np.exp(log_h).T + spec[1] * np.exp(log_b).T  # (257, K)

    # session: smooth random channel EQ on a log-frequency axis, then background noise
    u = np.log2(np.maximum(_FREQS, 50.0) / 50.0) / np.log2(SAMPLE_RATE / 2 / 50.0)  # (257,) 0..1
    j = np.arange(1, 5)[:, None]
    eq_db = (r.normal(0.0, session.channel_db, size=(4, 1)) * np.cos(np.pi * j * u + r.uniform(0, 2 * np.pi, (4, 1)))).sum(0)
    y = y * (10.0 ** (eq_db / 20.0))[:, None]
    noise_tilt = r.uniform(-6.0, 0.0)  # dB/oct: white to brownish noise
    noise_shape = 10.0 ** (noise_tilt / 20 * np.log2(np.maximum(_FREQS, 60.0) / 500.0))  # (257,)
    noise = (r.standard_normal(y.shape) + 1j * r.standard_normal(y.shape)) * noise_shape[:, None]
    p_speech = np.mean(np.abs(y) ** 2)
    p_noise = np.mean(np.abs(noise) ** 2)
    y = y + noise * np.sqrt(p_speech / p_noise * 10.0 ** (-session.snr_db / 10.0))

    wave = torch.istft(torch.from_numpy(y.astype(np.complex64)), N_FFT, HOP, window=window, length=n)
    wave = wave.numpy()  # (n,)
    peak = np.abs(wave).max()
    return (wave * (session.gain / max(peak, 1e-9))).astype(np.float32)
