"""Reading and writing audio files with as few dependencies as possible.

`load_audio` tries `torchaudio.load` first (which needs TorchCodec in torchaudio >= 2.9), then
`soundfile`, then a small built-in RIFF/WAVE reader (PCM 8/16/24/32-bit and IEEE float), and
resamples to the requested rate. `audio_info` reads only the header (WAV and FLAC built in), so
preparing a manifest of a large corpus does not decode it. `save_wav` writes 16-bit PCM.

References: the RIFF WAVE format (Microsoft/IBM, 1991, with WAVE_FORMAT_EXTENSIBLE); the FLAC
format specification, STREAMINFO block (xiph.org).
"""

import os
import struct
import wave as _wave

import numpy as np
import torch

_failed_backends = set()  # backends that could not be imported; not retried


def _read_wav_header(f):
    """-> (format_tag, channels, sample_rate, bits, data_offset, data_bytes) of an open WAV file."""
    riff = f.read(12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    fmt = None
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("WAVE file has no data chunk")
        cid, size = head[:4], struct.unpack("<I", head[4:])[0]
        if cid == b"fmt ":
            body = f.read(size + (size & 1))
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == 0xFFFE and size >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag is in the GUID
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            if fmt is None:
                raise ValueError("WAVE data chunk before fmt chunk")
            return (*fmt, f.tell(), size)
        else:
            f.seek(size + (size & 1), os.SEEK_CUR)


def _read_wav(path):
    """Built-in WAV decoder -> (float32 numpy (frames, channels), sample_rate)."""
    with open(path, "rb") as f:
        tag, channels, rate, bits, offset, size = _read_wav_header(f)
        f.seek(offset)
        raw = f.read(size)
    width = bits // 8
    raw = raw[: len(raw) // (width * channels) * width * channels]
    if tag == 1 and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == 1 and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif tag == 1 and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif tag == 1 and bits == 32:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / 2.0**31).astype(np.float32)
    elif tag == 3 and bits in (32, 64):
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32)
    else:
        raise ValueError(f"unsupported WAV encoding (format tag {tag}, {bits} bits) in {path}")
    return x.reshape(-1, channels), rate


def _read_flac_info(f):
    """(num_frames, sample_rate) from a FLAC STREAMINFO block."""
    if f.read(4) != b"fLaC":
        raise ValueError("not a FLAC file")
    head = f.read(4)
    if len(head) < 4 or head[0] & 0x7F != 0:
        raise ValueError("FLAC file does not start with STREAMINFO")
    info = f.read(34)
    bits = int.from_bytes(info[10:18], "big")  # rate 20 | channels-1 3 | bps-1 5 | total 36
    return bits & ((1 << 36) - 1), bits >> 44


def audio_info(path):
    """(num_frames, sample_rate) of an audio file, reading only its header where possible."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        try:
            if magic == b"RIFF":
                tag, channels, rate, bits, _, size = _read_wav_header(f)
                return size // max(channels * bits // 8, 1), rate
            if magic == b"fLaC":
                return _read_flac_info(f)
        except (ValueError, struct.error) as e:
            raise ValueError(f"cannot read the header of {path}: {e}") from None
    try:
        import soundfile

        info = soundfile.info(path)
        return int(info.frames), int(info.samplerate)
    except ImportError:
        pass
    wave, rate = load_audio(path, sample_rate=None)
    return wave.shape[0], rate


def _load_any(path):
    """-> (float32 tensor (N,) mono, sample_rate), trying each backend in turn."""
    errors = []
    if "torchaudio" not in _failed_backends:
        try:
            import torchaudio

            x, rate = torchaudio.load(path)  # (C, N)
            return x.float().mean(0), int(rate)
        except ImportError as e:  # no TorchCodec: do not try again
            _failed_backends.add("torchaudio")
            errors.append(f"torchaudio: {e}")
        except Exception as e:  # noqa: BLE001 - fall through to the next backend
            errors.append(f"torchaudio: {e}")
    if "soundfile" not in _failed_backends:
        try:
            import soundfile

            x, rate = soundfile.read(path, dtype="float32", always_2d=True)  # (N, C)
            return torch.from_numpy(x.mean(1)), int(rate)
        except ImportError as e:
            _failed_backends.add("soundfile")
            errors.append(f"soundfile: {e}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"soundfile: {e}")
    try:
        x, rate = _read_wav(path)  # (N, C)
        return torch.from_numpy(x.mean(1)), int(rate)
    except (ValueError, struct.error) as e:
        errors.append(f"built-in WAV reader: {e}")
    raise RuntimeError(
        f"cannot decode {path}; install torchcodec or soundfile for non-WAV files. Tried: " + "; ".join(errors)
    )


def load_audio(path, sample_rate=16000):
    """Mono float32 audio (N,) at `sample_rate` (None: the file's rate). With sample_rate=None
    returns (wave, rate) instead."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path does not exist: {path}")
    x, rate = _load_any(path)
    if sample_rate is None:
        return x, rate
    if rate != sample_rate:
        import torchaudio.functional as AF

        x = AF.resample(x, rate, sample_rate)
    return x.contiguous()


def save_wav(path, wave, sample_rate=16000):
    """Write mono audio in [-1, 1] (tensor or numpy, (N,)) as 16-bit PCM WAV."""
    x = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    if x.ndim != 1:
        raise ValueError(f"wave must have shape (N,), got {x.shape}")
    pcm = np.clip(np.round(x.astype(np.float64) * 32767.0), -32768, 32767).astype("<i2")
    with _wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
