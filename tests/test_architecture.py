"""The structure 'register once, appear everywhere': a technique of a new kind, defined once here,
shows up in Config validation, Experiment runs, estimate_config and `memlab compare`; tasks own
every per-task branch; one training step, random batch, peak rule and fast_mode."""

import math
import re
from pathlib import Path

import pytest
import torch

from memlab import registry, tasks, techniques
from memlab.cli import main
from memlab.lab import Config, Experiment, estimate_config, peak_record
from memlab.models import DFResNet, ResNet, Transducer

ROOT = Path(__file__).resolve().parents[1] / "memlab"


@pytest.fixture
def saved_kind():
    """Kind "saved": "count" wraps every step in saved_tensors_hooks and counts saved tensors.
    The registration is undone afterwards so no other test sees the kind."""
    count = {"saved": 0}

    def count_saved(step):
        def pack(t):
            count["saved"] += 1
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    techniques.register_kind("saved", default="none", description="saved-tensor hooks",
                             noop="autograd keeps what it keeps")
    techniques.register("saved", "count", description="count the tensors saved for backward",
                        step_context=count_saved)
    yield count
    techniques.unregister_kind("saved")
    assert "saved" not in techniques.kinds()


TINY = dict(steps=2, eval_every=2, measure_every=2, num_speakers=4, utts_per_speaker=2,
            eval_speakers=2, batch_size=2, seconds=0.5)


def test_a_new_kind_appears_in_config_experiment_and_estimate(saved_kind):
    assert "saved" in techniques.kinds()
    assert techniques.names("saved", "speaker") == ("none", "count")
    with pytest.raises(ValueError, match=r"saved must be one of \('none', 'count'\)"):
        Config.for_task("speaker", techniques={"saved": "bogus"}, **TINY).validate()
    with pytest.raises(ValueError, match="techniques: kind"):
        Config.for_task("speaker", techniques={"nonsense": "x"}, **TINY).validate()
    plain = Config.for_task("speaker", **TINY).validate()       # the default: the no-op
    assert plain.choice("saved") == "none" and plain.choices()["saved"] == "none"
    list(Experiment(plain).run())
    assert saved_kind["saved"] == 0
    cfg = Config.for_task("speaker", techniques={"saved": "count"}, **TINY).validate()
    assert cfg.label.endswith(" count")
    records = list(Experiment(cfg).run())
    assert records[-1].final and saved_kind["saved"] > 0     # the step context was entered
    before = saved_kind["saved"]
    estimate_config(cfg)                                      # the same step on fake tensors
    assert saved_kind["saved"] > before
    asr = Config.for_task("asr", techniques={"saved": "count"}, steps=1, num_utts=4,
                          eval_utts=2, batch_size=2, width=16)
    before = saved_kind["saved"]
    list(Experiment(asr).run())
    assert saved_kind["saved"] > before


