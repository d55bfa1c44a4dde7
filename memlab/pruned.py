"""Pruned RNN-T loss: a cheap "simple" joint finds, per frame, the few symbols that matter; the
full joiner runs only on that band of the lattice. Batched, and sample-wise (band one group of
samples at a time).

References:
  F. Kuang, L. Guo, W. Kang, L. Lin, M. Luo, Z. Yao, D. Povey, "Pruned RNN-T for fast,
     memory-efficient ASR training", Interspeech 2022 (arXiv 2206.13236), as used by k2/icefall.
  S. Braun, E. McDermott, R. Hsiao, arXiv 2211.16270: the sample-wise computation of the joiner
     and loss that ``samplewise=True`` applies to the pruned band.

Lattice (as in memlab.transducer): sample b has T_b frames and U_b tokens; from cell (t, u) a
blank (log-prob ``py[t, u]``) moves to (t+1, u) and token y_{u+1} (log-prob ``px[t, u]``) to
(t, u+1); the loss is -log of the total probability of the paths from (0, 0) that end with the
blank out of (T_b-1, U_b).

The three steps:

1. Simple loss. ``am = simple_am_proj(enc_out)`` (B, T, V) and ``lm = simple_lm_proj(pred_out)``
   (B, U+1, V) are ADDED: logits(t, u) = am[t] + lm[u]. Their log-softmax normaliser
   logsumexp_v(am[t, v] + lm[u, v]) = log(exp(am[t] - max) @ exp(lm[u] - max)) + maxes is a matrix
   product, so px/py are gathers of am and lm minus a (B, T, U+1) normaliser and the
   (B, T, U+1, V) tensor never exists. The loss and its gradient come from one forward-backward
   (alpha-beta) pass over the lattice.
2. Bounds. -d loss / d py[t, u] - d loss / d px[t, u] is the occupation probability of cell
   (t, u). Per frame the window of ``s_range`` consecutive u with the most occupation is picked;
   its start is then projected onto the feasible set: starts[0] = 0, non-decreasing, steps of at
   most s_range - 1 (so consecutive windows overlap and a path can cross), the last frame's
   window holds U_b, every start within [0, max(U_b + 1 - s_range, 0)] (so within
   [0, U + 1 - s_range]).
3. Pruned loss. The joiner runs on (B, T, s_range) cells only; the lattice keeps those cells and
   gives every other one -inf.

``s_range``: an int >= 1; values above U+1 (U = the longest target in the batch) are clipped to
U+1, where the band is the whole lattice and the pruned loss is the exact RNN-T loss. A band that
cannot hold a path (U_b > (s_range - 1) * T_b, e.g. s_range = 1 with any token) is refused with a
ValueError naming s_range and the sample.

The joiner is the one memlab's other losses take: ``joiner(enc (N, T, H_enc), pred (N, U+1,
H_pred)) -> logits (N, T, U+1, V)``, acting cell by cell. The band is fed to it as N*T rows of one
frame each: ``joiner(enc (N*T, 1, H_enc), pred_band (N*T, s_range, H_pred))`` -> (N*T, 1, s_range,
V), so no new calling convention is needed.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from memlab._pruned_lattice import _lattice_torch, lattice_forward_backward, lattice_loss  # noqa: F401
from memlab._pruned_groups import _params_of, _samplewise
from memlab.transducer import _check_common, _check_tensor, _count as _int, _reduce

REDUCTIONS = ("mean", "sum", "none")
DEFAULT_MAX_CHUNK_BYTES = 64 * 2**20   # pruned logits + their gradient of one sample-wise call
SIMPLE_MAX_CHUNK_BYTES = 16 * 2**20    # ... and the simple joint of the group, when computed per group
_INF = float("inf")


# ----------------------------------------------------------------------------------------------
# argument checks


def _scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_lengths(targets, enc_lengths, target_lengths, B: int, T: int, U: int, device,
                   blank, vocab_size: int, reduction) -> None:
    """The transducer losses' shared checks (memlab.transducer), named for this loss."""
    _check_common(B, T, U, targets, enc_lengths, target_lengths, blank, reduction, device,
                  "enc_lengths", vocab_size)


