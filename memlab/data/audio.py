"""Reading and writing audio files.

`load_audio` decodes WAV (PCM 8/16/24/32-bit and IEEE float, WAVE_FORMAT_EXTENSIBLE included)
with a small built-in reader and everything else (FLAC, OGG, other WAV encodings, ...) through
`soundfile`, which ships libsndfile in its wheel; `torchaudio.load` is tried only when neither
can. It then resamples to the requested rate. `audio_info` reads only the header (WAV and FLAC
built in), so preparing a manifest of a large corpus does not decode it. `save_wav` writes
16-bit PCM.

Files are untrusted input: a bad header, a truncated file, an undecodable file or a sample rate
outside [MIN_RATE, MAX_RATE] is a ValueError naming the file, and resampling never builds a
kernel larger than _KERNEL_LIMIT elements: an odd rate such as 48001 Hz (exactly: a 16000 x 48001
kernel, 3 GB) is resampled at the nearest ratio that fits, off by 1e-5 typically and about 1e-4 at
worst for a 16 kHz target (a pitch shift under 0.002 semitones).

References: the RIFF WAVE format (Microsoft/IBM, 1991, with WAVE_FORMAT_EXTENSIBLE); the FLAC
format specification, STREAMINFO block (xiph.org).
"""

import math
import os
import struct
import wave as _wave
from fractions import Fraction

import numpy as np
import torch

from ._checks import check_int

MIN_RATE, MAX_RATE = 1000, 768000  # Hz; what a speech file can sensibly be sampled at
_KERNEL_LIMIT = 1 << 22  # elements of the polyphase resampling kernel (16 MiB of float32)
_RATIO_TOLERANCE = 1e-5  # relative error sought when the exact rate ratio needs a huge kernel
_UNKNOWN_SIZE = 0xFFFFFFFF  # a streaming writer's data chunk size: "up to the end of the file"
_WAV_DECODED = {(1, 8), (1, 16), (1, 24), (1, 32), (3, 32), (3, 64)}  # (format tag, bits)

_failed_backends = set()  # backends that could not be imported; not retried


def _check_path(path):
    if isinstance(path, bytes):
        return os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r:.80}")
    return os.fsdecode(os.fspath(path))


def _check_sample_rate(value):
    return None if value is None else check_int("sample_rate", value, minimum=MIN_RATE, maximum=MAX_RATE)


def _check_file_rate(path, rate):
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"{path}: sample rate {rate} Hz is outside the supported {MIN_RATE}..{MAX_RATE} Hz")
    return int(rate)


