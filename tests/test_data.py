import json
import os
import struct
import sys

import numpy as np
import pytest
import torch

from memlab.data import (
    ManifestDataset,
    SpeakerCorpus,
    TokenCorpus,
    collate_asr,
    collate_speaker,
    fbank,
    make_trials,
    read_manifest,
    write_manifest,
)
from memlab.data.audio import audio_info, load_audio, save_wav
from memlab.metrics import eer

F = torch.nn.functional
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# features and batching


def test_fbank_shape_and_normalisation():
    wave = torch.randn(16000) * 0.1  # 1 s
    f = fbank(wave)
    assert f.shape == (98, 80) and f.dtype == torch.float32  # 1 + (16000 - 400) // 160
    assert f.mean(0).abs().max() < 1e-4  # per-utterance mean normalisation
    assert torch.allclose(fbank(wave.numpy()), f)
    assert torch.allclose(fbank(wave[None]), f)


def test_fbank_validates_input():
    with pytest.raises(ValueError, match="wave must have shape"):
        fbank(torch.zeros(2, 1000))
    with pytest.raises(ValueError, match="at least one 25 ms frame"):
        fbank(torch.zeros(100))
    with pytest.raises(TypeError, match="wave must be"):
        fbank([0.0] * 1000)


def test_collate_speaker_pads_with_zeros():
    items = [{"feats": torch.ones(5, 80), "label": 3}, {"feats": torch.full((7, 80), 2.0), "label": 1}]
    feats, lengths, labels = collate_speaker(items)
    assert feats.shape == (2, 7, 80) and feats.dtype == torch.float32
    assert lengths.tolist() == [5, 7] and lengths.dtype == torch.int64
    assert labels.tolist() == [3, 1] and labels.dtype == torch.int64
    assert (feats[0, 5:] == 0).all() and (feats[0, :5] == 1).all() and (feats[1] == 2).all()


def test_collate_asr_pads_targets_with_blank():
    items = [
        {"feats": torch.ones(4, 80), "tokens": torch.tensor([3, 4])},
        {"feats": torch.ones(9, 80), "tokens": torch.tensor([5, 6, 7, 1])},
    ]
    feats, feat_lengths, targets, target_lengths = collate_asr(items)
    assert feats.shape == (2, 9, 80) and feat_lengths.tolist() == [4, 9]
    assert targets.tolist() == [[3, 4, 0, 0], [5, 6, 7, 1]] and targets.dtype == torch.int64
    assert target_lengths.tolist() == [2, 4] and target_lengths.dtype == torch.int64


def test_collate_validates_input():
    with pytest.raises(ValueError, match="items must be a non-empty list"):
        collate_speaker([])
    with pytest.raises(ValueError, match="has no 'label'"):
        collate_speaker([{"feats": torch.ones(3, 80)}])
    with pytest.raises(ValueError, match="has no 'tokens'"):
        collate_asr([{"feats": torch.ones(3, 80), "label": 0}])
    with pytest.raises(ValueError, match=r"items\[1\]\['feats'\] has 40 bins"):
        collate_speaker([{"feats": torch.ones(3, 80), "label": 0}, {"feats": torch.ones(3, 40), "label": 0}])


# ---------------------------------------------------------------------------------------------
# synthetic corpora


def test_speaker_corpus_items():
    c = SpeakerCorpus(3, 2, seconds=1.0, seed=0, speaker_offset=5)
    assert len(c) == 6 and c.labels == [0, 1, 2, 0, 1, 2]
    item = c[4]
    assert set(item) == {"feats", "label", "speaker"}
    assert item["feats"].shape == (98, 80) and item["feats"].dtype == torch.float32
    assert item["label"] == 1 and item["speaker"] == 6
    assert torch.isfinite(item["feats"]).all()
    assert c[-1]["label"] == 2
    wave = c.wave(4)
    assert wave.shape == (16000,) and wave.dtype == np.float32 and np.abs(wave).max() <= 1.0
    with pytest.raises(IndexError, match="index must be in"):
        c[6]


