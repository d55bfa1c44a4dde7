import math

import numpy as np
import pytest
import torch

from memlab.metrics import edit_distance, eer, min_dcf, token_error_rate

# Trials for the hand-worked examples below.
# Sorted by score: 0.9 T, 0.7 N, 0.6 T, 0.4 T, 0.3 N, 0.1 N (3 targets, 3 non-targets).
# Lowering the threshold past each score gives the operating points (P_fa, P_miss):
#   (0, 1) -> 0.9 T -> (0, 2/3) -> 0.7 N -> (1/3, 2/3) -> 0.6 T -> (1/3, 1/3) -> 0.4 T -> (1/3, 0)
#   -> 0.3 N -> (2/3, 0) -> 0.1 N -> (1, 0)
SCORES = [0.9, 0.7, 0.6, 0.4, 0.3, 0.1]
LABELS = [1, 0, 1, 1, 0, 0]


def test_eer_hand_example():
    # P_miss - P_fa: 1, 2/3, 1/3, 0 at (1/3, 1/3) -> the curve crosses exactly there: EER = 1/3
    assert eer(SCORES, LABELS) == pytest.approx(1 / 3)


def test_eer_interpolates_between_points_and_handles_ties():
    # targets 0.8, 0.5; non-targets 0.5, 0.2. The tie at 0.5 is accepted together:
    #   (0, 1) -> 0.8 T -> (0, 1/2) -> 0.5 T+N -> (1/2, 0) -> 0.2 N -> (1, 0)
    # P_miss - P_fa goes 1/2 -> -1/2 between (0, 1/2) and (1/2, 0): halfway, at (1/4, 1/4).
    assert eer([0.8, 0.5, 0.5, 0.2], [1, 1, 0, 0]) == pytest.approx(0.25)


def test_eer_extremes_and_input_types():
    assert eer([3.0, 2.0, 1.0, 0.0], [1, 1, 0, 0]) == pytest.approx(0.0)  # perfectly separated
    assert eer([3.0, 2.0, 1.0, 0.0], [0, 0, 1, 1]) == pytest.approx(1.0)  # perfectly inverted
    assert eer([0.5] * 4, [1, 0, 1, 0]) == pytest.approx(0.5)  # no information
    s, y = torch.tensor(SCORES), torch.tensor(LABELS)
    assert eer(s, y) == eer(np.array(SCORES), [bool(v) for v in LABELS]) == pytest.approx(1 / 3)


def test_eer_is_order_invariant_and_reasonable_on_gaussians():
    r = np.random.default_rng(0)
    tgt, non = r.normal(2.0, 1.0, 4000), r.normal(0.0, 1.0, 4000)
    scores, labels = np.r_[tgt, non], np.r_[np.ones(4000), np.zeros(4000)]
    perm = r.permutation(len(scores))
    assert eer(scores, labels) == pytest.approx(eer(scores[perm], labels[perm]))
    # two unit Gaussians 2 apart cross at 1: EER = P(N(0,1) > 1) = 0.1587
    assert eer(scores, labels) == pytest.approx(0.1587, abs=0.015)


def test_min_dcf_hand_example():
    # p_target = 0.5, costs 1: DCF / min(0.5, 0.5) = P_miss + P_fa; smallest at (1/3, 0): 1/3
    assert min_dcf(SCORES, LABELS, p_target=0.5) == pytest.approx(1 / 3)
    # p_target = 0.01: (0.01 P_miss + 0.99 P_fa) / 0.01 = P_miss + 99 P_fa.
    # Points with P_fa = 0: (0, 1) -> 1 and (0, 2/3) -> 2/3; every other point costs >= 33. -> 2/3
    assert min_dcf(SCORES, LABELS) == pytest.approx(2 / 3)
    # c_miss = 10, p = 0.5: (5 P_miss + 0.5 P_fa) / 0.5 = 10 P_miss + P_fa; at (1/3, 0): 1/3
    assert min_dcf(SCORES, LABELS, p_target=0.5, c_miss=10) == pytest.approx(1 / 3)
    # never above 1: the trivial systems (accept all / reject all) are among the points
    assert min_dcf([0.0, 1.0], [1, 0], p_target=0.3) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "scores, labels, match",
    [
        ([], [], "scores must not be empty"),
        ([0.1, 0.2], [1], "same length, got 2 and 1"),
        ([0.1, 0.2], [1, 1], "both target .* got only target"),
        ([0.1, 0.2], [0, 0], "got only non-target"),
        ([0.1, 0.2], [1, 2], "labels must be 0 .* or 1"),
        ([0.1, float("nan")], [1, 0], "scores must be finite"),
        ([[0.1, 0.2]], [[1, 0]], "scores must be 1-D"),
    ],
)
def test_verification_metrics_validate_input(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        eer(scores, labels)
    with pytest.raises(ValueError, match=match):
        min_dcf(scores, labels)


def test_min_dcf_validates_costs():
    with pytest.raises(ValueError, match="p_target must be in \\(0, 1\\), got 0"):
        min_dcf(SCORES, LABELS, p_target=0)
    with pytest.raises(ValueError, match="c_miss and c_fa must be > 0"):
        min_dcf(SCORES, LABELS, c_fa=0)
    with pytest.raises(TypeError, match="p_target must be a number"):
        min_dcf(SCORES, LABELS, p_target="0.01")


def test_edit_distance_hand_cases():
    assert edit_distance(list("kitten"), list("sitting")) == 3  # k->s, e->i, +g
    assert edit_distance([1, 2, 3], [1, 3]) == 1  # delete 2
    assert edit_distance([1, 3], [1, 2, 3]) == 1  # insert 2
    assert edit_distance([1, 2, 3], [3, 2, 1]) == 2  # two substitutions
    assert edit_distance([], [1, 2]) == 2
    assert edit_distance([5, 6], []) == 2
    assert edit_distance([], []) == 0
    assert edit_distance(torch.tensor([1, 2, 3]), (1, 2, 4)) == 1


def test_token_error_rate_hand_case():
    refs = [[1, 2, 3], [4, 5]]
    hyps = [[1, 3], [4, 5, 6]]  # one deletion + one insertion over 5 reference tokens
    assert token_error_rate(refs, hyps) == pytest.approx(2 / 5)
    assert token_error_rate([[1, 2]], [[1, 2]]) == 0.0
    assert token_error_rate([[1]], [[2, 3, 4]]) == pytest.approx(3.0)  # can exceed 1
    assert math.isclose(token_error_rate([torch.tensor([7, 8])], [torch.tensor([7])]), 0.5)


def test_token_metrics_validate_input():
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        token_error_rate([[1], [2]], [[1]])
    with pytest.raises(ValueError, match="refs must not be empty"):
        token_error_rate([], [])
    with pytest.raises(ValueError, match="at least one token"):
        token_error_rate([[]], [[1]])
    with pytest.raises(TypeError, match="ref must be a sequence of tokens"):
        edit_distance("abc", [1])
    with pytest.raises(TypeError, match="refs and hyps must be lists"):
        token_error_rate("abc", "abd")