def _read_wav_header(f, path):
    """-> (format_tag, channels, sample_rate, bits, data_offset, data_bytes) of an open WAV file;
    every inconsistency is a ValueError naming `path`."""
    riff = f.read(12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a RIFF/WAVE file (no 'RIFF....WAVE' in its first 12 bytes)")
    file_size = os.fstat(f.fileno()).st_size
    fmt = None
    while True:
        head = f.read(8)
        if len(head) < 8:
            what = "fmt" if fmt is None else "data"
            raise ValueError(f"{path}: WAVE file has no {what} chunk (truncated at byte {f.tell()}?)")
        cid, size = head[:4], struct.unpack("<I", head[4:])[0]
        if cid == b"fmt ":
            if size < 16:
                raise ValueError(f"{path}: WAV fmt chunk must hold >= 16 bytes, got {size}")
            body = f.read(size + (size & 1))
            if len(body) < 16:
                raise ValueError(f"{path}: WAVE file truncated inside its fmt chunk ({len(body)} of {size} bytes)")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag is in the GUID
                tag = struct.unpack("<H", body[24:26])[0]
            if channels < 1:
                raise ValueError(f"{path}: WAV header field 'channels' must be >= 1, got {channels}")
            if bits < 1:
                raise ValueError(f"{path}: WAV header field 'bits_per_sample' must be >= 1, got {bits}")
            fmt = (tag, channels, _check_file_rate(path, rate), bits)
        elif cid == b"data":
            if fmt is None:
                raise ValueError(f"{path}: WAVE data chunk comes before the fmt chunk")
            left = file_size - f.tell()
            if size == _UNKNOWN_SIZE:
                size = left
            elif size > left:
                raise ValueError(f"{path}: the WAV data chunk declares {size} bytes but only {left} follow "
                                 f"(truncated file?)")
            return (*fmt, f.tell(), size)
        else:
            f.seek(size + (size & 1), os.SEEK_CUR)


def _frame_bytes(channels, bits):
    return channels * ((bits + 7) // 8)


def _read_wav(path):
    """Built-in WAV decoder -> (float32 numpy (frames, channels), sample_rate), or None for an
    encoding it does not decode (a-law, ADPCM, ...: left to soundfile)."""
    with open(path, "rb") as f:
        tag, channels, rate, bits, offset, size = _read_wav_header(f, path)
        if (tag, bits) not in _WAV_DECODED:
            if tag in (1, 3):  # PCM / float with a bit depth no WAV writer produces
                raise ValueError(f"{path}: unsupported WAV encoding (format tag {tag}, {bits} bits per sample)")
            return None
        f.seek(offset)
        raw = f.read(size)
    step = _frame_bytes(channels, bits)
    raw = raw[: len(raw) // step * step]
    if tag == 1 and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == 1 and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif tag == 1 and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif tag == 1:  # 32
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / 2.0**31).astype(np.float32)
    else:  # IEEE float 32 / 64
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32)
    return x.reshape(-1, channels), rate


def _read_flac_info(f, path):
    """(num_frames or None if the header leaves it unknown, sample_rate) from FLAC STREAMINFO."""
    if f.read(4) != b"fLaC":
        raise ValueError(f"{path}: not a FLAC file")
    head = f.read(4)
    if len(head) < 4 or head[0] & 0x7F != 0:
        raise ValueError(f"{path}: FLAC file does not start with a STREAMINFO block")
    info = f.read(34)
    if len(info) < 34:
        raise ValueError(f"{path}: FLAC file truncated inside STREAMINFO ({len(info)} of 34 bytes)")
    bits = int.from_bytes(info[10:18], "big")  # rate 20 | channels-1 3 | bps-1 5 | total 36
    frames, rate = bits & ((1 << 36) - 1), bits >> 44
    return (frames or None), _check_file_rate(path, rate)


def _soundfile():
    if "soundfile" in _failed_backends:
        return None
    try:
        import soundfile

        return soundfile
    except (ImportError, OSError):  # OSError: libsndfile itself missing
        _failed_backends.add("soundfile")
        return None


def audio_info(path):
    """(num_frames, sample_rate) of an audio file, reading only its header where possible."""
    path = _check_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path does not exist: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic == b"RIFF":
            tag, channels, rate, bits, _, size = _read_wav_header(f, path)
            if tag in (1, 3):
                return size // _frame_bytes(channels, bits), rate
        elif magic == b"fLaC":
            frames, rate = _read_flac_info(f, path)
            if frames is not None:
                return frames, rate
    sf = _soundfile()
    if sf is not None:
        try:
            info = sf.info(path)
        except Exception as e:  # noqa: BLE001 - libsndfile's errors are RuntimeErrors
            raise ValueError(f"{path}: cannot read the audio header ({e})") from None
        return int(info.frames), _check_file_rate(path, int(info.samplerate))
    wave, rate = load_audio(path, sample_rate=None)
    return wave.shape[0], rate


def _load_any(path):
    """-> (float32 tensor (N,) mono, sample_rate): built-in WAV, then soundfile, then torchaudio."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"RIFF":
        got = _read_wav(path)  # raises ValueError for a broken WAV
        if got is not None:
            x, rate = got
            return torch.from_numpy(x.mean(1)), rate
    errors = []
    sf = _soundfile()
    if sf is None:
        errors.append("soundfile is not installed")
    else:
        try:
            with sf.SoundFile(path) as s:
                expected, rate, chunks = s.frames, int(s.samplerate), []
                while True:  # in blocks: a header may promise far more frames than the file holds
                    block = s.read(1 << 16, dtype="float32", always_2d=True)  # (n, C)
                    if len(block) == 0:
                        break
                    chunks.append(block.mean(1))  # (n,)
            x = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)  # (N,)
        except Exception as e:  # noqa: BLE001 - libsndfile's errors are RuntimeErrors
            errors.append(f"soundfile: {e}")
        else:
            if magic == b"fLaC" and len(x) < expected:
                raise ValueError(f"{path}: FLAC file is truncated: its header promises {expected} frames, "
                                 f"{len(x)} could be decoded")
            return torch.from_numpy(x), _check_file_rate(path, rate)
    if "torchaudio" not in _failed_backends:
        try:
            import torchaudio

            x, rate = torchaudio.load(path)  # (C, N); needs TorchCodec in torchaudio >= 2.9
        except ImportError:  # no TorchCodec: do not try again
            _failed_backends.add("torchaudio")
        except Exception as e:  # noqa: BLE001
            errors.append(f"torchaudio: {e}")
        else:
            return x.float().mean(0), _check_file_rate(path, int(rate))
    raise ValueError(f"{path}: cannot decode this audio file ({'; '.join(errors)})")


def _kernel_elements(orig, new):
    """Size of torchaudio's sinc resampling kernel for orig -> new Hz (lowpass width 6, rolloff 0.99)."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    width = math.ceil(6 * o / (0.99 * min(o, n)))
    return n * (o + 2 * width)


def _resample_ratio(rate, new_rate):
    """(orig, new) integers with new/orig == new_rate/rate, or else the simplest ratio within
    _RATIO_TOLERANCE whose kernel fits _KERNEL_LIMIT, or the closest that fits (an exact
    48001 -> 16000 needs 768M elements; 3 -> 1 is off by 2e-5)."""
    exact = Fraction(new_rate, rate)
    if _kernel_elements(exact.denominator, exact.numerator) <= _KERNEL_LIMIT:
        return exact.denominator, exact.numerator
    best, d = None, 1
    while d < exact.denominator:
        f = exact.limit_denominator(d)
        d *= 2
        if f == 0:
            continue
        if _kernel_elements(f.denominator, f.numerator) > _KERNEL_LIMIT:
            break
        best = f
        if abs(f - exact) <= _RATIO_TOLERANCE * exact:
            break
    if best is None:  # not reached for rates in [MIN_RATE, MAX_RATE]
        raise ValueError(f"cannot resample {rate} Hz to {new_rate} Hz within {_KERNEL_LIMIT} kernel elements")
    return best.denominator, best.numerator


def _resample(x, rate, new_rate):
    import torchaudio.functional as AF

    if x.numel() == 0:
        return x
    orig, new = _resample_ratio(rate, new_rate)
    return AF.resample(x, orig, new)  # (N * new / orig,)


def load_audio(path, sample_rate=16000):
    """Mono float32 audio (N,) at `sample_rate` (None: the file's rate). With sample_rate=None
    returns (wave, rate) instead. A file that cannot be read is a ValueError naming it."""
    path = _check_path(path)
    sample_rate = _check_sample_rate(sample_rate)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path does not exist: {path}")
    x, rate = _load_any(path)
    if sample_rate is None:
        return x, rate
    if rate != sample_rate:
        x = _resample(x, rate, sample_rate)
    return x.contiguous()


def save_wav(path, wave, sample_rate=16000):
    """Write mono audio in [-1, 1] (tensor or numpy, (N,)) as 16-bit PCM WAV."""
    path = _check_path(path)
    sample_rate = check_int("sample_rate", sample_rate, minimum=MIN_RATE, maximum=MAX_RATE)
    x = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    if x.ndim != 1:
        raise ValueError(f"wave must have shape (N,), got {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise TypeError(f"wave must hold real numbers, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"wave must be finite, got {int((~np.isfinite(x)).sum())} NaN/inf samples")
    pcm = np.clip(np.round(x.astype(np.float64) * 32767.0), -32768, 32767).astype("<i2")
    with _wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