def test_speaker_corpus_is_deterministic_from_the_seed():
    a = SpeakerCorpus(2, 2, seconds=0.5, seed=3)
    b = SpeakerCorpus(2, 2, seconds=0.5, seed=3, cache=False)
    c = SpeakerCorpus(2, 2, seconds=0.5, seed=4)
    for i in range(len(a)):
        assert torch.equal(a[i]["feats"], b[i]["feats"])
        assert not torch.allclose(a[i]["feats"], c[i]["feats"], atol=1e-2)
    assert a[1]["feats"] is a[1]["feats"]  # cached
    assert not torch.allclose(a[0]["feats"], a[2]["feats"], atol=1e-2)  # same speaker, other utterance


def test_voices_depend_on_speaker_id_only_and_offsets_are_disjoint():
    a = SpeakerCorpus(4, 1, seconds=0.5, seed=0)
    b = SpeakerCorpus(4, 1, seconds=0.5, seed=9)
    c = SpeakerCorpus(4, 1, seconds=0.5, seed=0, speaker_offset=4)
    assert a.voices == b.voices  # train / test split of the same speakers
    assert {v.speaker for v in a.voices}.isdisjoint(v.speaker for v in c.voices)
    params = lambda vs: {(v.f0, v.vtl, v.tilt_db) for v in vs}  # noqa: E731
    assert params(a.voices).isdisjoint(params(c.voices))
    assert len(params(a.voices)) == 4  # every speaker has its own voice
    f0s = [v.f0 for v in SpeakerCorpus(40, 1, seconds=0.5).voices]
    assert 70 < min(f0s) and max(f0s) < 350 and np.std(np.log(f0s)) > 0.2  # spread like adults


def test_token_corpus_items():
    c = TokenCorpus(6, vocab_size=10, tokens_per_utt=(2, 4), seed=1, speaker_offset=100, num_speakers=3)
    for i in range(len(c)):
        item = c[i]
        t = item["tokens"]
        assert t.dtype == torch.int64 and t.dim() == 1 and 2 <= len(t) <= 4
        assert t.min() >= 1 and t.max() <= 9  # 0 is the blank, never spoken
        assert item["feats"].dim() == 2 and item["feats"].shape[1] == 80
        assert item["speaker"] == 100 + i % 3
        align = c.alignment(i)
        assert align.shape == (len(t), 2)
        assert (align[:, 1] > align[:, 0]).all() and (align[1:, 0] >= align[:-1, 1]).all()
        assert align.max() <= item["feats"].shape[0]
        # tokens last 80-200 ms: 8-20 frames of 10 ms, give or take the frame edges
        assert ((align[:, 1] - align[:, 0] >= 7) & (align[:, 1] - align[:, 0] <= 21)).all()
    d = TokenCorpus(6, vocab_size=10, tokens_per_utt=(2, 4), seed=1, speaker_offset=100, num_speakers=3)
    assert torch.equal(c[2]["feats"], d[2]["feats"]) and torch.equal(c[2]["tokens"], d[2]["tokens"])
    e = TokenCorpus(6, vocab_size=10, tokens_per_utt=(2, 4), seed=2, speaker_offset=100, num_speakers=3)
    assert any(not torch.equal(c[i]["tokens"], e[i]["tokens"]) for i in range(6))
    assert len(TokenCorpus(3, tokens_per_utt=5)[0]["tokens"]) == 5


def test_lengths_without_synthesis_match_the_items():
    """lengths(i) reads an utterance's fbank frames and token count off its plan: the shapes of
    the synthesised item, for both token corpora; negative indices as items; speakers have none."""
    from memlab.data import SyllableCorpus
    for c in (TokenCorpus(5, vocab_size=10, seed=3, cache=False),
              SyllableCorpus(5, vocab_size=100, seconds=2.0, seed=4, cache=False)):
        for i in range(len(c)):
            item = c[i]
            assert c.lengths(i) == (item["feats"].shape[0], len(item["tokens"]))
        assert c.lengths(-1) == c.lengths(len(c) - 1)
        with pytest.raises(IndexError, match="index must be in"):
            c.lengths(len(c))
    with pytest.raises(NotImplementedError, match="SpeakerCorpus has no token lengths"):
        SpeakerCorpus(2, 2, seconds=0.5).lengths(0)


