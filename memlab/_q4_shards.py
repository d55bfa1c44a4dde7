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
gradients in, same parameters and states out), whatever the shard sizes.

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
import torch.distributed as dist
from torch import Tensor

from memlab._optim_state import _is_fake, global_absmax
from memlab._shard_edges import _device, segments, shared_blocks
from memlab.distributed import as_dtensor_like, flat_shard, is_dtensor, local, shard_group
from memlab.quant import _blocks
from memlab.quant4 import _dims, _encode, _table, pack4, unpack4, use_rank1


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
# rank-1 scales of a segment of whole rows


def _rows(p: Tensor, a: int, n: int):
    """(dims, r0, r1, sharded): the rank-1 axes, this rank's rows [r0, r1) of dims[0], and
    whether dims[0] is the sharded dim 0 (else the segment is all of the tensor or nothing)."""
    dims = _dims(p.shape)
    if p.shape[0] != 1:
        row = math.prod(p.shape[1:])
        return dims, a // row, (a + n) // row, True
    return dims, 0, (dims[0] if n else 0), False


def _rank1_scale(maxes: Tensor, dims, r0: int, r1: int) -> Tensor:
    """min_k s_k[i_k] over this rank's rows: float32 (r1 - r0, *dims[1:])."""
    d, start, scale = len(dims), 0, None
    for k, size in enumerate(dims):
        s = maxes[start:start + size]
        s = (s[r0:r1] if k == 0 else s).view([(r1 - r0 if k == 0 else size) if j == k else 1
                                              for j in range(d)])
        scale = s if scale is None else torch.minimum(scale, s)
        start += size
    return scale.expand((r1 - r0, *dims[1:]))


def _rank1_partial(v: Tensor, dims, r0: int, r1: int) -> Tensor:
    """This rank's contribution to the global per-axis maxima of v >= 0: its rows' axis-0
    maxima in their places, its maxima over its rows of every other axis, 0 elsewhere."""
    out = torch.zeros(sum(dims), dtype=torch.float32, device=v.device)
    if r1 == r0:
        return out
    a, d = v.view(r1 - r0, *dims[1:]), len(dims)
    start = 0
    for k, size in enumerate(dims):
        m = a.amax(dim=tuple(j for j in range(d) if j != k))
        out[start + (r0 if k == 0 else 0):start + (r0 if k == 0 else 0) + m.numel()] = m
        start += size
    return out


# ----------------------------------------------------------------------------------------------
# state, step


