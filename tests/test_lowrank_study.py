"""The low-rank personalization study (memlab.bench.lowrank) and the lab fields it relies on
(Config.init_from, Config.adapt_speaker). Fast mode: a width-128 model, seconds of work."""

import math
import os

import pytest
import torch

from memlab import tasks
from memlab.bench import lowrank as study
from memlab.lab import Config, Experiment, _asr_data, build_model, load_init
from memlab.memory import CATEGORIES

# pytest-xdist (-n 2 --dist loadgroup): its module fixtures are built once
pytestmark = pytest.mark.xdist_group("test_lowrank_study")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One pretrained fast model for the whole module, in a private cache folder."""
    folder = tmp_path_factory.mktemp("memlab-cache")
    old = os.environ.get("MEMLAB_CACHE_DIR")
    os.environ["MEMLAB_CACHE_DIR"] = str(folder)
    study._PRETRAINED.clear()
    yield folder
    study._PRETRAINED.clear()
    if old is None:
        os.environ.pop("MEMLAB_CACHE_DIR", None)
    else:
        os.environ["MEMLAB_CACHE_DIR"] = old


# ----------------------------------------------------------------------------- the study
def test_study_rows_and_memory_ordering(cache):
    rows = study.run(fast=True, ranks=(1, 4))
    assert [(r["method"], r["rank"]) for r in rows] == [
        ("momentum", None), ("adam", None), ("lowrank-adam", 1), ("lowrank-adam", 4)]
    by = {(r["method"], r["rank"]): r for r in rows}
    adam, mom = by[("adam", None)], by[("momentum", None)]
    for r in rows:
        assert r["peak_bytes"] == sum(r[c] for c in CATEGORIES)
        assert r["parameters"] > 0 and r["activations"] > 0
        assert 0 <= r["ter_before"] and 0 <= r["ter_after"] and math.isfinite(r["final_loss"])
        assert r["steps"] == study.ADAPT_FAST["steps"]
    # weight-sized state: Adam 2 copies, momentum 1, low rank a fraction
    assert adam["optimizer"] > mom["optimizer"] > by[("lowrank-adam", 4)]["optimizer"]
    for r in (1, 4):
        low = by[("lowrank-adam", r)]
        assert low["peak_bytes"] < adam["peak_bytes"]
        assert low["grad_opt_bytes"] < mom["grad_opt_bytes"] < adam["grad_opt_bytes"]
    assert by[("lowrank-adam", 1)]["grad_opt_bytes"] < by[("lowrank-adam", 4)]["grad_opt_bytes"]
    assert adam["peak_vs_adam"] == 1.0
    checks = study.check(rows)
    assert [c["rank"] for c in checks] == [1, 4]
    assert all(c["saving_vs_adam"] > 0 and isinstance(c["ter_ok"], bool) for c in checks)


def test_pretrained_is_cached(cache, monkeypatch):
    path, info = study.pretrained(fast=True)
    assert os.path.isfile(path) and str(cache) in path and 0 <= info["ter"]
    study._PRETRAINED.clear()                               # a new process: the file is reused

    def boom(*a, **k):
        raise AssertionError("pretrained() trained again instead of using the cache")

    monkeypatch.setattr(study, "Experiment", boom)
    assert study.pretrained(fast=True) == (path, info)
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_personalization_config_is_a_lab_preset(cache):
    cfg = study.personalization_config("lowrank-adam", rank=2, fast=True, steps=3)
    assert cfg.adapt_speaker == study.ADAPT_SPEAKER and os.path.isfile(cfg.init_from)
    assert cfg.optimizer == "lowrank-adam"
    assert cfg.optimizer_kwargs == {"rank": 2, "other_lr": study.OTHER_LR}
    assert "r2" in cfg.label and f"spk{study.ADAPT_SPEAKER}" in cfg.label
    records = list(Experiment(cfg).run())
    assert records[0].step == 0 and "ter" in records[0].metrics      # TER before adaptation
    assert records[-1].final and "ter" in records[-1].metrics
    over = study.lab_overrides(cfg)
    assert Config(**over) == cfg
    with pytest.raises(ValueError, match="method"):
        study.personalization_config("adagrad")
    with pytest.raises(ValueError, match="rank"):
        study.personalization_config("lowrank-adam", rank=0)


def test_sweep_uses_the_training_split_only(cache):
    rows = study.sweep_lr("sgd", None, (1e-3, 3e-3), fast=True)
    assert [r["lr"] for r in rows] == [1e-3, 3e-3]
    assert sum(r["chosen"] for r in rows) == 1
    exp = Experiment(study.personalization_config("sgd", None, fast=True, dev_fold=3))
    exp._setup()
    full = tasks.get("asr").data(exp.config.replace(dev_fold=None))      # the cached splits
    train, test = full.train, full.evaluation["test"]
    ids = {id(x) for x in train}
    assert all(id(x) in ids for x in exp._train + exp._test)          # never the test split
    assert not any(id(x) in ids for x in test)
    cfg = study.personalization_config("sgd", None, fast=True)
    folds = []
    for fold in range(4):                                             # rotating dev quarters
        exp = Experiment(cfg.replace(dev_fold=fold))
        exp._setup()
        dev = {tuple(x["tokens"].tolist()) for x in exp._test}
        assert not dev & {tuple(x["tokens"].tolist()) for x in exp._train}
        assert len(exp._train) + len(exp._test) == cfg.num_utts
        folds.append(dev)
    assert all(not a & b for i, a in enumerate(folds) for b in folds[i + 1:])


def test_bad_study_args():
    with pytest.raises(ValueError, match="ranks"):
        study.run(fast=True, ranks=(0,))
    with pytest.raises(ValueError, match="methods"):
        study.run(fast=True, methods=("rmsprop",))
    with pytest.raises(ValueError, match="speakers"):
        study.run(fast=True, speakers=(3,))
    with pytest.raises(ValueError, match="preset"):
        study.run(fast=True, preset="paper")


def test_several_speakers_average_the_ter(cache):
    rows = study.run(fast=True, ranks=(2,), methods=("lowrank-adam",), speakers=(1000, 1001))
    one = [study.run(fast=True, ranks=(2,), methods=("lowrank-adam",), speakers=(s,))[0]
           for s in (1000, 1001)]
    assert rows[0]["speakers"] == 2
    assert rows[0]["ter_after"] == pytest.approx((one[0]["ter_after"] + one[1]["ter_after"]) / 2)
    assert rows[0]["peak_bytes"] == one[0]["peak_bytes"]


# ----------------------------------------------------------------------------- notebook helpers
def test_memory_vs_rank_matches_the_prediction():
    rows = study.memory_vs_rank(64, 96, ranks=(1, 4, 64), batch=2)
    assert [r["rank"] for r in rows] == [None, 1, 4, 64]
    for r in rows:   # torch Adam also keeps its step counter as a 4-byte tensor
        assert 0 <= r["measured_bytes"] - r["predicted_bytes"] <= (4 if r["rank"] is None else 0)
    assert rows[0]["predicted_bytes"] == 3 * 4 * 64 * 96
    assert rows[1]["ratio"] == pytest.approx((64 + 96) / (64 * 96), rel=1e-3)
    assert rows[-1]["ratio"] == pytest.approx(1.0, rel=1e-3)        # full rank: exactly Adam


def test_gradient_spectra(cache):
    rows = study.gradient_spectra(fast=True, batch_size=2)
    assert rows and all(r["sv"][0] == pytest.approx(1.0) for r in rows)
    for r in rows:
        assert all(a >= b - 1e-12 for a, b in zip(r["sv"], r["sv"][1:]))
        assert len(r["sv"]) == min(r["shape"])
        assert 1 <= r["energy_rank_90"] <= len(r["sv"])
        assert 0 < r["energy_at"][1] <= r["energy_at"][4] <= r["energy_at"][16] <= 1 + 1e-9


# ----------------------------------------------------------------------------- lab.py fields
def _tiny_asr(**kw):
    base = dict(width=16, depth=1, steps=2, num_utts=4, eval_utts=2, batch_size=2, eval_every=2,
                measure_every=2)
    return Config.for_task("asr", **{**base, **kw})


def test_init_from_loads_the_weights_before_training(tmp_path):
    cfg = _tiny_asr(seed=3)
    torch.manual_seed(123)
    src = build_model(cfg)
    path = tmp_path / "init.pt"
    torch.save(src.state_dict(), path)
    exp = Experiment(cfg.replace(init_from=str(path), steps=1))
    exp._setup()
    for (n, a), b in zip(exp.model.state_dict().items(), src.state_dict().values()):
        assert torch.equal(a, b), n
    plain = Experiment(cfg)
    plain._setup()
    assert not torch.equal(plain.model.joiner.out.weight, src.joiner.out.weight)
    list(Experiment(cfg.replace(init_from=path)).run())       # a PathLike works too


def test_init_from_errors(tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        _tiny_asr(init_from=str(tmp_path / "missing.pt")).validate()
    with pytest.raises(TypeError, match="init_from"):
        _tiny_asr(init_from=3).validate()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="init_from: could not load"):
        load_init(build_model(_tiny_asr()), bad)
    other = tmp_path / "other.pt"
    torch.save(build_model(_tiny_asr(width=32)).state_dict(), other)
    with pytest.raises(ValueError, match="does not fit"):
        Experiment(_tiny_asr(init_from=str(other)))._setup()
    partial = tmp_path / "partial.pt"
    sd = build_model(_tiny_asr()).state_dict()
    sd.pop("joiner.out.bias")
    torch.save(sd, partial)
    with pytest.raises(ValueError, match="missing keys"):
        load_init(build_model(_tiny_asr()), partial)


def test_adapt_speaker_data_and_errors():
    cfg = _tiny_asr(adapt_speaker=1234)
    exp = Experiment(cfg)
    exp._setup()
    assert {x["speaker"] for x in exp._train} == {1234} == {x["speaker"] for x in exp._test}
    default = Experiment(_tiny_asr())
    default._setup()
    assert 1234 not in {x["speaker"] for x in default._train}
    assert "spk1234" in cfg.label and "spk" not in _tiny_asr().label
    with pytest.raises(ValueError, match="adapt_speaker"):
        _tiny_asr(adapt_speaker=-1).validate()
    with pytest.raises(TypeError, match="adapt_speaker"):
        _tiny_asr(adapt_speaker=True).validate()
    with pytest.raises(TypeError, match="adapt_speaker"):
        _tiny_asr(adapt_speaker="7").validate()
    with pytest.raises(ValueError, match="adapt_speaker applies to task='asr'"):
        Config.for_task("speaker", adapt_speaker=3).validate()


def test_dev_fold_errors():
    with pytest.raises(ValueError, match="dev_fold applies to task='asr'"):
        Config.for_task("speaker", dev_fold=0).validate()
    with pytest.raises(TypeError, match="dev_fold"):
        _tiny_asr(dev_fold=True).validate()
    with pytest.raises(ValueError, match="dev_fold"):
        _tiny_asr(dev_fold=-1).validate()


def test_defaults_unchanged():
    cfg = Config()
    assert cfg.init_from is None and cfg.adapt_speaker is None
    assert {x["speaker"] for x in _asr_data(16, 2, 12, 0)[0]} == set(range(8))