def test_collate_real_corpus_items():
    c = TokenCorpus(4, seed=0)
    feats, feat_lengths, targets, target_lengths = collate_asr([c[i] for i in range(4)])
    assert feats.shape[0] == 4 and feats.shape[1] == int(feat_lengths.max())
    assert targets.shape == (4, int(target_lengths.max()))
    s = SpeakerCorpus(2, 2, seconds=0.5)
    feats, lengths, labels = collate_speaker([s[i] for i in range(4)])
    assert feats.shape == (4, 48, 80) and lengths.tolist() == [48] * 4 and labels.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: SpeakerCorpus(0, 1), ValueError, "num_speakers must be >= 2, got 0"),
        (lambda: SpeakerCorpus(2, 0), ValueError, "utts_per_speaker must be >= 1, got 0"),
        (lambda: SpeakerCorpus(2.5, 1), TypeError, "num_speakers must be an int, got float"),
        (lambda: SpeakerCorpus(2, 1, seconds=0.01), ValueError, "seconds must be >= 0.1, got 0.01"),
        (lambda: SpeakerCorpus(2, 1, seed=-1), ValueError, "seed must be >= 0, got -1"),
        (lambda: SpeakerCorpus(2, 1, speaker_offset=-3), ValueError, "speaker_offset must be >= 0, got -3"),
        (lambda: TokenCorpus(0), ValueError, "num_utts must be >= 1, got 0"),
        (lambda: TokenCorpus(2, vocab_size=1), ValueError, "vocab_size must be >= 2, got 1"),
        (lambda: TokenCorpus(2, vocab_size=1000), ValueError, "vocab_size must be <= 64, got 1000"),
        (lambda: TokenCorpus(2, tokens_per_utt=(5, 3)), ValueError, r"tokens_per_utt\[1\] must be >= 5, got 3"),
        (lambda: TokenCorpus(2, tokens_per_utt=(0, 3)), ValueError, r"tokens_per_utt\[0\] must be >= 1, got 0"),
        (lambda: TokenCorpus(2, tokens_per_utt="3"), TypeError, "tokens_per_utt must be an int or a"),
        (lambda: TokenCorpus(2, num_speakers=0), ValueError, "num_speakers must be >= 1, got 0"),
    ],
)
def test_corpus_errors_name_the_argument(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_make_trials():
    labels = [0, 0, 0, 1, 1, 1, 2, 2]
    trials = make_trials(labels, 10, seed=0)
    assert len(trials) == 10 and sum(t for *_, t in trials) == 5
    assert all(i != j and (labels[i] == labels[j]) == t for i, j, t in trials)
    assert len({(i, j) for i, j, _ in trials}) == 10  # no pair twice
    assert make_trials(labels, 10, seed=0) == trials
    assert make_trials(labels, 10, seed=1) != trials
    assert len(make_trials(torch.tensor(labels), 7, seed=0)) == 7
    with pytest.raises(ValueError, match="num_trials must be <= 15 for these labels"):
        make_trials(labels, 16)  # 7 distinct target pairs exist
    with pytest.raises(ValueError, match="num_trials must be >= 2, got 0"):
        make_trials(labels, 0)
    with pytest.raises(ValueError, match="labels must be a 1-D sequence"):
        make_trials([0], 2)


# ---------------------------------------------------------------------------------------------
# learnability: the speaker task can be learned, but not by a trivial model


def _pooled(feats):
    """Mean of the louder half of the frames and std of all frames, (160,). The plain mean is 0:
    fbank is mean-normalised per utterance."""
    energy = feats.mean(1)  # (T,)
    return torch.cat([feats[energy >= energy.median()].mean(0), feats.std(0)])


def _pool_corpus(c):
    return torch.stack([_pooled(c[i]["feats"]) for i in range(len(c))]).double(), torch.tensor(c.labels)


def test_speaker_task_is_learnable_but_not_trivial(capsys):
    ns = 30
    x, y = _pool_corpus(SpeakerCorpus(ns, 6, seed=0))  # 6 training utterances per speaker
    xh, yh = _pool_corpus(SpeakerCorpus(ns, 2, seed=1))  # held-out utterances, same speakers
    xu, yu = _pool_corpus(SpeakerCorpus(8, 6, seed=2, speaker_offset=1000))  # unseen speakers
    mu, sd = x.mean(0), x.std(0)
    z, zh, zu = (x - mu) / sd, (xh - mu) / sd, (xu - mu) / sd

    # closed set: ridge-regression linear classifier on the pooled features
    one = lambda a: torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)  # noqa: E731
    w = torch.linalg.solve(one(z).T @ one(z) + 10 * torch.eye(161, dtype=z.dtype), one(z).T @ F.one_hot(y, ns).to(z))
    acc = (one(zh) @ w).argmax(1).eq(yh).double().mean().item()

    # open set: LDA learned on the training speakers, cosine scoring of unseen speakers
    means = torch.stack([z[y == k].mean(0) for k in range(ns)])  # (ns, 160)
    within = (z - means[y]).T @ (z - means[y]) / len(z) + 0.05 * torch.eye(160, dtype=z.dtype)
    li = torch.linalg.inv(torch.linalg.cholesky(within))
    _, vecs = torch.linalg.eigh(li @ (means.T @ means / ns) @ li.T)
    proj = li.T @ vecs[:, -10:]  # (160, 10)
    trials = make_trials(yu.tolist(), 240, seed=0)

    def trial_eer(e):
        e = F.normalize(e, dim=1)
        return eer([float(e[i] @ e[j]) for i, j, _ in trials], [t for *_, t in trials])

    eer_raw, eer_lda = trial_eer(zu), trial_eer(zu @ proj)
    with capsys.disabled():
        print(f"\n[speaker] linear acc {acc:.3f} (chance {1 / ns:.3f}); unseen EER raw cosine {eer_raw:.3f}, LDA cosine {eer_lda:.3f}")
    assert 4 / ns < acc < 0.9  # far above chance, far from perfect
    assert 0.02 < eer_lda < 0.40  # learnable for unseen speakers, not trivial
    assert eer_lda < eer_raw  # the speaker cue has to be learned: raw features are mostly content


