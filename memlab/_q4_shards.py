"""4-bit states of FSDP2 (DTensor, ``Shard(0)``) parameters, stepped as one process steps them.

A rank holds one segment ``[a, a + n)`` of the flattened global parameter and keeps 4-bit states
of that segment only (~1/world of the state bytes), laid out so that every code and scale is the
one a single process holds for the same elements:

* ``<name>_q4``: uint8 (ceil(n / 2),), the segment's codes packed two per byte *locally*
  (segment element 2i in the low nibble of byte i): the bytes are the rank's own, so a segment
  that starts at an odd element shares no byte with its neighbour.
* ``<name>_absmax`` (block-wise scales): one float32 per block of the *global* tensor that the
  segment touches (``phase = a % block_size``), as the 8-bit states (:mod:`memlab._shard_edges`).
  A block split between ranks has its absmax all-reduced (MAX) before anything is encoded.
* ``exp_avg_sq_rank1`` (rank-1 scales, decided on the global shape): the global per-axis maxima,
  the same vector on every rank (``sum(dims)`` floats). Each step every rank computes the maxima of
  its rows (axis 0: its own rows; the other axes: over its rows) and one all-reduce (MAX) makes
  them the global ones. The sharded axis is dim 0, so a row is never split.

One all-reduce per parameter and step carries both moments' shared values, with a NaN flag per
value (a NaN anywhere makes the global maximum NaN, as ``amax`` in one process; inf stays inf).
The element-wise math is that of :func:`memlab.optim4bit._adam4bit_step` in the same order, and
maxima are exact in any order, so a sharded run equals a single-process run bit for bit (same
gradients in, same parameters and states out), whatever the shard sizes. A shard of more than
2 x ``memlab._q4_chunks.CHUNK`` elements is stepped in parts of whole rows (cut where one
process cuts its chunks), so the step's temporaries are those of one part (measured 2.2 MB for a
shard of 1 M elements, against ~27 B per element of the shard in one go); a first pass computes
the maxima the ranks must agree on, a second updates and encodes (parts whose codes share a
byte keep each other's nibble).

Checkpoint form (``state_dict()``, what ``torch.distributed.checkpoint`` saves on N ranks and
loads on M): codes as a uint8 DTensor laid out like the parameter, *one code per element*
(DCP reshards it element-wise; a byte holds one code there, so a checkpoint's codes take 1 B per
element instead of 0.5), block absmaxes all-gathered to the global vector, rank-1 maxima as they
are (already global). Loading also takes a single process's packed state (each rank unpacks its
segment). Fake tensors (``memlab.memory.estimate``) have no offsets: the segment is taken to
start at 0 (rank 0's layout, the one the per-rank estimate measures) and no collective runs.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from memlab._optim_state import _is_fake, global_absmax
from memlab._shard_edges import all_reduce_max, segments, shared_blocks
from memlab.distributed import as_dtensor_like, flat_shard, is_dtensor, local, shard_group
from memlab._q4_chunks import CHUNK, _grad, _rank1_scale
from memlab.quant import _blocks
from memlab.quant4 import (_codes, _dims, _table, _zero_code, pack4, sqrt_rounded,
                           unpack4, use_rank1)


def supported(p: Tensor) -> bool:
    """Whether DTensor ``p``'s shard is one segment of the flattened tensor (Shard(0) and
    Replicate placements), the layouts these states follow."""
    from torch.distributed.tensor import Shard
    return all(pl.is_replicate() or (type(pl) is Shard and pl.dim == 0) for pl in p.placements)


def segment(p: Tensor) -> Tuple[int, int]:
    """(start, numel) of this rank's segment (start 0 on fake tensors)."""
    if _is_fake(local(p)):
        return 0, local(p).numel()
    return tuple(flat_shard(p))


# ----------------------------------------------------------------------------------------------
# block-wise scales of a segment that starts ``phase`` elements into a block


def _pieces(n: int, phase: int, bs: int) -> List[Tuple[int, int, int, int]]:
    """(start, end, rows, first scale) of the segment's elements: a head piece in the block it
    starts inside (if any), then whole blocks, then a short tail."""
    out, head = [], (min(bs - phase, n) if phase else 0)
    if head:
        out.append((0, head, 1, 0))
    full = (n - head) // bs
    if full:
        out.append((head, head + full * bs, full, int(head > 0)))
    if head + full * bs < n:
        out.append((head + full * bs, n, 1, int(head > 0) + full))
    return out


