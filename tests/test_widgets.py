"""MemoryLab in-process (no browser): controls -> config, runs -> figures, stop, errors, budget."""

import contextlib
import time

import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

from memlab import registry  # noqa: E402
from memlab.lab import Config, Experiment  # noqa: E402
from memlab.memory import CATEGORIES  # noqa: E402
from memlab.widgets import (CATEGORY_COLORS, MemoryLab, breakdown_figure,  # noqa: E402
                            measure_step, sweep, timeline_figure)

# tiny models: one intra-op thread avoids OpenMP spin-waits when the machine is busy
pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = dict(width=4, batch_size=2, steps=3, eval_every=3, measure_every=2, seconds=0.5)


def bars(lab):
    return len(lab.fig_breakdown.data[0].x)


def test_controls_change_config():
    lab = MemoryLab(task="speaker", **TINY)
    assert lab.config.batch_size == 2 and lab.config.width == 4 and lab.config.seconds == 0.5
    lab.w_batch.value = 7
    lab.w_depth.value = 2
    lab.w_optimizer.value = "sgd"
    lab.w_memory.value = "checkpoint"
    cfg = lab.config
    assert (cfg.batch_size, cfg.depth, cfg.optimizer, cfg.memory) == (7, 2, "sgd", "checkpoint")
    # every registered strategy for the task is offered
    assert tuple(lab.w_optimizer.options) == registry.names("optimizer", "speaker")
    assert tuple(lab.w_memory.options) == registry.names("memory", "speaker")
    # budget control -> bytes in the config
    assert cfg.budget is None
    lab.w_budget.value, lab.w_budget_unit.value = 3.0, "MiB"
    lab.w_budget_on.value = True
    assert lab.config.budget == 3 * 2 ** 20
    lab.w_budget_on.value = False
    # task switch: ASR strategies and model
    lab.w_task.value = "asr"
    cfg = lab.config
    assert cfg.task == "asr" and cfg.model_name == "transducer"
    assert tuple(lab.w_loss.options) == registry.names("loss", "asr")
    lab.w_loss.value = "samplewise"
    assert lab.config.loss == "samplewise"
    assert lab.config.seconds == 0.5          # non-control overrides survive the switch
    lab.config.validate()


def test_strategy_registered_later_appears():
    name = "test-widget-sgd"
    registry.register_optimizer(name, description="plain SGD (test)", tasks=("speaker",))(
        lambda model, lr, weight_decay=0.0, **kw: torch.optim.SGD(model.parameters(), lr=lr))
    try:
        lab = MemoryLab(task="speaker", **TINY)
        assert name in lab.w_optimizer.options
        lab.w_task.value = "asr"
        assert name not in lab.w_optimizer.options   # filtered by task
    finally:
        registry._REGISTRY["optimizer"].pop(name, None)


def test_run_updates_figures():
    lab = MemoryLab(task="speaker", **TINY)
    assert bars(lab) == 0 and not lab.runs
    records = lab.run(block=True)
    assert [r.step for r in records] == [1, 2, 3]
    assert len(lab.runs) == 1 and lab.runs[0][1] is records
    assert bars(lab) == 1
    # stacked bars by category, MiB, consistent colours
    assert [t.name for t in lab.fig_breakdown.data] == list(CATEGORIES)
    assert [t.marker.color for t in lab.fig_breakdown.data] == [CATEGORY_COLORS[c]
                                                                for c in CATEGORIES]
    peak = max(r.peak for r in records if r.metered)
    total = sum(t.y[0] for t in lab.fig_breakdown.data)
    assert total == pytest.approx(peak / 2 ** 20, rel=1e-6)
    assert "MiB" in lab.fig_breakdown.layout.yaxis.title.text
    # timeline of the latest metered step, phases shaded
    tl = lab.fig_timeline
    assert len(tl.data[0].x) > 10 and "events" in tl.layout.xaxis.title.text
    phases = {a.text for a in tl.layout.annotations}
    assert {"<i>forward</i>", "<i>backward</i>"} <= phases
    assert "step 2" in tl.layout.title.text
    # loss + metrics per run
    names = [t.name for t in lab.fig_curves.data]
    assert names == ["#1 loss", "#1 accuracy", "#1 EER"]
    assert list(lab.fig_curves.data[0].y) == [r.loss for r in records]
    assert len(lab.fig_curves.data[2].y) >= 1
    assert lab.fig_curves.layout.xaxis.title.text == "step"
    assert "#1" in lab.table.value and "done" in lab.table.value
    # a second run: a second bar, a second set of traces
    lab.w_batch.value = 4
    lab.run(block=True)
    assert bars(lab) == 2 and len(lab.fig_curves.data) == 6
    assert lab.runs[1][0].batch_size == 4
    assert sum(t.y[1] for t in lab.fig_breakdown.data) > total
    lab.clear()
    assert bars(lab) == 0 and len(lab.fig_curves.data) == 0 and not lab.runs