def test_tokens_are_learnable_across_speakers(capsys):
    def segments(c):
        xs, ys = [], []
        for i in range(len(c)):
            f = c[i]["feats"]
            for (s, e), t in zip(c.alignment(i).tolist(), c[i]["tokens"].tolist()):
                xs.append(f[s:e].mean(0))
                ys.append(t)
        return torch.stack(xs), torch.tensor(ys)

    vocab = 16
    x, y = segments(TokenCorpus(60, vocab_size=vocab, seed=0))
    templates = F.normalize(torch.stack([x[y == k].mean(0) for k in range(1, vocab)]), dim=1)
    accs = []
    for c in (TokenCorpus(25, vocab_size=vocab, seed=1), TokenCorpus(25, vocab_size=vocab, seed=1, speaker_offset=1000, num_speakers=1)):
        xt, yt = segments(c)
        accs.append(((F.normalize(xt, dim=1) @ templates.T).argmax(1) + 1).eq(yt).double().mean().item())
    with capsys.disabled():
        print(f"\n[tokens] template acc seen speakers {accs[0]:.3f}, unseen speaker {accs[1]:.3f} (chance {1 / (vocab - 1):.3f})")
    assert min(accs) > 4 / (vocab - 1)
    assert max(accs) < 0.95


# ---------------------------------------------------------------------------------------------
# audio files and manifests