def _check_args(joiner, enc_out, pred_out, am, lm, targets, enc_lengths, target_lengths,
                s_range, blank, reduction) -> int:
    """All checks of pruned_rnnt_loss; returns s_range as an int (before clipping)."""
    if joiner is not None and not callable(joiner):
        raise TypeError(f"joiner must be callable (an nn.Module), got {type(joiner).__name__}")
    for name, x in (("enc_out", enc_out), ("pred_out", pred_out), ("am", am), ("lm", lm)):
        if x is not None:
            _check_tensor(name, x, 3, "float")
    B, T, V = am.shape
    U1 = lm.shape[1]
    dev = am.device
    if U1 < 1:
        raise ValueError(f"lm must have U+1 >= 1 positions in dim 1 (B, U+1, V), got shape "
                         f"{tuple(lm.shape)}")
    if lm.device != dev:
        raise ValueError(f"lm must be on am's device ({dev}), got {lm.device}")
    if lm.shape[0] != B or lm.shape[2] != V:
        raise ValueError(f"lm must have shape (B, U+1, V) with B={B}, V={V} (from am "
                         f"{tuple(am.shape)}), got {tuple(lm.shape)}")
    for name, x, want in (("enc_out", enc_out, (B, T)), ("pred_out", pred_out, (B, U1))):
        if x is None:
            continue
        if x.device != dev:
            raise ValueError(f"{name} must be on am's device ({dev}), got {x.device}")
        if tuple(x.shape[:2]) != want:
            raise ValueError(f"{name} must have leading shape {want} to match am {tuple(am.shape)} "
                             f"and lm {tuple(lm.shape)}, got {tuple(x.shape)}")
    s_range = _int("s_range", s_range, 1)
    _check_lengths(targets, enc_lengths, target_lengths, B, T, U1 - 1, dev, blank, V, reduction)
    return s_range