def test_redraws_are_throttled(monkeypatch):
    lab = MemoryLab(task="speaker", **dict(TINY, steps=12, measure_every=50))
    calls = []
    orig = lab._draw_curves
    monkeypatch.setattr(lab, "_draw_curves", lambda runs: (calls.append(time.perf_counter()),
                                                           orig(runs)))
    t0 = time.perf_counter()
    lab.run(block=True)
    elapsed = time.perf_counter() - t0
    assert len(lab.records) == 12
    # at most ~10 redraws a second, plus the forced ones at start and end
    assert len(calls) <= 10 * elapsed + 3


def test_stop_ends_run_early():
    lab = MemoryLab(task="speaker", **dict(TINY, steps=100_000, eval_every=100_000))
    records = lab.run(block=False)
    assert lab.running and not lab.w_stop.disabled
    deadline = time.perf_counter() + 60
    while len(records) < 2 and time.perf_counter() < deadline:
        time.sleep(0.02)
    assert len(records) >= 2
    t0 = time.perf_counter()
    lab.stop()
    assert lab.wait(timeout=10)
    latency = time.perf_counter() - t0
    assert latency < 1.5, f"run took {latency:.2f} s to stop"
    assert 2 <= len(records) < 100_000 and records[-1].final
    assert lab._runs[-1].status == "stopped"
    assert "stopped" in lab.table.value
    assert not lab.w_run.disabled and lab.w_stop.disabled


def test_error_in_run_is_shown(monkeypatch):
    def boom(self, batch):
        raise RuntimeError("boom in the training step")

    monkeypatch.setattr(Experiment, "_train_step", boom)
    lab = MemoryLab(task="speaker", **TINY)
    lab.run(block=False)           # background thread: nothing raised here
    assert lab.wait(timeout=60)
    assert "boom in the training step" in lab.w_status.value
    text = "".join(o.get("text", "") for o in lab.w_error.outputs)
    assert "Traceback" in text and "boom in the training step" in text
    assert isinstance(lab.last_error, RuntimeError)
    assert "error" in lab.table.value
    with pytest.raises(RuntimeError, match="boom"):   # blocking: shown and re-raised
        lab.run(block=True)
    # a button callback never raises into the kernel: the error is shown
    lab.w_batch.value = 3
    lab._safe(lambda: 1 / 0)
    assert "ZeroDivisionError" in lab.w_status.value