def _tone(seconds, rate=16000, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _fake_flac(path, rate=16000, frames=12345):
    """A FLAC file with only its STREAMINFO block (enough for audio_info)."""
    bits = (rate << 44) | (0 << 41) | (15 << 36) | frames  # rate, channels-1, bps-1, total samples
    info = b"\x10\x00\x10\x00" + b"\x00" * 6 + bits.to_bytes(8, "big") + b"\x00" * 16
    with open(path, "wb") as f:
        f.write(b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info)


def test_audio_roundtrip_and_info(tmp_path):
    p = tmp_path / "a.wav"
    save_wav(p, _tone(0.5))
    assert audio_info(p) == (8000, 16000)
    x = load_audio(p)
    assert x.shape == (8000,) and x.dtype == torch.float32
    assert np.allclose(x.numpy(), _tone(0.5), atol=1e-4)
    save_wav(tmp_path / "b.wav", _tone(0.5, rate=8000), sample_rate=8000)
    assert load_audio(tmp_path / "b.wav").shape == (8000,)  # resampled to 16 kHz
    _fake_flac(tmp_path / "c.flac", rate=16000, frames=12345)
    assert audio_info(tmp_path / "c.flac") == (12345, 16000)
    with pytest.raises(FileNotFoundError, match="path does not exist"):
        load_audio(tmp_path / "missing.wav")


def test_manifest_dataset(tmp_path):
    (tmp_path / "audio").mkdir()
    entries = []
    for k, (spk, text) in enumerate([("bob", "hi there"), ("amy", "it's"), ("bob", "go")]):
        save_wav(tmp_path / "audio" / f"{k}.wav", _tone(0.3 + 0.1 * k, freq=200 + 100 * k))
        entries.append({"path": f"audio/{k}.wav", "duration": 0.3 + 0.1 * k, "speaker": spk, "text": text})
    manifest = tmp_path / "m.jsonl"
    assert write_manifest(manifest, entries) == 3
    read = read_manifest(manifest)
    assert read[0]["path"] == str(tmp_path / "audio" / "0.wav") and read[2]["text"] == "go"

    ds = ManifestDataset(manifest, task="speaker")
    assert ds.speakers == ["amy", "bob"] and ds.labels == [1, 0, 1]
    item = ds[0]
    assert item["feats"].shape == (28, 80) and item["feats"].dtype == torch.float32
    assert item["label"] == item["speaker"] == 1
    assert item["tokens"].tolist() == [10, 11, 1, 22, 10, 7, 20, 7]  # h i _ t h e r e
    feats, lengths, labels = collate_speaker([ds[i] for i in range(3)])
    assert lengths.tolist() == [28, 38, 48] and labels.tolist() == [1, 0, 1]
    asr = ManifestDataset(manifest, task="asr", max_seconds=0.3)
    feats, feat_lengths, targets, target_lengths = collate_asr([asr[i] for i in range(3)])
    assert feat_lengths.tolist() == [28, 28, 28] and target_lengths.tolist() == [8, 4, 2]
    assert asr[1]["tokens"].tolist() == [11, 22, 2, 21]  # i t ' s
    # a test set shares the training labels
    test = ManifestDataset([{"path": str(tmp_path / "audio" / "1.wav"), "duration": 0.4, "speaker": "bob", "tokens": [3, 4]}],
                           speakers=ds.speakers)
    assert test[0]["label"] == 1 and test[0]["tokens"].tolist() == [3, 4]


def test_manifest_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.wav", "duration": 1.0}\n{"path": "b.wav"\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_manifest(bad)
    bad.write_text('{"path": "a.wav"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: 'duration' must be a number"):
        read_manifest(bad)
    with pytest.raises(ValueError, match="task='speaker' needs a 'speaker'"):
        ManifestDataset([{"path": "a.wav", "duration": 1.0}], task="speaker")
    with pytest.raises(ValueError, match="task must be one of"):
        ManifestDataset([{"path": "a.wav", "duration": 1.0}], task="kws")
    with pytest.raises(ValueError, match="'tokens' must be a list of ints >= 1"):
        write_manifest(tmp_path / "x.jsonl", [{"path": "a.wav", "duration": 1.0, "tokens": [0, 1]}])
    ds = ManifestDataset([{"path": "a.wav", "duration": 1.0, "text": "héllo"}])
    with pytest.raises(ValueError, match="character 'é' that is not in vocab"):
        ds.encode("héllo")


# ---------------------------------------------------------------------------------------------
# data_scripts on tiny fake corpora


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "data_scripts"))
    import importlib

    return lambda name: importlib.import_module(name)