def _block_maxes(x: Tensor, phase: int, bs: int, out: Tensor) -> Tensor:
    """max |x| of each block piece into ``out`` (one per block the segment touches)."""
    for s, e, rows, i in _pieces(x.numel(), phase, bs):
        torch.amax(x[s:e].view(rows, -1).abs(), dim=1, out=out[i:i + rows])
    return out


def _block_apply(x: Tensor, scale: Tensor, phase: int, bs: int, divide: bool) -> Tensor:
    """x * scale (decode) or x / scale (encode; a scale of 0 divides by 1), block by block."""
    out = torch.empty_like(x) if divide else x
    for s, e, rows, i in _pieces(x.numel(), phase, bs):
        sc = scale[i:i + rows, None]
        if divide:
            torch.div(x[s:e].view(rows, -1), sc.masked_fill(sc == 0, 1.0),
                      out=out[s:e].view(rows, -1))
        else:
            x[s:e].view(rows, -1).mul_(sc)
    return out


# ----------------------------------------------------------------------------------------------
# rank-1 maxima of whole rows (their scales: memlab._q4_chunks); codes of a part of the segment


def _rank1_partial(v: Tensor, dims, r0: int, r1: int) -> Tensor:
    """The contribution of rows [r0, r1) of v >= 0 to the global per-axis maxima: their axis-0
    maxima in their places, their maxima of every other axis, 0 elsewhere."""
    out = torch.zeros(sum(dims), dtype=torch.float32, device=v.device)
    if r1 == r0:
        return out
    a, d = v.view(r1 - r0, *dims[1:]), len(dims)
    start = 0
    for k, size in enumerate(dims):
        m = a.amax(dim=tuple(j for j in range(d) if j != k))
        at = start + (r0 if k == 0 else 0)
        out[at:at + m.numel()] = m
        start += size
    return out