def _check_band(s_range: int, enc_lengths, target_lengths) -> None:
    """A path fits the band only if U_b <= (s_range - 1) * T_b (s_range already clipped)."""
    bad = target_lengths.long() > (s_range - 1) * enc_lengths.long()              # (B,)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        Tb, Ub = int(enc_lengths[b]), int(target_lengths[b])
        need = -(-Ub // Tb) + 1
        raise ValueError(f"s_range={s_range} is too small: sample {b} has {Ub} tokens in {Tb} "
                         f"frames, and a band of s_range symbols per frame advances at most "
                         f"s_range - 1 tokens a frame; need s_range >= {need}")


# ----------------------------------------------------------------------------------------------
# 1. the simple (additive) joint


def _lattice_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def simple_lattice(am: torch.Tensor, lm: torch.Tensor, targets: torch.Tensor,
                   target_lengths: torch.Tensor, blank: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """px (B, T, U), py (B, T, U+1) of the joint logits am[t] + lm[u], without the 4-D tensor.

    am (B, T, V), lm (B, U+1, V). Float64 stays float64, everything else runs in float32.
    Positions of targets past target_lengths are read as blank (their arcs lie off the lattice).
    """
    work = _lattice_dtype(am)
    am, lm = am.to(work), lm.to(work)
    B, T, V = am.shape
    U = lm.shape[1] - 1
    valid = torch.arange(U, device=am.device)[None] < target_lengths[:, None]    # (B, U)
    tgt = torch.where(valid, targets.long(), blank)                               # (B, U)
    am_max = am.detach().amax(-1, keepdim=True)                                   # (B, T, 1) shifts:
    lm_max = lm.detach().amax(-1, keepdim=True)                                   # (B, U+1, 1) exact
    prod = torch.matmul((am - am_max).exp(), (lm - lm_max).exp().transpose(1, 2))  # (B, T, U+1)
    norm = prod.clamp_min(torch.finfo(work).tiny).log() + am_max + lm_max.transpose(1, 2)
    py = am[..., blank, None] + lm[..., blank][:, None, :] - norm                 # (B, T, U+1)
    # indexing, not gather: gather's backward would keep all of am alive
    b = torch.arange(B, device=am.device)[:, None]                                # (B, 1)
    am_tgt = am[b[..., None], torch.arange(T, device=am.device)[None, :, None], tgt[:, None, :]]
    lm_tgt = lm[b, torch.arange(U, device=am.device)[None, :], tgt]               # (B, U)
    px = am_tgt + lm_tgt[:, None, :] - norm[:, :, :U]                             # (B, T, U) am_tgt too
    return px, py


def simple_rnnt_loss(am: torch.Tensor, lm: torch.Tensor, targets: torch.Tensor,
                     enc_lengths: torch.Tensor, target_lengths: torch.Tensor, blank: int = 0,
                     reduction: str = "mean") -> torch.Tensor:
    """RNN-T loss of the additive joint log_softmax(am[t] + lm[u]) (the "simple" loss)."""
    _check_args(None, None, None, am, lm, targets, enc_lengths, target_lengths, 1, blank, reduction)
    px, py = simple_lattice(am, lm, targets, target_lengths, blank)
    losses, _, _ = lattice_loss(px, py, enc_lengths, target_lengths)
    return _reduce(losses.to(am.dtype), reduction)


# ----------------------------------------------------------------------------------------------
# 2. pruning bounds


@torch.no_grad()
def prune_ranges(grad_px: torch.Tensor, grad_py: torch.Tensor, enc_lengths: torch.Tensor,
                 target_lengths: torch.Tensor, s_range: int) -> torch.Tensor:
    """Start u of each frame's window of ``s_range`` symbols: (B, T) int64.

    grad_px (B, T, U), grad_py (B, T, U+1): gradients of the simple loss (minus occupations).
    Picks the window with the most cell occupation per frame, then projects the starts onto the
    feasible set (module docstring, step 2). ``s_range`` must be in [1, U+1] and fit the band
    (the loss functions clip and check it). Frames past T_b get the last frame's start.
    """
    B, T, U1 = grad_py.shape
    S = _int("s_range", s_range, 1)
    if S > U1:
        raise ValueError(f"s_range must be <= U+1 = {U1} here (the losses clip it), got {S}")
    dev = grad_py.device
    occ = -(grad_py + torch.cat([grad_px, grad_px.new_zeros(B, T, 1)], dim=2))   # (B, T, U+1)
    csum = torch.cat([occ.new_zeros(B, T, 1), occ.cumsum(2)], dim=2)              # (B, T, U+2)
    window = csum[:, :, S:] - csum[:, :, :U1 + 1 - S]                             # (B, T, U+2-S)
    start = window.argmax(dim=2)                                                  # (B, T)
    Tb, Ub = enc_lengths.long().to(dev)[:, None], target_lengths.long().to(dev)[:, None]
    t = torch.arange(T, device=dev)[None, :]                                      # (1, T)
    top = (Ub + 1 - S).clamp_min(0)                                               # (B, 1) highest start
    lo = (top - (S - 1) * (Tb - 1 - t)).clamp(min=0)                              # can still reach U_b
    lo = torch.minimum(lo, top)                                                   # (B, T)
    hi = torch.minimum(top, (S - 1) * t)                                          # reachable from u=0
    start = torch.minimum(torch.maximum(start, lo), hi)                           # (B, T)
    start = start.cummax(dim=1).values                                            # non-decreasing
    step = (S - 1) * t                                                            # (1, T)
    start = (start - step).cummin(dim=1).values + step                            # steps <= S-1
    return start


# ----------------------------------------------------------------------------------------------
# 3. the pruned band


def pruned_logits(joiner: Callable, enc_out: torch.Tensor, pred_out: torch.Tensor,
                  starts: torch.Tensor, s_range: int) -> torch.Tensor:
    """The joiner on the band only: enc_out (N, T, H), pred_out (N, U+1, H), starts (N, T)
    -> logits (N, T, s_range, V) of cells (t, starts[t] + k), k < s_range."""
    N, T, H = enc_out.shape
    ranges = starts[..., None] + torch.arange(s_range, device=starts.device)      # (N, T, S)
    pred_band = pred_out[torch.arange(N, device=starts.device)[:, None, None], ranges]  # (N, T, S, Hp)
    e = enc_out.reshape(N * T, 1, H)                                              # (N*T, 1, H)
    p = pred_band.reshape(N * T, s_range, pred_out.shape[2])                      # (N*T, S, Hp)
    logits = joiner(e, p)                                                         # (N*T, 1, S, V)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 \
            or tuple(logits.shape[:3]) != (N * T, 1, s_range):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"joiner must map enc (N, T, H) and pred (N, U+1, H) to logits (N, T, "
                         f"U+1, V) cell by cell; for the band inputs {tuple(e.shape)} and "
                         f"{tuple(p.shape)} it returned {got}, expected ({N * T}, 1, {s_range}, V)")
    return logits.reshape(N, T, s_range, logits.shape[3])                         # (N, T, S, V)


class _BandLogProbs(torch.autograd.Function):
    """(log_softmax(logits)[..., blank], log_softmax(logits)[..., sym]) of the band's logits.

    Autograd through logsumexp, select and gather would allocate four (N, T, S, V) temporaries in
    backward; this backward builds the gradient in one buffer: softmax * -(g_blank + g_emit), plus
    g_blank at blank and g_emit at sym.
    """

    @staticmethod
    def forward(ctx, logits, sym, blank, work):
        from memlab import _lattice_kernel
        ctx.blank, ctx.work = blank, work
        ctx.kernel = _lattice_kernel.band_usable(logits) and sym.device.type == "cpu"
        if ctx.kernel:              # C: one sweep of the logits, one for the gradient
            lse, blank_lp, emit = _lattice_kernel.band_forward(logits, sym, blank)
            ctx.save_for_backward(logits, lse, sym)
            return blank_lp.to(work), emit.to(work)
        lse = logits.to(work).logsumexp(-1)                                       # (N, T, S)
        blank_lp = logits[..., blank].to(work) - lse                              # (N, T, S)
        emit = logits.gather(3, sym)[..., 0].to(work) - lse                       # (N, T, S)
        ctx.save_for_backward(logits, lse, sym)
        return blank_lp, emit

    @staticmethod
    @once_differentiable
    def backward(ctx, g_blank, g_emit):
        logits, lse, sym = ctx.saved_tensors
        if ctx.kernel:
            from memlab import _lattice_kernel
            return (_lattice_kernel.band_backward(logits, sym, ctx.blank, lse, g_blank, g_emit),
                    None, None, None)
        g = logits.to(ctx.work).sub(lse[..., None]).exp_()                        # (N, T, S, V) softmax
        g.mul_((g_blank + g_emit).neg_()[..., None])
        g[..., ctx.blank] += g_blank
        g.scatter_add_(3, sym, g_emit[..., None])
        return g.to(logits.dtype), None, None, None


def pruned_lattice(logits: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor,
                   target_lengths: torch.Tensor, blank: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """px (N, T, U), py (N, T, U+1) of the band's logits (N, T, S, V); -inf off the band."""
    N, T, S, V = logits.shape
    U = targets.shape[1]
    work = _lattice_dtype(logits)
    ranges = starts[..., None] + torch.arange(S, device=starts.device)            # (N, T, S)
    valid = torch.arange(U, device=targets.device)[None] < target_lengths[:, None]
    tgt = torch.where(valid, targets.long(), blank)                               # (N, U)
    tgt = torch.cat([tgt, tgt.new_full((N, 1), blank)], dim=1)                    # (N, U+1): none at u=U
    sym = tgt.gather(1, ranges.reshape(N, T * S)).reshape(N, T, S, 1)             # y_{u+1} at (t, u)
    blank_lp, emit = _BandLogProbs.apply(logits, sym, blank, work)                # (N, T, S) each
    full = blank_lp.new_full((N, T, U + 1), -_INF)                                # (N, T, U+1)
    py = full.scatter(2, ranges, blank_lp)                                        # (N, T, U+1)
    px = full.scatter(2, ranges, emit)[:, :, :U]                                  # (N, T, U)
    return px, py


def _band_losses(joiner, enc_out, pred_out, starts, S, targets, enc_lengths, target_lengths,
                 blank) -> torch.Tensor:
    logits = pruned_logits(joiner, enc_out, pred_out, starts, S)                  # (N, T, S, V)
    px, py = pruned_lattice(logits, starts, targets, target_lengths, blank)
    del logits
    losses, _, _ = lattice_loss(px, py, enc_lengths, target_lengths)              # (N,)
    return losses


# ----------------------------------------------------------------------------------------------
# sample-wise band: one group of samples at a time, gradients kept only for enc/pred/params


def plan_groups(enc_lengths: Sequence[int], s_range: int, vocab_size: int,
                max_chunk_bytes: Optional[float] = None, bytes_per_element: int = 4,
                simple: bool = False) -> List[List[int]]:
    """Sample indices grouped so that 2 * n * T_group * s_range * V * bytes (the band's logits and
    their gradient; with ``simple``, + 4 * n * T_group * V * bytes for the group's simple joint:
    am, its exp, their gradients) fits ``max_chunk_bytes`` (None: 64 MiB, 16 MiB with
    ``simple``; inf: one group). Longest first."""
    if max_chunk_bytes is None:
        limit = SIMPLE_MAX_CHUNK_BYTES if simple else DEFAULT_MAX_CHUNK_BYTES
    elif isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, numbers.Real) \
            or math.isnan(max_chunk_bytes) or max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be a number of bytes >= 1, inf or None, got "
                         f"{max_chunk_bytes!r}")
    else:
        limit = max_chunk_bytes
    per_frame = (2 * s_range + (4 if simple else 0)) * vocab_size * bytes_per_element
    T = [int(v) for v in enc_lengths]
    order = sorted(range(len(T)), key=lambda i: T[i], reverse=True)
    groups: List[List[int]] = []
    for i in order:   # longest first, so a group's padded length is its first member's
        if groups and (len(groups[-1]) + 1) * T[groups[-1][0]] * per_frame <= limit:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _samplewise_band(joiner, enc_out, pred_out, starts, S, targets, enc_lengths, target_lengths,
                     blank, reduction, max_chunk_bytes, vocab_size, stats):
    """The band of given window starts, computed group by group (see :func:`_samplewise`)."""
    groups = plan_groups(enc_lengths.tolist(), S, vocab_size, max_chunk_bytes,
                         enc_out.element_size())

    def band(e, p, idx, tg):
        return _band_losses(joiner, e, p, starts[idx, :tg], S, targets[idx], enc_lengths[idx],
                            target_lengths[idx], blank)

    return _samplewise(band, enc_out, pred_out, enc_lengths, groups, _params_of(joiner),
                       reduction, stats)