def test_a_new_kind_appears_in_compare(saved_kind, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "--saved" in out and "count" in out and "saved-tensor hooks" in out
    for kind in techniques.kinds():                          # one option per kind
        assert f"--{kind}" in out
    assert main(["compare", "--saved", "count", "--steps", "2", "--json"]) == 0
    assert saved_kind["saved"] > 0
    assert main(["compare", "--saved", "nope", "--steps", "2"]) == 2
    assert "saved must be one of" in capsys.readouterr().err


def test_registry_is_a_view_of_the_techniques():
    assert registry.names("memory") == techniques.names("memory")
    assert registry.get("optimizer", "adam") is techniques.get("optimizer", "adam")
    assert registry.KINDS == techniques.kinds()
    assert techniques.names("loss", "speaker") == ()
    assert techniques.names("memory", "asr") == ("vanilla",)


def test_config_techniques_dict_sets_the_public_fields():
    cfg = Config(techniques={"memory": "checkpoint", "optimizer": "sgd"})
    assert cfg.memory == "checkpoint" and cfg.optimizer == "sgd" and cfg.techniques == {}
    assert cfg == Config(memory="checkpoint", optimizer="sgd")
    with pytest.raises(ValueError, match="contradicts"):
        Config(memory="reversible", techniques={"memory": "checkpoint"})


# ----------------------------------------------------------------------------- models
def test_models_dispatch_on_their_own_tables(monkeypatch):
    """Before: models.common kept its own copy of the names and validated against the registry,
    and ResNet/DFResNet built reversible-full for any other name that got through. Now an
    unknown name is a ValueError naming the argument and the model's choices, whatever the
    registry holds."""
    from memlab.models import common
    monkeypatch.setattr(common, "MEMORY_STRATEGIES",
                        (*getattr(common, "MEMORY_STRATEGIES", ()), "bogus"), raising=False)
    registry.register_memory("bogus", description="registered, but no model implements it")
    try:
        for net in (ResNet, DFResNet):
            with pytest.raises(ValueError, match=r"memory must be one of \('vanilla', "
                                                 r"'checkpoint', 'reversible', 'reversible-full'"):
                net(width=4, embed_dim=8, memory="bogus")
    finally:
        techniques.unregister("memory", "bogus")
    with pytest.raises(ValueError, match=r"loss must be one of \('batched', 'samplewise'"):
        Transducer(8, enc_dim=16, enc_layers=0, pred_dim=16, joint_dim=16, loss="bogus")


def test_models_take_builders():
    from memlab.models.resnet import vanilla_stage
    calls = []

    def stage(cin, c, n, stride):
        calls.append((cin, c, n, stride))
        return vanilla_stage(cin, c, n, stride)

    net = ResNet(num_blocks=(1, 1, 1, 1), width=4, embed_dim=8, memory=stage)
    assert len(calls) == 4 and net.memory == "stage"
    assert net(torch.randn(2, 20, 80)).shape == (2, 8)


def test_models_never_import_the_registry():
    for path in (ROOT / "models").glob("*.py"):
        text = path.read_text()
        assert "memlab.techniques" not in text and "memlab.registry" not in text, path


# ----------------------------------------------------------------------------- tasks
def test_tasks_registry_and_random_batch():
    assert tasks.names() == ("speaker", "asr")
    with pytest.raises(ValueError, match="task must be one of"):
        tasks.get("tts")
    cfg = Config.for_task("asr")
    feats, fl, tg, tl = tasks.get("asr").random_batch(cfg, 3, 100)
    assert feats.shape == (3, 100, 80) and tg.shape == (3, 4) and fl.tolist() == [100] * 3
    feats, labels = tasks.get("speaker").random_batch(Config(), 2, 50, num_classes=7)
    assert feats.shape == (2, 50, 80) and labels.shape == (2,) and int(labels.max()) < 7


def _sources():
    for path in ROOT.rglob("*.py"):
        yield path, path.read_text()


def test_task_branches_live_in_the_task_module():
    # a branch on a task's *name* (task == "speaker"); comparing two tasks (a scenario's with
    # the one picked) is not one. data/manifest.py (a manifest's own "task" field) is the known
    # exception
    allowed = {"tasks.py", "widgets.py", "manifest.py"}
    branch = r"task\s*[!=]=\s*[\"']|[\"']\s*[!=]=\s*\S*task\b"
    hits = [f"{p.relative_to(ROOT)}:{i}" for p, text in _sources() if p.name not in allowed
            for i, line in enumerate(text.splitlines(), 1) if re.search(branch, line)]
    assert not hits, hits


def test_one_definition_each():
    defs = {}
    for p, text in _sources():
        for name in ("train_step", "peak_record", "fast_mode", "storage_bytes"):
            if re.search(rf"^def {name}\(", text, re.M):
                defs.setdefault(name, []).append(p.name)
    assert defs == {"train_step": ["lab.py"], "peak_record": ["lab.py"],
                    "fast_mode": ["__init__.py"], "storage_bytes": ["memory.py"]}
    # random batches: one per task, nowhere else (widgets.py may keep its old helper for now)
    rb = [p.name for p, text in _sources() if re.search(r"def _?random_batch\(", text)]
    assert sorted(rb) in (["tasks.py"], ["tasks.py", "widgets.py"])
    # MEMLAB_FAST is read by memlab.fast_mode only (bench/optim.py's __main__ excepted for now)
    readers = [p.name for p, text in _sources()
               if re.search(r"environ(\.get)?\(?\[?[\"']MEMLAB_FAST", text)]
    assert sorted(readers) in (["__init__.py"], ["__init__.py", "optim.py"])


def test_peak_rule():
    from memlab.lab import Record
    recs = [Record(1, 0.0, 0.0, 0.1, metered=True, peak=9), Record(2, 0.0, 0.0, 0.1),
            Record(3, 0.0, 0.0, 0.1, metered=True, peak=5),
            Record(4, 0.0, 0.0, 0.1, metered=True, peak=5)]
    assert peak_record(recs).step == 1
    assert peak_record(recs, skip_first=True).step == 4      # latest on ties
    assert peak_record(recs[:2], skip_first=True).step == 1   # nothing later was metered
    assert peak_record(recs[1:2]) is None


def test_modules_stay_small():
    # every module of memlab/ (the issue: "about 600 lines"), and MemoryLab under about 400
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in ROOT.rglob("*.py")}
    big = {m: n for m, n in sizes.items() if n > 625}
    assert not big, big
    text = (ROOT / "ui" / "dashboard.py").read_text()
    body = text[text.index("class MemoryLab("):]
    end = re.search(r"^\S", body[1:], re.M)
    lines = len(body[: end.start() + 1 if end else len(body)].splitlines())
    assert lines <= 400, f"MemoryLab has {lines} lines"


def test_beyond_the_seeds_are_registered_and_train(one_thread):
    """4-bit Adam and the pruned losses: registered once, they train through the one step."""
    from memlab import techniques as tech
    from memlab.lab import Config, Experiment
    assert {"adam4bit", "adamw4bit"} <= set(tech.names("optimizer", "speaker"))
    assert {"pruned", "samplewise-pruned"} <= set(tech.names("loss", "asr"))
    for loss in ("pruned", "samplewise-pruned"):
        cfg = Config.for_task("asr", loss=loss, optimizer="adam4bit", steps=2, eval_every=2)
        recs = list(Experiment(cfg).run())
        assert recs[-1].final and math.isfinite(recs[-1].loss) and "ter" in recs[-1].metrics


def test_cached_corpora_do_not_depend_on_the_default_dtype():
    """Found by the distributed tests (float64 on both sides): a corpus first synthesized under a
    float64 default dtype was cached and then served to float32 runs with other utterances."""
    from memlab import tasks as t
    args = (3, 2, 2, 1.0, 12345)
    t.speaker_data.cache_clear()
    torch.set_default_dtype(torch.float64)
    try:
        a = t.speaker_data(*args)[0][0]["feats"].clone()
    finally:
        torch.set_default_dtype(torch.float32)
    t.speaker_data.cache_clear()
    b = t.speaker_data(*args)[0][0]["feats"]
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    t.speaker_data.cache_clear()