def test_budget_estimate_and_overrun():
    lab = MemoryLab(task="speaker", **TINY)
    lab.set(budget=10 * 2 ** 30)
    ok = lab.check_budget()
    assert ok["fits"] is True and 0 < ok["peak"] < ok["budget"]
    assert "fits" in lab.w_estimate.value and "estimated peak" in lab.w_estimate.value
    lab.set(budget=ok["peak"] // 2)
    bad = lab.check_budget()
    assert bad["fits"] is False and "would not fit" in lab.w_estimate.value
    assert lab.config.budget == pytest.approx(ok["peak"] // 2, abs=0.01 * 2 ** 20)
    # the run stops at the first metered step with MemoryBudgetExceeded, shown, not raised
    records = lab.run(block=True)
    assert records == [] and lab._runs[-1].status == "over budget"
    assert "MemoryBudgetExceeded" in lab.w_status.value
    assert any(s.name == "budget" for s in lab.fig_breakdown.layout.shapes)
    lab.set(budget=None)
    assert lab.config.budget is None
    assert not any(s.name == "budget" for s in lab.fig_breakdown.layout.shapes)


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        MemoryLab(task="vision")
    with pytest.raises(TypeError, match="batchsize"):
        MemoryLab(batchsize=3)
    lab = MemoryLab(**TINY)
    with pytest.raises(ValueError, match="optimizer"):
        lab.set(optimizer="nope")
    lab.run(block=False, steps=100_000)
    try:
        with pytest.raises(RuntimeError, match="in progress"):
            lab.run(block=False)
    finally:
        lab.stop()
        lab.wait(10)


def test_notebook_helpers():
    cfg = Config(task="speaker", width=4, batch_size=2, seconds=0.5)
    meter = measure_step(cfg, frames=40)
    bd = meter.breakdown()
    assert bd["optimizer"] > 0 and bd["activations"] > 0     # step 2: Adam state exists
    rows = sweep(cfg, "batch_size", [1, 2], frames=40)
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert rows[1]["activations"] > rows[0]["activations"]
    assert rows[1]["parameters"] == rows[0]["parameters"]
    fig = breakdown_figure(rows, xaxis_title="batch size", limit=1.0, limit_label="1 MiB")
    assert [t.name for t in fig.data] == list(CATEGORIES) and len(fig.data[0].x) == 2
    fig = timeline_figure(meter)
    assert len(fig.data) == len(CATEGORIES) and len(fig.data[0].x) > 10


def test_estimate_failure_is_shown_not_raised(monkeypatch):
    import memlab.ui.dashboard as mw

    def fail(*a, **k):
        raise RuntimeError("cannot estimate this")

    lab = MemoryLab(task="speaker", **TINY)
    monkeypatch.setattr(mw, "estimate_config", fail)
    lab.set(budget=2 ** 30)                       # control change -> estimate -> shown
    assert "could not estimate" in lab.w_estimate.value
    with pytest.raises(RuntimeError, match="cannot estimate"):
        lab.check_budget()                        # the API raises


def test_asr_run_plots_ter():
    lab = MemoryLab(task="asr", width=16, depth=1, batch_size=2, steps=2, eval_every=2,
                    measure_every=2)
    assert lab.w_loss.layout.display is None and lab.w_memory.layout.display is None
    records = lab.run(block=True, loss="samplewise")
    assert lab.runs[0][0].loss == "samplewise" and records[-1].metrics["ter"] >= 0
    assert [t.name for t in lab.fig_curves.data] == ["#1 loss", "#1 TER"]
    assert len(lab.fig_curves.data[1].y) == 1 and bars(lab) == 1
    assert "TER" in lab.fig_curves.layout.yaxis2.title.text


def test_run_summary_line():
    from memlab.lab import Record
    from memlab.widgets import run_summary
    recs = [Record(step=0, loss=2.0, seconds=0.1, lr=1e-3, metrics={"ter": 0.9},
                   peak=3 * 2**20, metered=True,
                   breakdown={"optimizer": 2**20, "activations": 0, "parameters": 0,
                              "gradients": 0, "other": 0}),
            Record(step=1, loss=1.5, seconds=0.1, lr=1e-3, metrics={"ter": 0.4})]
    line = run_summary("adam", recs, "optimizer")
    assert "peak   3.00 MiB" in line and "optimizer at the peak   1.00 MiB" in line
    assert "final loss 1.500" in line and "ter 0.900 -> 0.400" in line
    with pytest.raises(ValueError, match="category"):
        run_summary("adam", recs, "weights")
    with pytest.raises(ValueError, match="records"):
        run_summary("adam", [])


def test_headless_modules_import_neither_ipywidgets_nor_plotly():
    import subprocess
    import sys
    code = ("import sys, memlab.report, memlab.ui.measure, memlab.cli; "
            "bad = [m for m in ('ipywidgets', 'plotly') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    code = "import sys, memlab.ui.figures; assert 'ipywidgets' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_a_new_kind_appears_as_a_control():
    """A kind registered once (here, in the test) gets its own dropdown, reaches the Config and
    the training step; no edit of the dashboard."""
    from memlab import techniques

    entered = []

    @contextlib.contextmanager
    def note(step):
        entered.append(type(step.model).__name__)
        yield

    techniques.register_kind("toy-step", default="off", noop="does nothing")
    techniques.register("toy-step", "on", description="counts steps (test)", step_context=note)
    try:
        lab = MemoryLab(task="speaker", **TINY)
        w = lab.kind_controls["toy-step"]
        assert w is lab.w_toy_step and w in lab.w_kinds.children
        assert tuple(w.options) == ("off", "on") and w.layout.display is None
        assert "memlab-kind-toy-step" in w._dom_classes
        lab.set(**{"toy-step": "on"})
        assert lab.config.techniques["toy-step"] == "on" and "on" in lab.w_hint.value
        lab.run(block=True, steps=1)
        assert entered == ["SpeakerNet"]          # the step context ran around the step
        # registered after the dashboard was built: the next refresh adds a dropdown
        techniques.register_kind("toy-late", default="a", noop="nothing")
        techniques.register("toy-late", "b", description="b (test)", tasks=("asr",))
        lab.refresh_strategies()
        assert lab.w_toy_late.layout.display is None and lab.w_toy_late.disabled  # speaker: a
        lab.w_task.value = "asr"
        assert tuple(lab.w_toy_late.options) == ("a", "b")
    finally:
        techniques.unregister_kind("toy-step")
        techniques.unregister_kind("toy-late")


def test_architecture_example_runs():
    """docs/ARCHITECTURE.md's worked example, as written: the file, then its use."""
    import re
    from pathlib import Path

    from memlab import techniques

    doc = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    section = doc.split("## Worked example", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    try:
        namespace = {"TINY": TINY}
        exec(compile(blocks[0], "ARCHITECTURE.md:technique", "exec"), namespace)
        exec(compile(blocks[1].replace('task="speaker")', 'task="speaker", **TINY)'),
                     "ARCHITECTURE.md:use", "exec"), namespace)
        lab = namespace["lab"]
        assert "saved-tensors" in lab.kind_controls
        lab.set(**{"saved-tensors": "bf16"})
        assert lab.config.techniques["saved-tensors"] == "bf16"
    finally:
        techniques.unregister_kind("saved-tensors")
