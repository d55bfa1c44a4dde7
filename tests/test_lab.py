"""The lab: config validation, a real (tiny) run per task, stop, registry wiring."""

import math
import threading

import pytest
import torch

from memlab import registry
from memlab.lab import Config, Experiment, estimate_config
from memlab.memory import CATEGORIES


def test_registry_lists_every_builtin_strategy():
    assert {"vanilla", "checkpoint", "reversible", "reversible-full"} <= set(registry.names("memory"))
    assert {"sgd", "adam", "sgd8bit", "adam8bit", "adamw8bit", "lowrank-adam"} <= set(
        registry.names("optimizer"))
    assert set(registry.names("loss", "asr")) >= {"batched", "samplewise"}
    assert "samplewise" not in registry.names("loss", "speaker")


@pytest.mark.parametrize("change, match", [
    (dict(memory="nope"), "memory must be one of"),
    (dict(optimizer="adagrad9"), "optimizer must be one of"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(batch_size=2.5), "batch_size must be an int"),
    (dict(task="tts"), "task must be one of"),
    (dict(model="vgg"), "model must be one of"),
    (dict(seconds=0), "seconds must be between"),
    (dict(blocks=(1, 2)), "blocks must be 4 ints"),
    (dict(lr=-1.0), "lr must be a positive"),
])
def test_bad_config_gives_a_clear_error(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Experiment(Config.for_task("speaker").replace(**change))


def test_loss_strategy_must_fit_the_task():
    with pytest.raises(ValueError, match="does not apply to task"):
        Config(task="speaker", memory="vanilla").replace(loss="samplewise", task="asr",
                                                         memory="reversible").validate()


def test_speaker_run_yields_records_with_memory_and_metrics():
    cfg = Config.for_task("speaker", steps=4, eval_every=2, measure_every=2)
    exp = Experiment(cfg)
    records = list(exp.run())
    assert [r.step for r in records] == list(range(1, cfg.steps + 1))
    assert all(math.isfinite(r.loss) for r in records)
    metered = [r for r in records if r.metered]
    assert [r.step for r in metered] == [1, 2, 4]
    n_param_bytes = sum(p.numel() * p.element_size() for p in exp.model.parameters())
    n_buffer_bytes = sum(b.numel() * b.element_size() for b in exp.model.buffers())
    for r in metered:
        assert set(r.breakdown) == set(CATEGORIES)
        assert r.peak == sum(r.breakdown.values())
        assert r.breakdown["parameters"] == n_param_bytes + n_buffer_bytes
        assert r.breakdown["activations"] > 0
        assert len(r.timeline["index"]) == len(r.timeline["activations"]) > 10
    assert records[-1].final
    m = records[-1].metrics
    assert 0.0 <= m["eer"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0 and "min_dcf" in m
    assert records[1].metrics is not None          # eval_every=2
    assert records[0].metrics is None


def test_asr_run_yields_ter():
    cfg = Config.for_task("asr", steps=3, eval_every=3, measure_every=3)
    records = list(Experiment(cfg).run())
    assert records[-1].metrics and 0.0 <= records[-1].metrics["ter"]
    metered = [r for r in records if r.metered]
    assert all(r.breakdown["activations"] > 0 for r in metered)


def test_eval_at_start_gives_step_zero():
    cfg = Config.for_task("speaker", steps=2, eval_at_start=True)
    records = list(Experiment(cfg).run())
    assert records[0].step == 0 and "eer" in records[0].metrics


def test_stop_ends_the_run_cleanly():
    cfg = Config.for_task("speaker", steps=500, eval_every=1000, measure_every=1000)
    exp = Experiment(cfg)
    seen = []
    for r in exp.run():
        seen.append(r)
        if r.step == 3:
            exp.stop()
    assert seen[-1].step == 4 or seen[-1].step == 3
    assert seen[-1].final and seen[-1].metrics is not None


def test_budget_stops_a_run_like_an_oom():
    from memlab.memory import MemoryBudgetExceeded
    cfg = Config.for_task("speaker", steps=2, budget=1024)
    with pytest.raises(MemoryBudgetExceeded, match="over the budget"):
        list(Experiment(cfg).run())


def test_same_seed_same_losses():
    cfg = Config.for_task("speaker", steps=3)
    a = [r.loss for r in Experiment(cfg).run()]
    b = [r.loss for r in Experiment(cfg).run()]
    assert a == b


def test_estimate_config_matches_a_metered_step():
    cfg = Config.for_task("speaker", steps=1, measure_every=1)
    est = estimate_config(cfg, steps=1)
    rec = next(iter(Experiment(cfg).run()))
    # same model, same shapes: the fake-tensor estimate is within 5% of the measured peak
    # (the input batch is "other" in both)
    assert est.peak == pytest.approx(rec.peak, rel=0.05)
