"""The dashboard's scenarios: the picker, the ratio to the baseline run, the full-size line and
the planner box (headless: widgets driven from code, MEMLAB_FAST=1 from conftest)."""

import html
import re
import threading

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

from memlab import planner, scenarios  # noqa: E402
from memlab.lab import peak_record  # noqa: E402
from memlab.ui.dashboard import FULL_SIZE_WAIT, format_ratio  # noqa: E402
from memlab.widgets import MemoryLab  # noqa: E402

# tiny models: one intra-op thread avoids OpenMP spin-waits when the machine is busy
pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = dict(width=4, batch_size=2, steps=3, eval_every=3, measure_every=2, seconds=0.5)


def same_config(a, b):
    """Equal as runs: every field, the choices of every kind, the model (None = the default)."""
    skip = {"techniques", "model"}
    diff = {f: (getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__
            if f not in skip and getattr(a, f) != getattr(b, f)}
    assert not diff
    assert a.choices() == b.choices() and a.model_name == b.model_name


def text(w):
    """What an HTML widget says: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]*>", "", w.value))


def test_picker_lists_scenarios_and_sets_config():
    lab = MemoryLab(task="speaker", **TINY)
    try:
        assert tuple(lab.w_scenario.options) == ("(none)", *scenarios.names())
        assert lab.w_scenario.value == "(none)" and lab.scenario is None
        assert lab.w_full_size.value == ""
        lab.w_optimizer.value = "sgd8bit"                 # a current choice is kept
        lab.w_scenario.value = "optimizer-bound"
        want = scenarios.config("optimizer-bound", optimizer="sgd8bit")
        same_config(lab.config, want)
        assert lab.scenario == "optimizer-bound" and lab.config.optimizer == "sgd8bit"
        assert (lab.w_batch.value, lab.w_width.value, lab.w_steps.value) == (
            want.batch_size, want.width, want.steps)
        s = scenarios.get("optimizer-bound")
        assert s.title in text(lab.w_scenario_info) and s.description in text(lab.w_scenario_info)
        # an ASR scenario switches the task too
        lab.w_scenario.value = "long-utterances"
        same_config(lab.config, scenarios.config("long-utterances", optimizer="sgd8bit"))
        assert lab.w_task.value == "asr" and lab.scenario == "long-utterances"
        assert lab.config.vocab_size == scenarios.config("long-utterances").vocab_size
        # another task leaves the scenario; "(none)" is the task's defaults
        lab.w_task.value = "speaker"
        assert lab.scenario is None and lab.w_scenario.value == "(none)"
        assert lab.config.seconds == 0.5 and lab.config.width == 4
        lab.w_scenario.value = "deep-speaker"
        assert lab.w_depth.disabled
        assert lab.config.blocks == scenarios.config("deep-speaker").blocks
        lab.w_optimizer.value = "sgd8bit"
        same_config(lab.config, scenarios.config("deep-speaker", optimizer="sgd8bit"))
        lab.w_scenario.value = "(none)"
        assert lab.scenario is None and lab.config.blocks is None and lab.config.width == 4
        assert lab.config.optimizer == "sgd8bit"
    finally:
        assert lab.wait_estimates(180)


def test_constructor_and_set_take_a_scenario():
    lab = MemoryLab(scenario="deep-speaker", steps=2)
    try:
        assert lab.scenario == "deep-speaker" and lab.w_scenario.value == "deep-speaker"
        same_config(lab.config, scenarios.config("deep-speaker", steps=2))
        lab.set(scenario="everything", memory="reversible-full", optimizer="adam8bit")
        assert lab.scenario == "everything"
        same_config(lab.config, scenarios.config("everything", memory="reversible-full",
                                                 optimizer="adam8bit"))
        lab.set(scenario=None)
        assert lab.scenario is None and lab.w_scenario.value == "(none)"
        assert MemoryLab(task="asr", scenario="long-utterances").config.task == "asr"
    finally:
        assert lab.wait_estimates(180)


def test_invalid_scenario_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match="scenario") as e:
        MemoryLab(scenario="deep-speakers")
    assert all(n in str(e.value) for n in scenarios.names())
    with pytest.raises(ValueError, match="task"):
        MemoryLab(task="asr", scenario="deep-speaker")
    lab = MemoryLab(**TINY)
    before = lab.config
    with pytest.raises(ValueError, match="scenario") as e:
        lab.set(scenario="nope", batch_size=3)
    assert all(n in str(e.value) for n in scenarios.names())
    assert lab.scenario is None and lab.config == before


def test_ratio_to_the_baseline_run():
    assert format_ratio(100, 50, "vanilla") == "2.0x less than vanilla"
    assert format_ratio(100, 80, "vanilla") == "1.25x less than vanilla"
    assert format_ratio(50, 100, "vanilla") == "2.0x more than vanilla"
    lab = MemoryLab(scenario="deep-speaker", steps=2, eval_every=2, measure_every=1)
    lab.run(block=True, memory="reversible")
    # no baseline yet: say what to run, invent no number
    assert "run the baseline (memory=vanilla) to compare" in text(lab.w_status)
    assert "run the baseline (memory=vanilla) to compare" in text(lab.table)
    base = lab.run(block=True, memory="vanilla")
    assert "baseline" in text(lab.w_status)
    rev = lab.runs[0][1]
    ratio = peak_record(base).peak / peak_record(rev).peak
    assert ratio > 1.5                       # reversible blocks keep no activations
    shown = f"{ratio:.1f}x" if ratio >= 2 else f"{ratio:.2f}x"
    assert f"{shown} less than vanilla" in text(lab.table)
    # the latest run's status line: a run after the baseline
    lab.run(block=True, memory="checkpoint")
    r = peak_record(base).peak / peak_record(lab.records).peak
    assert format_ratio(peak_record(base).peak, peak_record(lab.records).peak,
                        "vanilla") in text(lab.w_status)
    assert r > 1
    # other sizes: the baseline above does not count
    lab.set(batch_size=2)
    lab.run(block=True, memory="reversible")
    assert "run the baseline (memory=vanilla) at these sizes to compare" in text(lab.w_status)
    assert lab.wait_estimates(180)


def test_full_size_line_in_the_background(monkeypatch):
    release = threading.Event()
    headline = scenarios.headline

    def slow_headline(*a, **kw):       # the UI must not wait for this
        assert release.wait(60)
        return headline(*a, **kw)

    monkeypatch.setattr(scenarios, "headline", slow_headline)
    lab = MemoryLab(scenario="long-utterances")
    assert text(lab.w_full_size) == FULL_SIZE_WAIT and lab.full_size_line is None
    release.set()
    assert lab.wait_estimates(120)
    want = headline("long-utterances", {"loss": "batched", "optimizer": "adam"})
    assert want.startswith("at full size") and lab.full_size_line == want
    assert want in text(lab.w_full_size)
    lab.set(loss="samplewise")
    assert lab.wait_estimates(120)
    want = headline("long-utterances", {"loss": "samplewise", "optimizer": "adam"})
    assert want in text(lab.w_full_size) and "x;" in want
    lab.set(loss="batched")                # cached per choices: at once
    assert lab.full_size_line == headline("long-utterances",
                                          {"loss": "batched", "optimizer": "adam"})
    lab.set(scenario=None)
    assert lab.w_full_size.value == ""


def test_a_run_waits_for_a_background_estimate():
    lab = MemoryLab(**dict(TINY, steps=2))
    with lab._job_lock:                     # as a full-size or planner estimate does
        lab.run(block=False)
        assert not lab.wait(0.5)
        assert lab._runs[-1].status == "waiting" and "waiting" in lab.w_status.value
    assert lab.wait(60) and lab._runs[-1].status == "done"


def test_fit_into_box():
    lab = MemoryLab(**TINY)
    with pytest.raises(ValueError, match="fit") as e:
        planner.parse_size("eleven")
    lab.w_fit.value = "eleven"
    lab.w_plan_btn.click()                  # shown, not raised
    assert text(lab.w_plan) == str(e.value) and "Traceback" not in lab.w_plan.value
    with pytest.raises(ValueError, match="fit"):
        lab.plan("eleven")
    lab.w_fit.value = "11GiB"
    lab.w_plan_btn.click()                  # in the background
    assert lab.wait_estimates(180)
    assert lab.last_plan is not None and lab.plan_text == planner.format_plan(lab.last_plan)
    assert html.escape(lab.plan_text) in lab.w_plan.value and "<pre" in lab.w_plan.value
