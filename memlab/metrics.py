"""Evaluation metrics: equal error rate and minimum detection cost for speaker verification,
edit distance and token error rate for recognition.

For verification, a trial is a score and a label (1 = target: same speaker, 0 = non-target).
Accepting every trial whose score is >= a threshold gives, as the threshold sweeps from above the
highest score down to the lowest, a staircase of operating points (P_fa, P_miss) from (0, 1) to
(1, 0) (the DET/ROC curve). EER is where P_fa = P_miss on that curve, interpolated linearly
between the two operating points on either side of the crossing. minDCF is the smallest
C_miss * P_miss * p_target + C_fa * P_fa * (1 - p_target) over the operating points, divided by
the cost of the best trivial system, min(C_miss * p_target, C_fa * (1 - p_target)).

References: NIST Speaker Recognition Evaluation plans (2008-2019) for DCF and its normalisation;
Levenshtein, "Binary codes capable of correcting deletions, insertions and reversals" (1966).
"""

import numbers

import numpy as np


def _scores_labels(scores, labels):
    def as_array(x, name):
        if hasattr(x, "detach"):  # torch tensor
            x = x.detach().cpu().numpy()
        try:
            a = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(x).__name__}") from None
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
        return a

    s, y = as_array(scores, "scores"), as_array(labels, "labels")
    if len(s) == 0:
        raise ValueError("scores must not be empty, got 0 trials")
    if len(s) != len(y):
        raise ValueError(f"scores and labels must have the same length, got {len(s)} and {len(y)}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores must be finite, got {int((~np.isfinite(s)).sum())} NaN/inf value(s)")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0 (non-target) or 1 (target), got values {np.unique(y)[:5].tolist()}")
    n_tgt = int(y.sum())
    if n_tgt == 0 or n_tgt == len(y):
        kind = "non-target (0)" if n_tgt == 0 else "target (1)"
        raise ValueError(f"labels must contain both target (1) and non-target (0) trials, got only {kind}")
    return s, y.astype(bool)


def _operating_points(scores, labels):
    """P_fa and P_miss at every distinct threshold, from 'accept nothing' to 'accept all';
    each (M + 1,), P_fa rising from 0 to 1 and P_miss falling from 1 to 0."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # tied scores are accepted together
    tgt = np.cumsum(y)[last_of_tie]  # targets accepted at each threshold
    non = np.cumsum(~y)[last_of_tie]  # non-targets accepted
    p_fa = np.r_[0.0, non / non[-1]]
    p_miss = np.r_[1.0, 1.0 - tgt / tgt[-1]]
    return p_fa, p_miss


def eer(scores, labels):
    """Equal error rate in [0, 1] from trial scores (higher = more likely target) and labels
    (1 = target, 0 = non-target)."""
    p_fa, p_miss = _operating_points(*_scores_labels(scores, labels))
    d = p_miss - p_fa  # falls from 1 to -1
    k = int(np.argmax(d <= 0))  # first operating point at or past the crossing (k >= 1)
    t = d[k - 1] / (d[k - 1] - d[k])  # fraction of the way from point k-1 to point k
    return float(p_fa[k - 1] + t * (p_fa[k] - p_fa[k - 1]))


def min_dcf(scores, labels, p_target=0.01, c_miss=1.0, c_fa=1.0):
    """Normalised minimum detection cost (NIST): min over thresholds of
    (c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target)) / min(c_miss * p_target, c_fa * (1 - p_target))."""
    for name, v in (("p_target", p_target), ("c_miss", c_miss), ("c_fa", c_fa)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if not (c_miss > 0 and c_fa > 0):
        raise ValueError(f"c_miss and c_fa must be > 0, got c_miss={c_miss}, c_fa={c_fa}")
    p_fa, p_miss = _operating_points(*_scores_labels(scores, labels))
    dcf = c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa
    return float(dcf.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))


def _tokens(x, name):
    if hasattr(x, "tolist") and not isinstance(x, (list, tuple, str)):  # tensor / array
        x = x.tolist()
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__"):
        raise TypeError(f"{name} must be a sequence of tokens (list, tuple, tensor), got {type(x).__name__}")
    return list(x)


def edit_distance(ref, hyp):
    """Levenshtein distance between two token sequences: the fewest substitutions, insertions
    and deletions that turn ref into hyp."""
    a, b = _tokens(ref, "ref"), _tokens(hyp, "hyp")
    prev = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, z in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != z)))
        prev = cur
    return prev[-1]


def token_error_rate(refs, hyps):
    """Sum of edit distances over sum of reference lengths (can exceed 1 with many insertions)."""
    if not isinstance(refs, (list, tuple)) or not isinstance(hyps, (list, tuple)):
        raise TypeError(f"refs and hyps must be lists of token sequences, got {type(refs).__name__} and {type(hyps).__name__}")
    if len(refs) != len(hyps):
        raise ValueError(f"refs and hyps must have the same length, got {len(refs)} and {len(hyps)}")
    if len(refs) == 0:
        raise ValueError("refs must not be empty, got 0 utterances")
    total = sum(len(_tokens(r, f"refs[{i}]")) for i, r in enumerate(refs))
    if total == 0:
        raise ValueError("refs must hold at least one token in total, got 0")
    errors = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    return errors / total