def _get(packed: Tensor, s: int, e: int, signed: bool) -> Tensor:
    """fp32 map values of local elements [s, e) (codes packed from local element 0)."""
    code, _ = _table(signed, packed.device)
    c = unpack4(packed[s // 2:(e + 1) // 2], e - s + s % 2)[s % 2:]
    return code.index_select(0, c.int())


def _put(packed: Tensor, s: int, c: Tensor) -> None:
    """Write codes ``c`` (0..15) of local elements [s, s + len(c)), keeping the other nibble of a
    byte shared with elements outside (a part that starts or ends at an odd element)."""
    c = c.to(torch.uint8)
    if s % 2 and c.numel():
        b = packed[s // 2:s // 2 + 1]
        b.copy_((b & 15) | (c[:1] << 4))
        c, s = c[1:], s + 1
    full = c.numel() - c.numel() % 2
    if full:
        pack4(c[:full], out=packed[s // 2:(s + full) // 2])
    if c.numel() > full:
        b = packed[(s + full) // 2:(s + full) // 2 + 1]
        b.copy_((b & 0xF0) | c[full:])


# ----------------------------------------------------------------------------------------------
# state, step


def new_state(p: Tensor, group: dict) -> dict:
    """Zero 4-bit states of this rank's segment of DTensor ``p`` (eligibility and rank-1 decided
    on the global shape, so every rank decides alike)."""
    a, n = segment(p)
    bs, dev = group["block_size"], local(p).device
    out = {}
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        z = _zero_code(signed)
        out[name + "_q4"] = torch.full((-(-n // 2),), z | (z << 4), dtype=torch.uint8,
                                       device=dev)
        if not signed and use_rank1(p.shape, bs, group["rank1"]):
            out[name + "_rank1"] = torch.zeros(sum(_dims(p.shape)), dtype=torch.float32,
                                               device=dev)
        else:
            out[name + "_absmax"] = torch.zeros(_blocks(n, bs, a % bs), dtype=torch.float32,
                                                device=dev)
    return out


def _slots(p: Tensor, a: int, n: int, bs: int):
    """(number of shared blocks of ``p`` (every rank's, the same on all), [(slot, local block)]
    of those this rank's segment touches); (0, []) when no collective runs (fake tensors, a
    parameter not split along dim 0)."""
    segs = None if _is_fake(local(p)) else segments(p)
    if segs is None:
        return 0, []
    blocks, first = shared_blocks(segs, bs), a // bs
    count = _blocks(n, bs, a % bs)
    return len(blocks), [(j, b - first) for j, b in enumerate(blocks) if first <= b < first + count]


def _all_reduce_max(p: Tensor, vals: Tensor) -> Tensor:
    """MAX over the ranks that split ``p``, NaN-aware (NaN anywhere -> NaN); ``vals`` itself
    when no collective runs."""
    group = shard_group(p)
    if group is None or _is_fake(vals) or not vals.numel():
        return vals
    return all_reduce_max(vals, group)


class _Part:
    """Local elements [s, e) of a segment that starts at global element a: whole rows of the
    rank-1 axes, the blocks it touches (local indices [i0, i0 + count)), its phase."""

    def __init__(self, a: int, s: int, e: int, bs: int, row: int):
        self.s, self.e, self.phase = s, e, (a + s) % bs
        self.i0, self.count = (a + s) // bs - a // bs, _blocks(e - s, bs, (a + s) % bs)
        self.r0, self.r1 = (a + s) // row, (a + e) // row


def _parts(a: int, n: int, bs: int, row: int) -> List[_Part]:
    """The segment in parts of about ``_q4_chunks.CHUNK`` elements (one part up to twice that):
    cut at global multiples of whole rows that fill whole blocks, as one process's chunks."""
    if n <= 2 * CHUNK:
        return [_Part(a, 0, n, bs, row)] if n else []
    step = bs // math.gcd(row, bs)
    size = max(step, CHUNK // row // step * step) * row
    cuts = [a] + list(range((a // size + 1) * size, a + n, size)) + [a + n]
    return [_Part(a, x - a, y - a, bs, row) for x, y in zip(cuts, cuts[1:])]


def _moments(st: dict, part: _Part, bs: int, rk) -> Tuple[Tensor, Tensor]:
    """The stored (exp_avg, exp_avg_sq) of ``part``, fp32 (e - s,) each; ``rk``: the rank-1
    axes (or None: block-wise)."""
    s, e, ph, i0 = part.s, part.e, part.phase, part.i0
    m = _block_apply(_get(st["exp_avg_q4"], s, e, True), st["exp_avg_absmax"][i0:], ph, bs,
                     False)
    v = _get(st["exp_avg_sq_q4"], s, e, False)
    if rk is None:
        return m, _block_apply(v, st["exp_avg_sq_absmax"][i0:], ph, bs, False)
    scale = _rank1_scale(st["exp_avg_sq_rank1"], rk, part.r0, part.r1)
    return m, v.view(part.r1 - part.r0, *rk[1:]).mul_(scale).view(-1)


def _axes(p: Tensor) -> Tuple[tuple, int]:
    dims = _dims(p.shape) or (1,)
    return dims, math.prod(dims[1:])


def local_moments(p: Tensor, st: dict, bs: int) -> Tuple[Tensor, Tensor]:
    """The stored moments of this rank's shard of ``p``, fp32 of the local shard's shape."""
    a, n = segment(p)
    dims, row = _axes(p)
    rk = dims if "exp_avg_sq_rank1" in st else None
    parts = [_moments(st, part, bs, rk) for part in _parts(a, n, bs, row)]
    shape = local(p).shape
    if not parts:
        return tuple(torch.zeros(shape, dtype=torch.float32, device=local(p).device)
                     for _ in range(2))
    return tuple(torch.cat(x).view(shape) for x in zip(*parts))


def adam4bit_step(p: Tensor, grad: Tensor, st: dict, *, block_size: int, step: int, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
                  maximize: bool, dither: bool = False) -> None:
    """One Adam/AdamW step of DTensor ``p``'s shard with 4-bit states ``st`` (this module's
    layout); a collective over the ranks that split ``p``: call on every rank, in one order.

    A large shard is stepped a part at a time (temporaries of one part, as one process's
    :mod:`memlab._q4_chunks`); when new maxima are needed before encoding (rank-1, or blocks
    split between ranks) a first pass computes them, the all-reduce runs, and a second pass
    updates and encodes (a single part is computed once)."""
    lp, gl, bs = local(p).detach().view(-1), local(grad).reshape(-1), block_size
    a, n = segment(p)
    if weight_decay != 0 and decoupled:
        lp.mul_(1 - lr * weight_decay)
    l2 = 0.0 if decoupled else weight_decay
    dims, row = _axes(p)
    rank1 = "exp_avg_sq_rank1" in st
    rk = dims if rank1 else None
    parts = _parts(a, n, bs, row)
    k, mine = _slots(p, a, n, bs)

    def update(part):
        g = _grad(lp[part.s:part.e], gl[part.s:part.e], maximize, l2)
        m, v = _moments(st, part, bs, rk)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        return m, v

    def here(part):                          # this part's shared blocks: (slot, index in part)
        return [(j, i - part.i0) for j, i in mine if part.i0 <= i < part.i0 + part.count]

    red, done = None, {}
    if rank1 or k:                           # pass 1: the maxima the ranks must agree on
        f32 = dict(dtype=torch.float32, device=lp.device)
        am, av = torch.zeros(k, **f32), torch.zeros(k, **f32)
        r1max = torch.zeros(sum(dims), **f32) if rank1 else None
        for part in parts:
            if not (rank1 or here(part)):
                continue
            m, v = done[id(part)] = update(part)
            if len(parts) > 1:
                done.clear()                 # recomputed in pass 2: temporaries of one part
            shared = here(part)
            if shared:                       # the maxima of this part's blocks, once
                pm = _block_maxes(m, part.phase, bs, torch.empty(part.count, **f32))
                pv = None if rank1 else _block_maxes(v, part.phase, bs,
                                                     torch.empty(part.count, **f32))
            for j, i in shared:
                am[j] = pm[i]
                if not rank1:
                    av[j] = pv[i]
            if rank1:
                torch.maximum(r1max, _rank1_partial(v, dims, part.r0, part.r1), out=r1max)
        red = _all_reduce_max(p, torch.cat([am, r1max if rank1 else av]))
    at = step if dither else None            # dithered: by the global element index
    new_am = torch.empty_like(st["exp_avg_absmax"])
    new_av = None if rank1 else torch.empty_like(st["exp_avg_sq_absmax"])
    step_size, root2 = lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5
    for part in parts:                       # pass 2 (or the only one)
        m, v = done.pop(id(part), None) or update(part)
        denom = (sqrt_rounded(v) / root2).add_(eps)
        lp[part.s:part.e].addcdiv_(m, denom, value=-step_size)
        sc = new_am[part.i0:part.i0 + part.count]
        _block_maxes(m, part.phase, bs, sc)
        for j, i in here(part):
            sc[i] = red[j]
        _put(st["exp_avg_q4"], part.s, _codes(_block_apply(m, sc, part.phase, bs, True), True,
                                                a + part.s, at))
        if rank1:
            s = _rank1_scale(red[k:], dims, part.r0, part.r1).reshape(-1)
            vn = v / s.masked_fill(s == 0, 1.0)
        else:
            sc = new_av[part.i0:part.i0 + part.count]
            _block_maxes(v, part.phase, bs, sc)
            for j, i in here(part):
                sc[i] = red[k + j]
            vn = _block_apply(v, sc, part.phase, bs, True)
        _put(st["exp_avg_sq_q4"], part.s, _codes(vn, False, a + part.s, at))
    st["exp_avg_absmax"].copy_(new_am)
    if rank1:
        st["exp_avg_sq_rank1"].copy_(red[k:])
    else:
        st["exp_avg_sq_absmax"].copy_(new_av)


# ----------------------------------------------------------------------------------------------
# checkpoint form


def to_checkpoint(st: dict, p: Tensor, bs: int, where: str) -> dict:
    """The checkpoint form of a 4-bit state of DTensor ``p`` (module doc); a collective."""
    out = dict(st)
    n = local(p).numel()
    for name in ("exp_avg", "exp_avg_sq"):
        if name in st:                                              # fp32 (a small tensor)
            out[name] = as_dtensor_like(st[name], p)
            continue
        out[name + "_q4"] = as_dtensor_like(unpack4(st[name + "_q4"], n).contiguous(), p)
        if name + "_absmax" in st:
            out[name + "_absmax"] = global_absmax(st[name + "_absmax"], p, bs, where)
    return out


def codes_to_local(v: Tensor, p: Tensor) -> Tensor:
    """Loaded codes of ``p`` (global packed (ceil(N/2),), global one per element (N,), or a
    DTensor laid out like ``p``) as this rank's locally packed codes (ceil(n/2),)."""
    if is_dtensor(v) and is_dtensor(p) and v.device_mesh == p.device_mesh \
            and tuple(v.placements) == tuple(p.placements) and v.shape == p.shape:
        return pack4(v.to_local().reshape(-1))
    full = (v.full_tensor() if is_dtensor(v) else v).reshape(-1)
    total = p.numel()
    if full.numel() != total or total == 1:
        full = unpack4(full, total)                                 # a single process's bytes
    a, n = segment(p) if is_dtensor(p) else (0, total)
    return pack4(full[a:a + n])


def checked_codes(v, n_total: int) -> Optional[str]:
    """None if ``v`` holds codes of a parameter of ``n_total`` elements (packed or one per
    element), else what it should be."""
    if isinstance(v, Tensor) and v.dtype == torch.uint8 and v.numel() in (-(-n_total // 2),
                                                                          n_total):
        codes = v.full_tensor() if is_dtensor(v) else v
        if v.numel() == n_total and n_total > 1 and bool((codes > 15).any()):
            return "one code (0..15) per element"
        return None
    return f"uint8 with ceil({n_total} / 2) elements (two codes a byte) or {n_total} (one a byte)"