def _projected(name: str, fn, x: torch.Tensor, want: tuple) -> torch.Tensor:
    """``fn(x)``, checked to be (N, L, V) with (N, L) == want."""
    y = fn(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or tuple(y.shape[:2]) != want \
            or not y.is_floating_point():
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{name} must map a {tuple(x.shape)} tensor to a floating-point "
                         f"{want + ('V',)} tensor, got {got}")
    return y


def _samplewise_all(joiner, am_fn, lm_fn, enc_out, pred_out, targets, enc_lengths,
                    target_lengths, S, blank, reduction, simple_scale, pruned_scale,
                    max_chunk_bytes, vocab_size, stats):
    """The whole pruned loss group by group: each group's simple projections, simple lattice,
    window starts and band; the (B, T, V) simple joint never exists for the whole batch.
    Returns (loss, simple (B,), pruned (B,), starts (B, T'), dtype)."""
    B, T = enc_out.shape[:2]
    groups = plan_groups(enc_lengths.tolist(), S, vocab_size, max_chunk_bytes,
                         enc_out.element_size(), simple=True)
    kept = {"starts": torch.zeros(B, T, dtype=torch.long, device=enc_out.device)}   # (B, T')
    recording = [True]        # off after the forward pass ("none": backward runs the groups again)

    def whole(e, p, idx, tg):
        el, tl, tgt = enc_lengths[idx], target_lengths[idx], targets[idx]
        am = _projected("am", am_fn, e, tuple(e.shape[:2]))                       # (n, Tg, V)
        lm = _projected("lm", lm_fn, p, tuple(p.shape[:2]))                       # (n, U'+1, V)
        px, py = simple_lattice(am, lm, tgt, tl, blank)
        simple, gx, gy = lattice_loss(px, py, el, tl)                             # (n,)
        del px, py
        starts = prune_ranges(gx, gy, el, tl, S)                                  # (n, Tg)
        pruned = _band_losses(joiner, e, p, starts, S, tgt, el, tl, blank)        # (n,)
        if recording[0]:
            kept["starts"][idx, :tg] = starts
            kept["starts"][idx, tg:] = starts[:, -1:]
            for k, v in (("simple", simple), ("pruned", pruned)):
                if k not in kept:
                    kept[k] = v.new_zeros(B)
                kept[k][idx] = v.detach()
            kept["dtype"] = am.dtype
        return simple_scale * simple + pruned_scale * pruned                      # (n,)

    loss, _ = _samplewise(whole, enc_out, pred_out, enc_lengths, groups,
                          _params_of(joiner, am_fn, lm_fn), reduction, stats,
                          lambda: recording.__setitem__(0, False))
    return loss, kept["simple"], kept["pruned"], kept["starts"], kept["dtype"]


