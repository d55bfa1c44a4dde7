"""Robustness of the data readers: WAV/FLAC decoding (memlab.data.audio), manifests, and the
data_scripts on generated corpus trees. Every bad input is a ValueError/TypeError naming the file
(and line) or the argument, never a ZeroDivisionError, UnicodeDecodeError or an unbounded
allocation."""

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from memlab.data import ManifestDataset, fbank, read_manifest
from memlab.data.audio import audio_info, load_audio, save_wav

soundfile = pytest.importorskip("soundfile")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tone(seconds, rate=16000, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _wav_bytes(rate=16000, channels=1, bits=16, tag=1, frames=1600, data_size=None, payload=None):
    """A hand-made RIFF/WAVE file; every header field can be set to a bad value."""
    width = max(bits // 8, 1) * max(channels, 1)
    data = payload if payload is not None else bytes(frames * width)
    size = len(data) if data_size is None else data_size
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * width & 0xFFFFFFFF, width, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _write(path, blob):
    path.write_bytes(blob)
    return path


# ---------------------------------------------------------------------------------------------
# 1. resource guards of the WAV reader

_BOUNDED = textwrap.dedent(
    """
    import re, resource, sys
    import torch
    from memlab.data.audio import load_audio
    load_audio(sys.argv[2])  # warm up the imports before measuring
    data = int(re.search(r"VmData:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    limit = data + 512 * 2**20  # 0.5 GiB more than the process holds now
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    try:
        x = load_audio(sys.argv[1])
        print("OK", x.shape[0])
    except ValueError as e:
        print("VALUEERROR", e)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA of /proc/self/status is Linux only")
@pytest.mark.parametrize("rate", [48001, 96001])
def test_odd_sample_rate_resamples_in_bounded_memory(tmp_path, rate):
    # 0.25 s at an odd rate: gcd(rate, 16000) == 1, so a naive polyphase kernel is 16000 x rate.
    frames = rate // 4
    odd = _write(tmp_path / "odd.wav", _wav_bytes(rate=rate, frames=frames))
    save_wav(tmp_path / "warm.wav", _tone(0.1, 8000), 8000)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _BOUNDED, str(odd), str(tmp_path / "warm.wav")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout.strip().splitlines()[-1]
    if out.startswith("VALUEERROR"):
        assert "odd.wav" in out and str(rate) in out
    else:
        n = int(out.split()[1])
        assert abs(n - frames * 16000 / rate) <= 0.001 * frames * 16000 / rate + 2


def test_odd_sample_rate_keeps_the_signal(tmp_path):
    rate = 44101
    p = tmp_path / "a.wav"
    soundfile.write(p, _tone(0.5, rate, freq=300.0), rate, subtype="PCM_16")
    x = load_audio(p)
    assert abs(x.shape[0] - 8000) <= 2
    ref = torch.from_numpy(_tone(0.5, 16000, freq=300.0))
    n = min(len(x), len(ref)) - 200
    assert torch.allclose(x[100:n], ref[100:n], atol=0.01)  # away from the edges


def test_resampling_kernel_is_bounded_for_every_rate():
    from memlab.data import audio

    for target in (8000, 16000, 22050, 44100):
        for rate in list(range(audio.MIN_RATE, audio.MAX_RATE + 1, 4999)) + [48001, 96001, 44101, 767999]:
            orig, new = audio._resample_ratio(rate, target)
            assert audio._kernel_elements(orig, new) <= audio._KERNEL_LIMIT
            assert abs(new / orig - target / rate) <= 2e-4 * target / rate, (rate, target, orig, new)
    assert audio._resample_ratio(44100, 16000) == (441, 160)  # common rates stay exact
    assert audio._resample_ratio(48001, 16000) == (3, 1)


@pytest.mark.parametrize("rate", [0, 1, 999, 10**9, 2**32 - 1])
def test_sample_rate_outside_the_sane_range_is_refused(tmp_path, rate):
    p = _write(tmp_path / "rate.wav", _wav_bytes(rate=rate))
    for read in (load_audio, audio_info):
        with pytest.raises(ValueError, match=rf"rate\.wav.*sample rate.*\b{rate}\b"):
            read(p)


@pytest.mark.parametrize("field", ["channels", "bits"])
def test_zero_channels_or_bits_name_the_file_and_field(tmp_path, field):
    p = _write(tmp_path / "zero.wav", _wav_bytes(**{field: 0}))
    for read in (load_audio, audio_info):
        with pytest.raises(ValueError, match=rf"zero\.wav.*{field}.*\b0\b"):
            read(p)


def test_truncated_wav_files_name_the_file(tmp_path):
    blob = _wav_bytes(frames=1000)
    for cut in (0, 3, 11, 12, 20, 30, 40, 43):  # inside RIFF, fmt header, fmt body, data header
        p = _write(tmp_path / f"cut{cut}.wav", blob[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.wav"):
            load_audio(p)
        with pytest.raises(ValueError, match=rf"cut{cut}\.wav"):
            audio_info(p)


def test_data_chunk_larger_than_the_file(tmp_path):
    p = _write(tmp_path / "big.wav", _wav_bytes(frames=100, data_size=10**9))
    for read in (load_audio, audio_info):
        with pytest.raises(ValueError, match=r"big\.wav.*data chunk.*1000000000"):
            read(p)


def test_data_chunk_size_unknown_means_to_the_end(tmp_path):
    # streaming writers leave the size at 0xFFFFFFFF: read what is there
    pcm = (np.arange(1600) % 100 * 100).astype("<i2").tobytes()
    p = _write(tmp_path / "stream.wav", _wav_bytes(payload=pcm, data_size=0xFFFFFFFF))
    assert audio_info(p) == (1600, 16000)
    assert load_audio(p).shape == (1600,)


@pytest.mark.parametrize("tag, bits", [(0x1234, 16), (1, 12), (1, 7), (3, 16)])
def test_unsupported_wav_encodings_name_the_file(tmp_path, tag, bits):
    p = _write(tmp_path / "enc.wav", _wav_bytes(tag=tag, bits=bits, frames=100))
    with pytest.raises(ValueError, match=r"enc\.wav"):
        load_audio(p)


@pytest.mark.parametrize("blob", [b"", b"hello world, not audio" * 10, b"RIFF\x00\x00\x00\x00WAVE", b"fLaC\x00"])
def test_garbage_files_name_the_file(tmp_path, blob):
    p = _write(tmp_path / "junk.flac", blob)
    with pytest.raises(ValueError, match=r"junk\.flac"):
        load_audio(p)
    with pytest.raises(ValueError, match=r"junk\.flac"):
        audio_info(p)


def test_empty_data_chunk_reads_as_no_samples(tmp_path):
    p = _write(tmp_path / "empty.wav", _wav_bytes(frames=0))
    assert audio_info(p) == (0, 16000)
    assert load_audio(p).shape == (0,)
    assert load_audio(p, 8000).shape == (0,)


def test_load_audio_names_bad_arguments(tmp_path):
    p = tmp_path / "a.wav"
    save_wav(p, _tone(0.1))
    with pytest.raises(TypeError, match="path must be"):
        load_audio(123)
    with pytest.raises(TypeError, match="sample_rate must be an int"):
        load_audio(p, 16000.5)
    with pytest.raises(ValueError, match="sample_rate must be >= 1000, got 0"):
        load_audio(p, 0)
    with pytest.raises(TypeError, match="path must be"):
        audio_info(None)
    with pytest.raises(ValueError, match="sample_rate must be >= 1000"):
        fbank(torch.zeros(16000), sample_rate=-5)
    with pytest.raises(ValueError, match="num_mel_bins must be >= 3, got 0"):
        fbank(torch.zeros(16000), num_mel_bins=0)


# ---------------------------------------------------------------------------------------------
# 2. FLAC through soundfile; the LibriSpeech script on a real FLAC tree


def test_flac_is_decoded(tmp_path):
    x = _tone(0.5, 16000)
    soundfile.write(tmp_path / "a.flac", x, 16000)
    assert audio_info(tmp_path / "a.flac") == (8000, 16000)
    y = load_audio(tmp_path / "a.flac")
    assert y.shape == (8000,) and y.dtype == torch.float32
    assert np.allclose(y.numpy(), x, atol=1e-4)
    stereo = np.stack([x, 0.5 * x], 1)[:4410]  # (N, 2), averaged to mono
    soundfile.write(tmp_path / "b.flac", stereo, 44100)
    assert audio_info(tmp_path / "b.flac") == (4410, 44100)
    assert abs(load_audio(tmp_path / "b.flac").shape[0] - 1600) <= 1
    wave, rate = load_audio(tmp_path / "b.flac", sample_rate=None)
    assert rate == 44100 and wave.shape == (4410,)


def test_corrupt_flac_names_the_file(tmp_path):
    soundfile.write(tmp_path / "ok.flac", _tone(0.5), 16000)
    blob = (tmp_path / "ok.flac").read_bytes()
    bad = _write(tmp_path / "bad.flac", blob[:60])  # STREAMINFO intact, the frames cut away
    with pytest.raises(ValueError, match=r"bad\.flac"):
        load_audio(bad)
    info_only = _write(tmp_path / "hdr.flac", blob[:42])
    with pytest.raises(ValueError, match=r"hdr\.flac"):
        load_audio(info_only)


def test_flac_header_promising_too_many_frames(tmp_path):
    # STREAMINFO says 2**36 - 1 frames of 8 channels (2 TiB as float32): no such allocation
    x = _tone(0.25)
    soundfile.write(tmp_path / "ok.flac", np.stack([x] * 8, 1), 16000)
    blob = bytearray((tmp_path / "ok.flac").read_bytes())
    bits = int.from_bytes(blob[18:26], "big") | ((1 << 36) - 1)
    blob[18:26] = bits.to_bytes(8, "big")
    p = _write(tmp_path / "huge.flac", bytes(blob))
    with pytest.raises(ValueError, match=r"huge\.flac"):
        load_audio(p)


def _librispeech_tree(root):
    """LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac + trans.txt."""
    layout = {
        "dev-clean": {("84", "121123"): ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES"],
                      ("174", "50561"): ["IT'S A FINE DAY"]},
        "test-clean": {("1089", "134686"): ["HE HOPED THERE WOULD BE STEW FOR DINNER"]},
    }
    expected = {}
    k = 0
    for split, chapters in layout.items():
        for (spk, ch), texts in chapters.items():
            folder = root / "LibriSpeech" / split / spk / ch
            folder.mkdir(parents=True)
            lines = []
            for u, text in enumerate(texts):
                utt = f"{spk}-{ch}-{u:04d}"
                seconds = 0.3 + 0.1 * k
                k += 1
                soundfile.write(folder / f"{utt}.flac", _tone(seconds, freq=200 + 50 * k), 16000, subtype="PCM_16")
                lines.append(f"{utt} {text}")
                expected.setdefault(split, []).append((str(folder / f"{utt}.flac"), round(seconds, 3), spk, text))
            (folder / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    return expected


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "data_scripts"))
    import importlib

    return lambda name: importlib.import_module(name)


def test_prepare_librispeech_on_a_flac_tree(tmp_path, scripts):
    expected = _librispeech_tree(tmp_path)
    out = tmp_path / "out"
    assert scripts("prepare_librispeech").main(["--root", str(tmp_path / "LibriSpeech"), "--out-dir", str(out)]) == 4
    assert sorted(os.listdir(out)) == ["dev-clean.jsonl", "test-clean.jsonl"]
    for split, want in expected.items():
        es = read_manifest(out / f"{split}.jsonl")
        got = [(e["path"], e["duration"], e["speaker"], e["text"]) for e in es]
        assert sorted(got) == sorted(want)
    ds = ManifestDataset(out / "dev-clean.jsonl", task="asr")
    assert ds.speakers == ["174", "84"]
    for i, e in enumerate(ds.entries):
        item = ds[i]
        assert item["feats"].shape == (1 + (int(e["duration"] * 16000) - 400) // 160, 80)
        assert len(item["tokens"]) == len(e["text"]) and item["tokens"].min() >= 1
    # one subset folder as --root, and --limit
    n = scripts("prepare_librispeech").main(["--root", str(tmp_path / "LibriSpeech" / "dev-clean"),
                                             "--out-dir", str(tmp_path / "o2"), "--limit", "1"])
    assert n == 1 and len(read_manifest(tmp_path / "o2" / "dev-clean.jsonl")) == 1


def test_prepare_voxceleb1_smoke_on_generated_tree(tmp_path, scripts):
    root = tmp_path / "vox1"
    for spk, vid, n in [("id10001", "1zcIwhmdeo4", 2), ("id10002", "abcdefghijk", 1), ("id10300", "x6uYqmx31kE", 1)]:
        (root / spk / vid).mkdir(parents=True)
        for u in range(1, n + 1):
            soundfile.write(root / spk / vid / f"{u:05d}.wav", _tone(0.4), 16000, subtype="PCM_16")
    (tmp_path / "veri.txt").write_text("1 id10001/1zcIwhmdeo4/00001.wav id10001/1zcIwhmdeo4/00002.wav\n"
                                       "0 id10002/abcdefghijk/00001.wav id10300/x6uYqmx31kE/00001.wav\n")
    out = tmp_path / "out"
    assert scripts("prepare_voxceleb1").main(["--root", str(root), "--out-dir", str(out),
                                              "--trials", str(tmp_path / "veri.txt")]) == 4
    assert [e["speaker"] for e in read_manifest(out / "dev.jsonl")] == ["id10001", "id10001", "id10002"]
    assert [e["duration"] for e in read_manifest(out / "test.jsonl")] == [0.4]
    assert len(open(out / "trials.jsonl").readlines()) == 2


def test_prepare_speech_commands_smoke_on_generated_tree(tmp_path, scripts):
    root = tmp_path / "sc"
    for word in ("yes", "no", "_background_noise_"):
        (root / word).mkdir(parents=True)
    for word, name in [("yes", "0a7c2a8d_nohash_0.wav"), ("yes", "0a7c2a8d_nohash_1.wav"), ("no", "1b4c9b89_nohash_0.wav")]:
        soundfile.write(root / word / name, _tone(1.0), 16000, subtype="PCM_16")
    soundfile.write(root / "_background_noise_" / "white.wav", _tone(2.0), 16000, subtype="PCM_16")
    (root / "testing_list.txt").write_text("no/1b4c9b89_nohash_0.wav\n")
    out = tmp_path / "out"
    assert scripts("prepare_speech_commands").main(["--root", str(root), "--out-dir", str(out)]) == 3
    assert [e["text"] for e in read_manifest(out / "train.jsonl")] == ["yes", "yes"]
    assert read_manifest(out / "validation.jsonl") == []
    assert ManifestDataset(out / "test.jsonl", task="asr")[0]["feats"].shape == (98, 80)


# ---------------------------------------------------------------------------------------------
# 3. malformed lines name the file and the line


@pytest.mark.parametrize("line", ["84-121123-0001", "84-121123-0001 ", "GO DO YOU HEAR", "84_121123_0001 HELLO"])
def test_malformed_transcript_line_names_file_and_line(tmp_path, scripts, line):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    chapter.mkdir(parents=True)
    soundfile.write(chapter / "84-121123-0000.flac", _tone(0.3), 16000)
    (chapter / "84-121123.trans.txt").write_text(f"84-121123-0000 GO\n{line}\n")
    with pytest.raises(ValueError, match=r"84-121123\.trans\.txt:2: expected '<speaker>-<chapter>-<utterance> <TEXT>'"):
        scripts("prepare_librispeech").main(["--root", str(tmp_path / "LibriSpeech"), "--out-dir", str(tmp_path / "o")])


def test_non_utf8_transcript_names_file_and_line(tmp_path, scripts):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    chapter.mkdir(parents=True)
    soundfile.write(chapter / "84-121123-0000.flac", _tone(0.3), 16000)
    (chapter / "84-121123.trans.txt").write_bytes(b"84-121123-0000 GO\n84-121123-0001 CAF\xe9\n")
    with pytest.raises(ValueError, match=r"84-121123\.trans\.txt:2: not valid UTF-8"):
        scripts("prepare_librispeech").main(["--root", str(tmp_path / "LibriSpeech"), "--out-dir", str(tmp_path / "o")])


@pytest.mark.parametrize("line", ["1 id10001/a/00001.wav", "yes id10001/a/00001.wav id10001/a/00002.wav",
                                  "1 a b c"])
def test_malformed_trials_line_names_file_and_line(tmp_path, scripts, line):
    root = tmp_path / "vox1"
    (root / "id10001" / "a").mkdir(parents=True)
    save_wav(root / "id10001" / "a" / "00001.wav", _tone(0.3))
    save_wav(root / "id10001" / "a" / "00002.wav", _tone(0.3))
    trials = tmp_path / "veri.txt"
    trials.write_text(f"1 id10001/a/00001.wav id10001/a/00002.wav\n\n{line}\n")
    with pytest.raises(ValueError, match=r"veri\.txt:3: expected '<0\|1> <enroll path> <test path>'"):
        scripts("prepare_voxceleb1").main(["--root", str(root), "--out-dir", str(tmp_path / "o"), "--trials", str(trials)])


def test_non_utf8_lists_name_file_and_line(tmp_path, scripts):
    root = tmp_path / "sc"
    (root / "yes").mkdir(parents=True)
    save_wav(root / "yes" / "aa_nohash_0.wav", _tone(0.3))
    (root / "testing_list.txt").write_bytes(b"yes/aa_nohash_0.wav\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"testing_list\.txt:2: not valid UTF-8"):
        scripts("prepare_speech_commands").main(["--root", str(root), "--out-dir", str(tmp_path / "o")])


def test_script_errors_are_one_line_at_the_command_line(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    chapter.mkdir(parents=True)
    (chapter / "84-121123.trans.txt").write_text("nonsense\n")
    res = subprocess.run([sys.executable, os.path.join(REPO, "data_scripts", "prepare_librispeech.py"),
                          "--root", str(tmp_path / "LibriSpeech"), "--out-dir", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "84-121123.trans.txt:1: expected" in res.stderr


def test_non_utf8_manifest_names_the_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_bytes(b'{"path": "a.wav", "duration": 1.0}\n{"path": "\xe9.wav", "duration": 1.0}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid UTF-8"):
        read_manifest(m)
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid UTF-8"):
        ManifestDataset(m)


def test_manifest_with_bom_and_bad_values(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_bytes(b'\xef\xbb\xbf{"path": "a.wav", "duration": 1.0}\n')
    assert read_manifest(m)[0]["duration"] == 1.0  # a UTF-8 byte-order mark is tolerated
    for line, what in [('{"path": "a.wav", "duration": Infinity}', "'duration'"),
                       ('{"path": "a.wav", "duration": NaN}', "'duration'"),
                       ('{"path": "a.wav", "duration": 1, "tokens": [100000000000000000000000]}', "'tokens'"),
                       ('{"path": "a.wav", "duration": 1, "speaker": true}', "'speaker'"),
                       ('[1, 2]', "JSON object")]:
        m.write_text(line + "\n")
        with pytest.raises((ValueError, TypeError), match=rf"m\.jsonl:1: .*{what}"):
            read_manifest(m)


def test_manifest_item_errors_name_the_file(tmp_path):
    short = tmp_path / "short.wav"
    save_wav(short, np.zeros(100, np.float32))
    ds = ManifestDataset([{"path": str(short), "duration": 0.0}])
    with pytest.raises(ValueError, match=r"short\.wav"):
        ds[0]
    junk = _write(tmp_path / "junk.wav", b"junk")
    ds = ManifestDataset([{"path": str(junk), "duration": 1.0}])
    with pytest.raises(ValueError, match=r"junk\.wav"):
        ds[0]
    with pytest.raises(TypeError, match="sample_rate must be an int"):
        ManifestDataset([{"path": str(junk), "duration": 1.0}], sample_rate="16k")
