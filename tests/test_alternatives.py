"""memlab.alternatives: the comparison rows of tutorial 06. What they pin: accumulate4 keeps about a
quarter of the activations and bf16 about half, while parameters and optimizer state stay
exact; checkpointing and the step in backward compute the baseline's update bit for bit
(drift 0) and bf16 does not; refused combinations are rows with the refusal; the pruned loss
equals the RNN-T loss exactly when s_range >= U+1 and is larger below."""

import pytest

from memlab import alternatives as A
from memlab.planner import Plan

CHOICES = ["precision=bf16", "accumulation=accumulate4", "memory=checkpoint",
           "optimizer-step=in-backward", "optimizer-step=in-backward+optimizer=lowrank-adam"]


@pytest.fixture(scope="module")
def deep():
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield {r["run"]: r for r in A.compare("deep-speaker", CHOICES, repeats=1,
                                                full_size=False, fast=True)}
    finally:
        torch.set_num_threads(n)


def test_rows_baseline_first_reference_and_refusal(deep):
    runs = list(deep)
    assert runs[:2] == ["baseline", "baseline, another batch"]
    assert runs[2:] == [A.label(A.parse(c)) for c in CHOICES]
    refused = deep["optimizer-step=in-backward + optimizer=lowrank-adam"]
    assert "peak" not in refused and "lowrank-adam" in refused["refused"]
    base = deep["baseline"]
    assert base["saving"] == 1.0 and base["time"] == 1.0 and base["drift"] == 0.0
    assert deep["baseline, another batch"]["drift"] > 0.1          # another batch: another step
    for r in deep.values():
        if "peak" in r:
            assert r["peak"] >= sum(r[c] for c in ("parameters", "gradients", "optimizer",
                                                   "activations", "other")) * 0.999


def test_accumulate4_quarters_and_bf16_halves_the_activations(deep):
    base, acc, bf16 = deep["baseline"], deep["accumulation=accumulate4"], deep["precision=bf16"]
    assert 3.5 < base["activations"] / acc["activations"] <= 4.05
    assert 1.75 < base["activations"] / bf16["activations"] <= 2.05
    for r in (acc, bf16):                                 # what they do not touch stays exact
        assert r["parameters"] == base["parameters"]
        assert r["optimizer"] == base["optimizer"]
    assert acc["saving"] > 2.5 and bf16["saving"] > 1.5
    assert "BatchNorm" in acc["changes"]                  # the speaker nets have BatchNorm


def test_drift_is_zero_for_the_same_update(deep):
    assert deep["memory=checkpoint"]["drift"] == 0.0
    assert deep["optimizer-step=in-backward"]["drift"] == 0.0
    assert deep["precision=bf16"]["drift"] > 1e-4


def test_drift_of_a_run_reparametrized_while_training_is_none():
    """lowrank-adam registers a parametrization on its first step, so the run's parameters end
    under other names ('head.parametrizations.weight.original'); the full-size optimizer-bound
    comparison of tutorial 06 raised KeyError: 'head.weight' here."""
    import torch
    w, b = torch.ones(3, 2), torch.zeros(3)
    base = ({"head.weight": w, "head.bias": b}, {"head.weight": w + 1, "head.bias": b + 1})
    run = ({"head.weight": w, "head.bias": b},
           {"head.parametrizations.weight.original": w + 2, "head.bias": b + 2})
    assert A._drift(run, base) is None
    same = ({"head.weight": w, "head.bias": b}, {"head.weight": w + 2, "head.bias": b + 1})
    assert A._drift(same, base) == pytest.approx(1.0 * (6 ** 0.5) / (9 ** 0.5))


def test_pruned_gap_is_zero_from_u_plus_one():
    rows = A.pruned_gap([2, 3, 5, 7, 9], U=6)
    gaps = {r["s_range"]: r["gap"] for r in rows}
    assert abs(gaps[7]) < 1e-12 and abs(gaps[9]) < 1e-12
    assert gaps[2] > gaps[3] > gaps[5] > 1e-4             # narrower bands drop more paths


def test_parse_and_label():
    assert A.parse("memory=reversible + optimizer=adam8bit") == {"memory": "reversible",
                                                                 "optimizer": "adam8bit"}
    assert A.parse(None) == A.parse("baseline") == {} and A.label({}) == "baseline"
    with pytest.raises(ValueError, match="kind=name"):
        A.parse("bf16")
    with pytest.raises(ValueError, match="kind must be one of"):
        A.parse("precisoin=bf16")
    with pytest.raises(TypeError, match="choice must be"):
        A.parse(3)
    with pytest.raises(ValueError, match="repeats"):
        A.compare("deep-speaker", [], repeats=0)


def test_plan_summary_ratios():
    rows = [{"run": "a", "peak": 50, "time_factor": 1.2}, {"run": "b", "peak": 25}]
    s = A.plan_summary(Plan(fit=60, base={"peak": 100}, rows=rows, predicted_over=0,
                            checked=2))
    assert s["cheapest"]["run"] == "a" and s["cheapest"]["ratio"] == 2.0
    assert s["smallest"]["run"] == "b" and s["smallest"]["ratio"] == 4.0
    empty = A.plan_summary(Plan(fit=1, base={"peak": 100}, rows=[], predicted_over=3,
                                checked=1))
    assert empty["cheapest"] is None and empty["smallest"] is None


def test_tradeoff_figure_passes_the_figure_check(deep):
    pytest.importorskip("plotly")
    from figure_check import figure_problems
    from memlab.plots import tradeoff_figure
    fig = tradeoff_figure(list(deep.values()))
    assert len(fig.data[0].x) == len(deep) - 1            # the refused row is left out
    assert figure_problems(fig) == []