# ----------------------------------------------------------------------------------------------
# the loss


def warmup_scales(step: int, warm_step: int = 2000,
                  simple_loss_scale: float = 0.5) -> Tuple[float, float]:
    """icefall's warm-up: (simple_scale, pruned_scale) for training step ``step``.

    The simple loss's scale goes linearly from 1.0 to ``simple_loss_scale`` and the pruned loss's
    from 0.1 to 1.0 over the first ``warm_step`` steps (then they stay), because the pruning bounds
    are poor until the simple joint has learnt something.
    """
    step = _int("step", step, 0)
    warm_step = _int("warm_step", warm_step, 1)
    s = _scale("simple_loss_scale", simple_loss_scale)
    if step >= warm_step:
        return s, 1.0
    f = step / warm_step
    return 1.0 - f * (1.0 - s), 0.1 + 0.9 * f


def pruned_rnnt_loss(joiner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     enc_out: torch.Tensor, pred_out: torch.Tensor, am: torch.Tensor,
                     lm: torch.Tensor, targets: torch.Tensor, enc_lengths: torch.Tensor,
                     target_lengths: torch.Tensor, s_range: int = 5, blank: int = 0,
                     reduction: str = "mean", simple_loss_scale: float = 0.5,
                     pruned_loss_scale: float = 1.0, samplewise: bool = False,
                     max_chunk_bytes: Optional[float] = None,
                     stats: Optional[Dict] = None) -> torch.Tensor:
    """simple_loss_scale * simple loss + pruned_loss_scale * pruned loss (Kuang et al. 2022).

    Args:
        joiner: maps enc (N, T, H_enc), pred (N, U+1, H_pred) to logits (N, T, U+1, V), cell by
            cell (memlab.models.transducer.Joiner; see the module docstring for the band call).
        enc_out (B, T, H_enc), pred_out (B, U+1, H_pred): encoder and predictor outputs.
        am (B, T, V), lm (B, U+1, V): the "simple" projections of enc_out and pred_out to the
            vocabulary (two extra Linear layers of the model), added to form the simple joint;
            or the two projections themselves (callables such as nn.Linear: ``am(enc_out)``,
            ``lm(pred_out)``), which lets ``samplewise=True`` run them group by group too.
        targets (B, U), enc_lengths (B,), target_lengths (B,): as in memlab.transducer.
        s_range: symbols per frame kept for the joiner (>= 1; clipped to U+1, U the longest
            target; a band that cannot hold a path raises ValueError).
        reduction: "none" (B,), "sum", or "mean" (over the batch, torchaudio's convention).
        simple_loss_scale, pruned_loss_scale: weights of the two parts (see :func:`warmup_scales`).
        samplewise: compute the band one group of samples at a time, so the (B, T, s_range, V)
            tensor never exists for the whole batch; groups fit ``max_chunk_bytes`` (band logits +
            their gradient; None: 64 MiB). With ``am`` and ``lm`` given as projections, each
            group also computes its own simple joint, lattice and bounds, so no (B, T, V) tensor
            exists either (groups then also count the simple joint; None: 16 MiB). The joiner's gradients are computed in this call and
            delivered in backward, as in memlab.transducer.samplewise_rnnt_loss ("none": the band
            is recomputed in backward instead).
        stats: optional dict, filled with "simple" and "pruned" per-sample losses (B,), "starts"
            (B, T') the window starts, "s_range" (after clipping) and, sample-wise, "chunks".
    The lattices are float32 (float64 for float64 inputs); the result has am's dtype.
    """
    am_fn = lm_fn = None
    if not isinstance(am, torch.Tensor) or not isinstance(lm, torch.Tensor):
        if isinstance(am, torch.Tensor) or isinstance(lm, torch.Tensor) \
                or not (callable(am) and callable(lm)):
            raise TypeError(f"am and lm must both be tensors or both be projections (callables), "
                            f"got {type(am).__name__} and {type(lm).__name__}")
        for name, x in (("enc_out", enc_out), ("pred_out", pred_out)):
            _check_tensor(name, x, 3, "float")
        if samplewise is True:           # per group; stand-ins (expanded views) for the checks
            am_fn, lm_fn = am, lm
            with torch.no_grad(), torch.random.fork_rng(
                    devices=[enc_out.device] if enc_out.device.type == "cuda" else []):
                am = _projected("am", am_fn, enc_out[:1, :1], (1, 1))             # (1, 1, V)
                lm = _projected("lm", lm_fn, pred_out[:1], (1, pred_out.shape[1]))  # (1, U+1, V)
            am = am.expand(enc_out.shape[0], enc_out.shape[1], am.shape[2])       # (B, T, V)
            lm = lm.expand(pred_out.shape[0], *lm.shape[1:])                      # (B, U+1, V)
        else:
            am = _projected("am", am, enc_out, tuple(enc_out.shape[:2]))          # (B, T, V)
            lm = _projected("lm", lm, pred_out, tuple(pred_out.shape[:2]))        # (B, U+1, V)
    s_range = _check_args(joiner, enc_out, pred_out, am, lm, targets, enc_lengths,
                          target_lengths, s_range, blank, reduction)
    simple_loss_scale = _scale("simple_loss_scale", simple_loss_scale)
    pruned_loss_scale = _scale("pruned_loss_scale", pruned_loss_scale)
    if not isinstance(samplewise, bool):
        raise TypeError(f"samplewise must be a bool, got {samplewise!r}")
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict or None, got {type(stats).__name__}")
    t_max, u_max = int(enc_lengths.max()), int(target_lengths.max())
    S = min(s_range, u_max + 1)
    _check_band(S, enc_lengths, target_lengths)
    # pad only to the longest sample
    enc_out, am = enc_out[:, :t_max], am[:, :t_max]                               # (B, T', .)
    pred_out, lm = pred_out[:, :u_max + 1], lm[:, :u_max + 1]                     # (B, U'+1, .)
    targets = targets[:, :u_max]                                                  # (B, U')

    if am_fn is not None:                        # everything group by group
        total, simple, pruned_b, starts, dtype = _samplewise_all(
            joiner, am_fn, lm_fn, enc_out, pred_out, targets, enc_lengths, target_lengths, S,
            blank, reduction, simple_loss_scale, pruned_loss_scale, max_chunk_bytes, am.shape[2],
            stats)
        if stats is not None:
            stats.update(simple=simple, pruned=pruned_b, starts=starts, s_range=S)
        return total.to(dtype)
    px, py = simple_lattice(am, lm, targets, target_lengths, blank)               # (B,T',U'), (B,T',U'+1)
    simple, gx, gy = lattice_loss(px, py, enc_lengths, target_lengths)            # (B,)
    starts = prune_ranges(gx, gy, enc_lengths, target_lengths, S)                 # (B, T')
    if samplewise:
        pruned, pruned_b = _samplewise_band(joiner, enc_out, pred_out, starts, S, targets,
                                            enc_lengths, target_lengths, blank, reduction,
                                            max_chunk_bytes, am.shape[2], stats)
    else:
        pruned_b = _band_losses(joiner, enc_out, pred_out, starts, S, targets, enc_lengths,
                                target_lengths, blank)                            # (B,)
        pruned = _reduce(pruned_b, reduction)
    if stats is not None:
        stats.update(simple=simple.detach(), pruned=pruned_b.detach(), starts=starts, s_range=S)
    total = simple_loss_scale * _reduce(simple, reduction) + pruned_loss_scale * pruned
    return total.to(am.dtype)


def samplewise_pruned_rnnt_loss(joiner, enc_out, pred_out, am, lm, targets, enc_lengths,
                                target_lengths, s_range: int = 5, blank: int = 0,
                                reduction: str = "mean", simple_loss_scale: float = 0.5,
                                pruned_loss_scale: float = 1.0,
                                max_chunk_bytes: Optional[float] = None,
                                stats: Optional[Dict] = None) -> torch.Tensor:
    """:func:`pruned_rnnt_loss` with the band computed one group of samples at a time."""
    return pruned_rnnt_loss(joiner, enc_out, pred_out, am, lm, targets, enc_lengths,
                            target_lengths, s_range, blank, reduction, simple_loss_scale,
                            pruned_loss_scale, True, max_chunk_bytes, stats)