def test_prepare_voxceleb1(tmp_path, scripts):
    root = tmp_path / "vox1" / "wav"
    for spk, vid in [("id10001", "abc"), ("id10001", "def"), ("id10270", "xyz")]:
        (root / spk / vid).mkdir(parents=True)
        save_wav(root / spk / vid / "00001.wav", _tone(0.5))
    trials = tmp_path / "veri.txt"
    trials.write_text("1 id10001/abc/00001.wav id10001/def/00001.wav\n0 id10001/abc/00001.wav id10270/xyz/00001.wav\n")
    out = tmp_path / "out"
    n = scripts("prepare_voxceleb1").main(["--root", str(tmp_path / "vox1"), "--out-dir", str(out), "--trials", str(trials)])
    assert n == 3
    dev, test = read_manifest(out / "dev.jsonl"), read_manifest(out / "test.jsonl")
    assert [e["speaker"] for e in dev] == ["id10001", "id10001"] and test[0]["speaker"] == "id10270"
    assert dev[0]["duration"] == 0.5
    lines = [json.loads(line) for line in open(out / "trials.jsonl")]
    assert [t["target"] for t in lines] == [True, False] and lines[1]["test"] == test[0]["path"]
    assert ManifestDataset(out / "dev.jsonl", task="speaker")[1]["feats"].shape == (48, 80)


def test_prepare_librispeech(tmp_path, scripts):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    chapter.mkdir(parents=True)
    _fake_flac(chapter / "84-121123-0000.flac", frames=32000)
    _fake_flac(chapter / "84-121123-0001.flac", frames=8000)
    (chapter / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS\n")
    out = tmp_path / "out"
    assert scripts("prepare_librispeech").main(["--root", str(tmp_path / "LibriSpeech"), "--out-dir", str(out)]) == 2
    es = read_manifest(out / "dev-clean.jsonl")
    assert [(e["duration"], e["speaker"], e["text"]) for e in es] == [(2.0, "84", "GO DO YOU HEAR"), (0.5, "84", "BUT IN LESS")]
    with pytest.raises(SystemExit, match="--subsets not found"):
        scripts("prepare_librispeech").main(["--root", str(tmp_path / "LibriSpeech"), "--subsets", "train-other-500"])


def test_prepare_speech_commands(tmp_path, scripts):
    root = tmp_path / "sc"
    for word, name in [("yes", "aa11_nohash_0.wav"), ("yes", "bb22_nohash_0.wav"), ("no", "aa11_nohash_1.wav"),
                       ("_background_noise_", "noise.wav")]:
        (root / word).mkdir(parents=True, exist_ok=True)
        save_wav(root / word / name, _tone(0.25))
    (root / "validation_list.txt").write_text("yes/bb22_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("no/aa11_nohash_1.wav\n")
    out = tmp_path / "out"
    assert scripts("prepare_speech_commands").main(["--root", str(root), "--out-dir", str(out)]) == 3
    train, val, test = (read_manifest(out / f"{s}.jsonl") for s in ("train", "validation", "test"))
    assert [(e["speaker"], e["text"]) for e in train] == [("aa11", "yes")]
    assert val[0]["speaker"] == "bb22" and test[0]["text"] == "no" and test[0]["duration"] == 0.25
    with pytest.raises(SystemExit, match="--root must be an existing folder"):
        scripts("prepare_speech_commands").main(["--root", str(tmp_path / "nope")])
