"""The transducer loss of one chunk and its gradient w.r.t. the logits, written in place.

This is the "function merging" of Braun et al. (arXiv 2211.16270, Sec. 3): the loss needs only
two log-probabilities per lattice cell, log p(blank | t, u) and log p(y_{u+1} | t, u), so one
pass over the chunk's logits (N, T, U+1, V) computes the log-normaliser (logsumexp over V) and
the two gathers; the alpha/beta recursions then run on the small (N, T, U+1) lattice; and the
gradient w.r.t. the logits has the closed form (Graves 2012, eq. 16, with the softmax folded in)

    d loss / d logits[t, u, v] = softmax(t, u)_v * occ(t, u) - tb(t, u) [v = blank]
                                                            - te(t, u) [v = y_{u+1}]
    tb(t, u) = exp(alpha(t, u) + lp_blank(t, u) + beta(t+1, u) - log Z)     (beta(T, U) = 0)
    te(t, u) = exp(alpha(t, u) + lp_emit(t, u) + beta(t, u+1) - log Z)
    occ(t, u) = tb(t, u) + te(t, u)                   (the probability that a path visits t, u)

so the gradient needs no second (N, T, U+1, V) tensor: ``exp(logits - (lognorm - log occ))``
overwrites the logits slice by slice, then the two one-hot terms are subtracted. Per-sample
weights w (the reduction's 1/B, or grad_output for "none") are folded into occ, tb and te.

Two implementations with the same results: a C kernel for CPU float32/float64 logits
(:mod:`memlab._lattice_kernel`; one read of the logits for the normaliser and gathers, one
read-write for the gradient) and the torch code below for everything else (CUDA, fp16/bf16,
no compiler, ``MEMLAB_CPU_KERNEL=0``). The torch recursion runs column by column (u), each column
a cumulative logsumexp over t, in float64 (the lattice is tiny; float64 keeps the prefix-sum
form exact to ~1e-12). The normaliser and the gradient are in float32 (float64 for float64
logits), computed slice by slice so that temporaries stay ~1 MiB whatever the chunk size.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

_NEG = -1e30                     # "log 0" that keeps sums finite (float64 lattice)
SLICE_ELEMENTS = 1 << 18         # elements of one (n, t-range, U+1, V) slice of the logits


def _slices(N: int, T: int, U1: int, V: int):
    step = max(1, SLICE_ELEMENTS // max(1, N * U1 * V))
    return [(t0, min(T, t0 + step)) for t0 in range(0, T, step)]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_probs(logits, tgt, blank):
    """lognorm (N, T, U+1) in the work dtype, lp_blank (N, T, U+1) and lp_emit (N, T, U) in
    float64: one read of the logits, slice by slice (the slice's temporaries are small)."""
    N, T, U1, V = logits.shape
    work = _work_dtype(logits.dtype)
    lognorm = torch.empty(N, T, U1, dtype=work, device=logits.device)         # (N, T, U+1)
    for t0, t1 in _slices(N, T, U1, V):
        lognorm[:, t0:t1] = torch.logsumexp(logits[:, t0:t1].to(work), dim=-1)
    lat = torch.float64
    ln = lognorm.to(lat)
    lp_blank = logits[..., blank].to(lat) - ln                                # (N, T, U+1)
    U = U1 - 1
    idx = tgt[:, None, :, None].expand(N, T, U, 1)                            # (N, T, U, 1)
    lp_emit = logits[:, :, :U].gather(-1, idx).squeeze(-1).to(lat) - ln[:, :, :U]  # (N, T, U)
    return lognorm, lp_blank, lp_emit


def _rev_logcumsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logcumsumexp(x.flip(dim), dim).flip(dim)


def _recursions(lp_blank, lp_emit, t_len, u_len, need_beta: bool):
    """alpha, beta (N, U+1, T) (column-major: one contiguous row per u) and log Z (N,).

    Column u of alpha solves alpha(t, u) = logaddexp(alpha(t-1, u) + b(t-1), c(t)) with
    c(t) = alpha(t, u-1) + e(t, u-1): with the prefix sums P(t) = sum_{r<t} b(r),
    alpha(t, u) = P(t) + logcumsumexp_t(c - P). Beta is the same from the other end, with the
    final blank of each sample injected at (T_b - 1, U_b) and cells past its lengths at log 0.
    """
    N, T, U1 = lp_blank.shape
    dev, lat = lp_blank.device, lp_blank.dtype
    b = lp_blank.transpose(1, 2).contiguous()                                 # (N, U+1, T)
    e = lp_emit.transpose(1, 2).contiguous()                                  # (N, U, T)
    P = torch.cat([b.new_zeros(N, U1, 1), b[:, :, :-1].cumsum(-1)], dim=-1)   # (N, U+1, T)
    alpha = torch.empty(N, U1, T, dtype=lat, device=dev)                      # (N, U+1, T)
    alpha[:, 0] = P[:, 0]
    for u in range(1, U1):
        c = alpha[:, u - 1] + e[:, u - 1]                                     # (N, T)
        alpha[:, u] = P[:, u] + torch.logcumsumexp(c - P[:, u], dim=-1)
    n_idx = torch.arange(N, device=dev)
    last_t = t_len - 1                                                        # (N,)
    final_b = b[n_idx, u_len, last_t]                                         # (N,)
    log_z = alpha[n_idx, u_len, last_t] + final_b                             # (N,)
    if not need_beta:
        return alpha, None, log_z
    t_ok = torch.arange(T, device=dev)[None, :] < t_len[:, None]              # (N, T)
    at_last = torch.arange(T, device=dev)[None, :] == last_t[:, None]         # (N, T)
    beta = torch.empty(N, U1, T, dtype=lat, device=dev)                       # (N, U+1, T)
    neg = b.new_full((N, T), _NEG)
    for u in range(U1 - 1, -1, -1):
        if u < U1 - 1:
            emit_ok = t_ok & (u < u_len)[:, None]                             # (N, T)
            d = torch.where(emit_ok, beta[:, u + 1] + e[:, u], neg)           # (N, T)
        else:
            d = neg
        inject = at_last & (u == u_len)[:, None]                              # (N, T)
        d = torch.where(inject, final_b[:, None], d)
        beta[:, u] = _rev_logcumsumexp(d + P[:, u], -1) - P[:, u]
    return alpha, beta, log_z


def _transitions(alpha, beta, b, e, t_len, u_len, log_z, log_w):
    """log of the weighted blank / emit transition probabilities (N, T, U+1) and (N, T, U) and
    of the weighted occupancy (N, T, U+1); cells outside a sample's lattice are -inf."""
    N, U1, T = alpha.shape
    dev = alpha.device
    neg_col = alpha.new_full((N, U1, 1), _NEG)
    beta_t1 = torch.cat([beta[:, :, 1:], neg_col], dim=-1)                    # beta(t+1, u)
    t_ar, u_ar = torch.arange(T, device=dev), torch.arange(U1, device=dev)
    final = (t_ar[None, None, :] == (t_len - 1)[:, None, None]) & \
            (u_ar[None, :, None] == u_len[:, None, None])                      # (N, U+1, T)
    beta_t1 = beta_t1.masked_fill(final, 0.0)                                 # the final blank
    shift = (log_w - log_z)[:, None, None]                                    # (N, 1, 1)
    log_tb = alpha + b + beta_t1 + shift                                      # (N, U+1, T)
    log_te = alpha[:, :-1] + e + beta[:, 1:] + shift                          # (N, U, T)
    log_occ = torch.logaddexp(log_tb, torch.cat([log_te, alpha.new_full((N, 1, T), _NEG)], dim=1))
    inside = (t_ar[None, None, :] < t_len[:, None, None]) & \
             (u_ar[None, :, None] <= u_len[:, None, None])                     # (N, U+1, T)
    ninf = float("-inf")
    log_tb = log_tb.masked_fill(~inside, ninf)
    log_te = log_te.masked_fill(~inside[:, 1:], ninf)   # u < U_b is implied by beta(t, u+1)
    log_occ = log_occ.masked_fill(~inside, ninf)
    return log_tb.transpose(1, 2), log_te.transpose(1, 2), log_occ.transpose(1, 2)


def _write_gradient(logits, out, lognorm, log_occ, log_tb, log_te, tgt, blank, sign):
    """out = sign * (softmax * occ - tb [blank] - te [target]) (out may be logits itself)."""
    N, T, U1, V = logits.shape
    work = lognorm.dtype
    shift = (lognorm.to(torch.float64) - log_occ).to(work)                    # (N, T, U+1)
    in_place = out is logits and logits.dtype == work
    for t0, t1 in _slices(N, T, U1, V):
        s = shift[:, t0:t1, :, None]                                          # (N, t, U+1, 1)
        if in_place:
            g = out[:, t0:t1].sub_(s).exp_()
        else:
            g = out[:, t0:t1]
            g.copy_((logits[:, t0:t1].to(work) - s).exp_())
        if sign is not None:
            g.mul_(sign[:, None, None, None].to(g.dtype))
    U = U1 - 1
    sgn = 1.0 if sign is None else sign.to(torch.float64)[:, None, None]
    te = (log_te.exp() * sgn).to(out.dtype)                                   # (N, T, U)
    idx = tgt[:, None, :, None].expand(N, T, U, 1)
    out[:, :, :U].scatter_add_(-1, idx, -te[..., None])   # padding targets (blank) add 0
    out[..., blank].sub_((log_tb.exp() * sgn).to(out.dtype))


def torch_loss(logits, tgt, t_len, u_len, blank, weights=None, out=None):
    """Pure-torch :func:`chunk_loss` (any device and float dtype)."""
    lognorm, lp_blank, lp_emit = _log_probs(logits, tgt, blank)
    alpha, beta, log_z = _recursions(lp_blank, lp_emit, t_len, u_len, weights is not None)
    if weights is not None:
        w = weights.to(device=logits.device, dtype=torch.float64)
        sign = None if bool((w >= 0).all()) else torch.where(w < 0, -1.0, 1.0).to(w)
        b = lp_blank.transpose(1, 2)
        e = lp_emit.transpose(1, 2)
        log_tb, log_te, log_occ = _transitions(alpha, beta, b, e, t_len, u_len, log_z,
                                               w.abs().log())
        _write_gradient(logits, out, lognorm, log_occ, log_tb, log_te, tgt, blank, sign)
    return -log_z


def _plain(t: torch.Tensor) -> bool:
    """A plain tensor, or a fake one (``memlab.memory.estimate``: the kernel's allocations are
    then made without running it); not another subclass."""
    if type(t) is torch.Tensor:
        return True
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def _kernel_ok(logits, out, need_contiguous: bool = True) -> bool:
    if os.environ.get("MEMLAB_CPU_KERNEL", "1") == "0":
        return False
    if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.float64):
        return False
    if not (_plain(logits) and (logits.is_contiguous() or not need_contiguous)):
        return False
    if out is not None and (not _plain(out) or not out.is_contiguous()
                            or out.dtype != logits.dtype or out.shape != logits.shape):
        return False
    from memlab import _lattice_kernel
    return _lattice_kernel.available()


def chunk_loss(logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
               target_lengths: torch.Tensor, blank: int, weights: Optional[torch.Tensor] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample transducer losses (N,) of one chunk, in float64; with ``weights`` (N,), also
    ``out`` = d sum_i w_i loss_i / d logits (``out`` may be ``logits``: then it is overwritten).

    ``logits`` (N, T, U+1, V) are unnormalised; the chunk is padded to its longest member
    (``logit_lengths`` <= T, ``target_lengths`` <= U); targets (N, U) were checked by the caller
    (within the lengths: in [0, V) and not blank). Cells past a sample's lengths get gradient 0.
    """
    N, T, U1, V = logits.shape
    t_len, u_len = logit_lengths.long(), target_lengths.long()
    valid = torch.arange(U1 - 1, device=logits.device)[None, :] < u_len[:, None]
    tgt = torch.where(valid, targets.long(), blank)                           # (N, U) pad -> blank
    if weights is not None and out is None:
        raise ValueError("chunk_loss: weights given without out")
    if _kernel_ok(logits, out):
        from memlab import _lattice_kernel
        return _lattice_kernel.chunk_loss(logits, tgt, t_len, u_len, blank, weights, out)
    return torch_loss(logits, tgt, t_len, u_len, blank, weights, out)
