"""memlab.bench.curves: the optimizers' loss curves on the tests' deterministic problem."""

import pytest
import torch

from memlab.bench.curves import OPTIMIZERS, curve_gaps, curve_rows, loss_curves, mlp, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_curve_gaps_against_a_hand_computed_pair():
    worst, at, final = curve_gaps([1.0, 2.2, 2.9], [1.0, 2.0, 3.0])
    assert worst == pytest.approx(0.1) and at == 1 and final == pytest.approx(1 / 30)
    with pytest.raises(ValueError, match="one length"):
        curve_gaps([1.0], [1.0, 2.0])


def test_loss_curves_start_alike_and_are_deterministic():
    a = loss_curves(12, seed=3)
    b = loss_curves(12, seed=3, names=("adam4bit",))
    assert list(a) == list(OPTIMIZERS) and all(len(v) == 12 for v in a.values())
    assert len({v[0] for v in a.values()}) == 1              # one initialization
    assert a["adam4bit"] == b["adam4bit"]                    # full batches: deterministic
    m = mlp(seed=3)
    assert train(m, torch.optim.Adam(m.parameters(), lr=3e-3), 1)[0].item() == a["adam"][0]
    with pytest.raises(ValueError, match="names"):
        loss_curves(5, names=("sgd",))
    with pytest.raises(ValueError, match="steps"):
        loss_curves(0)


def test_curve_rows_in_fast_mode():
    rows = curve_rows(fast=True)
    assert [r["subject"] for r in rows] == list(OPTIMIZERS[1:])
    gap = {r["subject"]: r["value"] for r in rows}
    assert all(r["measure"] == "curve_gap" and r["steps"] == 60 and r["seed"] == 0
               for r in rows)
    assert gap["adam8bit"] < 0.05 and gap["adam4bit"] < 0.05 < gap["adam4bit nearest"], gap


def test_bench_optim_figures_draw_the_curve_gaps_readably():
    from figure_check import figure_problems
    from memlab import plots
    rows = [{"measure": "state_bytes_per_param", "subject": "adam8bit", "value": 2.03,
             "ratio": 0.254, "reference": "adam"},
            {"measure": "curve_gap", "subject": "adam4bit", "value": 0.039, "seed": 0},
            {"measure": "curve_gap", "subject": "adam4bit nearest", "value": 0.40, "seed": 0}]
    figs = {f.layout.title.text: f for f in plots.bench_figures("optim", rows)}
    gap = figs["<b>Worst step's loss gap to fp32 Adam</b>"]
    assert list(gap.data[0].y) == pytest.approx([3.9, 40.0])
    assert figure_problems(gap) == []