def new_state(p: Tensor, group: dict) -> dict:
    """Zero 4-bit states of this rank's segment of DTensor ``p`` (eligibility and rank-1 decided
    on the global shape, so every rank decides alike)."""
    a, n = segment(p)
    bs, dev = group["block_size"], local(p).device
    out = {}
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        z = 7 if signed else 0
        out[name + "_q4"] = torch.full((-(-n // 2),), z | (z << 4), dtype=torch.uint8,
                                       device=dev)
        if not signed and use_rank1(p.shape, bs, group["rank1"]):
            out[name + "_rank1"] = torch.zeros(sum(_dims(p.shape)), dtype=torch.float32,
                                               device=dev)
        else:
            out[name + "_absmax"] = torch.zeros(_blocks(n, bs, a % bs), dtype=torch.float32,
                                                device=dev)
    return out


def _decode(codes: Tensor, n: int, signed: bool) -> Tensor:
    code, _ = _table(signed, codes.device)
    return code.index_select(0, unpack4(codes, n).int())                # (n,) map values


def _slots(p: Tensor, a: int, n: int, bs: int):
    """(number of shared blocks of ``p`` (every rank's, the same on all), [(slot, local block)]
    of those this rank's segment touches), or None when no collective runs (fake tensors, a
    parameter not split along dim 0)."""
    segs = None if _is_fake(local(p)) else segments(p)
    if segs is None:
        return None
    blocks, first = shared_blocks(segs, bs), a // bs
    count = _blocks(n, bs, a % bs)
    return len(blocks), [(j, b - first) for j, b in enumerate(blocks) if first <= b < first + count]


def _all_reduce_max(p: Tensor, vals: Tensor) -> Tensor:
    """MAX over the ranks that split ``p``, NaN-aware (NaN anywhere -> NaN)."""
    group = shard_group(p)
    if group is None or _is_fake(vals) or not vals.numel():
        return vals
    nan = torch.isnan(vals)
    buf = torch.cat([vals.masked_fill(nan, 0.0), nan.float()]).to(_device(group))
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    buf = buf.to(vals.device)
    k = vals.numel()
    return torch.where(buf[k:] > 0, float("nan"), buf[:k])


def _moments(p: Tensor, st: dict, bs: int):
    """(exp_avg, exp_avg_sq) of this rank's segment, fp32 (n,) each, and (dims, r0, r1) of a
    rank-1 second moment (Nones if block-wise)."""
    a, n = segment(p)
    m = _block_apply(_decode(st["exp_avg_q4"], n, True), st["exp_avg_absmax"], a % bs, bs, False)
    v = _decode(st["exp_avg_sq_q4"], n, False)
    if "exp_avg_sq_rank1" not in st:
        return m, _block_apply(v, st["exp_avg_sq_absmax"], a % bs, bs, False), (None, 0, 0)
    dims, r0, r1, _ = _rows(p, a, n)
    scale = _rank1_scale(st["exp_avg_sq_rank1"], dims, r0, r1)
    return m, v.view(r1 - r0, *dims[1:]).mul_(scale).view(-1), (dims, r0, r1)


def local_moments(p: Tensor, st: dict, bs: int) -> Tuple[Tensor, Tensor]:
    """The stored moments of this rank's shard of ``p``, fp32 of the local shard's shape."""
    m, v, _ = _moments(p, st, bs)
    return m.view(local(p).shape), v.view(local(p).shape)


def adam4bit_step(p: Tensor, grad: Tensor, st: dict, *, block_size: int, step: int, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
                  maximize: bool) -> None:
    """One Adam/AdamW step of DTensor ``p``'s shard with 4-bit states ``st`` (this module's
    layout); a collective over the ranks that split ``p``: call on every rank, in one order."""
    lp, bs = local(p).detach().view(-1), block_size                   # (n,) this rank's segment
    a, n = segment(p)
    ph = a % bs
    g = local(grad).reshape(-1)
    g = g if g.dtype == torch.float32 else g.float()
    if maximize:
        g = -g
    if weight_decay != 0:
        if decoupled:
            lp.mul_(1 - lr * weight_decay)
        else:
            g = g.add(lp, alpha=weight_decay).float()
    m, v, (dims, r0, r1) = _moments(p, st, bs)
    rank1 = dims is not None
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    lp.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
    # new scales: local maxima, then the shared ones all-reduced in one call
    am = _block_maxes(m, ph, bs, torch.empty_like(st["exp_avg_absmax"]))
    sv = (_rank1_partial(v, dims, r0, r1) if rank1 else
          _block_maxes(v, ph, bs, torch.empty_like(st["exp_avg_sq_absmax"])))
    slots = _slots(p, a, n, bs)
    if slots is not None and (slots[0] or rank1):
        k, mine = slots
        at = torch.tensor([j for j, _ in mine], dtype=torch.long, device=am.device)   # slots
        of = torch.tensor([i for _, i in mine], dtype=torch.long, device=am.device)   # blocks
        mk = am.new_zeros(k).index_copy_(0, at, am[of])
        vk = sv if rank1 else sv.new_zeros(k).index_copy_(0, at, sv[of])
        red = _all_reduce_max(p, torch.cat([mk, vk]))
        am[of] = red[:k][at]
        if rank1:
            sv = red[k:]
        else:
            sv[of] = red[k:][at]
    _, mids_m = _table(True, lp.device)
    pack4(_encode(_block_apply(m, am, ph, bs, True), mids_m), out=st["exp_avg_q4"])
    st["exp_avg_absmax"].copy_(am)
    _, mids_v = _table(False, lp.device)
    if rank1:
        s = _rank1_scale(sv, dims, r0, r1).reshape(-1)
        vn = v / s.masked_fill(s == 0, 1.0)
        st["exp_avg_sq_rank1"].copy_(sv)
    else:
        vn = _block_apply(v, sv, ph, bs, True)
        st["exp_avg_sq_absmax"].copy_(sv)
    pack4(_encode(vn, mids_v), out=st["exp_avg_sq_q4"])


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
