"""The 4-bit Adam step of a large tensor, a chunk of rows at a time (:mod:`memlab.optim4bit`).

Why: the whole-tensor step decodes both moments of the whole tensor to fp32 and encodes them
back, ~27 B of temporaries per element of the largest tensor at the step's peak, more than the
fp32 moments it replaces (measured on the optimizer-bound scenario of tutorial 06: Adam4bit's
optimizer category 52.5 MiB at the peak against fp32 Adam's 36.1). Here the temporaries are
those of one chunk of ``CHUNK`` elements.

The chunks are whole rows of the tensor's axes of size > 1 (the rank-1 axes), a multiple of the
block size in the flat order (so a chunk holds whole first-moment blocks). A block-wise second
moment needs one pass. A rank-1 second moment is normalized by the per-axis maxima of the *new*
moments, which are known only after every chunk is updated, so it takes two: the first computes
the new second moment of each chunk and only its maxima; the second computes it again from the
same stored codes, gradient and parameter (nothing was written yet), updates the first moment and
the parameter and encodes both moments. The operations on each element are those of the
whole-tensor step, in the same order, so the results are its bits (at one thread: torch's own
vectorized loops may differ by an ulp at the boundaries of its thread ranges).
"""

from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor

from memlab.quant4 import (Q4Tensor, _block_denormalize_, _block_normalize, _codes, _dims,
                           _table, pack4, sqrt_rounded, unpack4)

CHUNK = 1 << 16                # elements per chunk (about 1.8 MB of temporaries)


def usable(p: Tensor, grad: Tensor, exp_avg, exp_avg_sq) -> bool:
    """Chunk the step of ``p``: both moments 4-bit, p and grad contiguous, larger than a chunk."""
    return (isinstance(exp_avg, Q4Tensor) and isinstance(exp_avg_sq, Q4Tensor)
            and p.is_contiguous() and grad.is_contiguous() and p.numel() > 2 * CHUNK)


def _rows(shape, block: int) -> tuple:
    """(dims, rows per chunk): dims are the axes of size > 1 (one axis for a vector)."""
    dims = _dims(shape) or (1,)
    row = math.prod(dims[1:])                            # elements per row of axis 0
    step = block // math.gcd(row, block)                 # rows whose elements fill whole blocks
    rows = max(step, CHUNK // row // step * step)
    return dims, rows


def _decode(q: Q4Tensor, start: int, end: int, scale=None) -> Tensor:
    """fp32 values of elements [start, end) (start a multiple of the block size; ``scale``:
    the rank-1 scales of those elements)."""
    code, _ = _table(q.signed, q.codes.device)
    vals = code.index_select(0, unpack4(q.codes[start // 2:(end + 1) // 2], end - start).int())
    if scale is not None:
        return vals.view(scale.shape).mul_(scale).view(-1)
    return _block_denormalize_(vals, q.scale[start // q.block_size:], q.block_size)


def _encode_into(q: Q4Tensor, x: Tensor, start: int, end: int, scale=None,
                 step=None) -> None:
    """Quantize fp32 ``x`` (elements [start, end)) into q's codes (and, block-wise, absmax):
    nearest, or dithered at ``step``."""
    if scale is not None:
        s = scale.reshape(-1)
        xn = x / s.masked_fill(s == 0, 1.0)
    else:
        blocks = -(-(end - start) // q.block_size)
        first = start // q.block_size
        xn = _block_normalize(x, q.block_size, q.scale[first:first + blocks])
    pack4(_codes(xn, q.signed, start, step), out=q.codes[start // 2:(end + 1) // 2])


def _rank1_scale(maxes: Tensor, dims, r0: int, r1: int) -> Tensor:
    """min_k s_k[i_k] for rows [r0, r1) of axis 0: float32 (r1 - r0, *dims[1:])."""
    d, start, scale = len(dims), 0, None
    for k, n in enumerate(dims):
        s = maxes[start:start + n]
        if k == 0:
            s = s[r0:r1]
        s = s.view([s.numel() if j == k else 1 for j in range(d)])
        scale = s if scale is None else torch.minimum(scale, s)
        start += n
    return scale.expand((r1 - r0, *dims[1:])) if d > 1 else scale


def _grad(p: Tensor, grad: Tensor, maximize: bool, l2: float) -> Tensor:
    g = grad if grad.dtype == torch.float32 else grad.float()
    if maximize:
        g = -g
    if l2 != 0:
        g = g.add(p, alpha=l2).float()
    return g


def adam4bit_step(p: Tensor, grad: Tensor, exp_avg: Q4Tensor, exp_avg_sq: Q4Tensor, *,
                  step: int, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, decoupled: bool, maximize: bool,
                  dither: bool = False) -> None:
    """:func:`memlab.optim4bit._adam4bit_step` for a tensor that :func:`usable` accepts."""
    if weight_decay != 0 and decoupled:
        p.mul_(1 - lr * weight_decay)
    l2 = weight_decay if not decoupled else 0.0
    pf, gf = p.view(-1), grad.reshape(-1)
    dims, rows = _rows(p.shape, exp_avg.block_size)
    row = math.prod(dims[1:])
    spans = [(r0, min(r0 + rows, dims[0])) for r0 in range(0, dims[0], rows)]
    step_size = lr / (1 - beta1 ** step)
    root2 = (1 - beta2 ** step) ** 0.5
    rank1 = exp_avg_sq.rank1
    old = exp_avg_sq.scale.clone() if rank1 else None   # (sum(dims),) the maxima decoded with
    new: List[Tensor] = []                               # the new maxima of axes 1.. (rank-1)

    def second_moment(r0, r1):
        a, b = r0 * row, r1 * row
        g = _grad(pf[a:b], gf[a:b], maximize, l2)
        v = _decode(exp_avg_sq, a, b, _rank1_scale(old, dims, r0, r1) if rank1 else None)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        return g, v

    if rank1:                                            # pass 1: the new maxima only
        d = len(dims)
        first: List[Tensor] = []                         # axis 0: each chunk's own rows
        for r0, r1 in spans:
            _, v = second_moment(r0, r1)
            a = v.view(r1 - r0, *dims[1:])               # v >= 0: |v| is v
            first.append(a.amax(dim=tuple(range(1, d))))
            for k in range(1, d):
                m = a.amax(dim=tuple(j for j in range(d) if j != k))
                if len(new) < k:
                    new.append(m)
                else:
                    torch.maximum(new[k - 1], m, out=new[k - 1])
        maxes = torch.cat(first + new)                   # (sum(dims),)
    for r0, r1 in spans:                                 # pass 2 (or the only one)
        a, b = r0 * row, r1 * row
        g, v = second_moment(r0, r1)
        m = _decode(exp_avg, a, b)
        m.lerp_(g, 1 - beta1)
        denom = (sqrt_rounded(v) / root2).add_(eps)
        pf[a:b].addcdiv_(m, denom, value=-step_size)
        at = step if dither else None
        _encode_into(exp_avg, m, a, b, step=at)
        _encode_into(exp_avg_sq, v, a, b, _rank1_scale(maxes, dims, r0, r1) if rank1 else None,
                     at)
    if rank1:
        exp_avg_sq.scale.copy_(maxes)
