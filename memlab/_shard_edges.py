"""8-bit states of FSDP2 shards that do not start or end on a block boundary, stepped exactly.

Under FSDP2 (``fully_shard``: ``Shard(0)`` DTensor parameters) a rank holds one segment
``[a, a + n)`` of the flattened parameter. Its 8-bit states keep the blocks of the *global*
tensor (block ``b`` is elements ``[b * bs, (b + 1) * bs)``), so the local absmax holds one value
per global block that the segment touches, and the local QTensor has ``phase = a % bs``. A
segment that starts or ends inside a block shares that block with the neighbouring rank(s): its
absmax is the max |x| over all of it, which no rank can compute alone. Each step therefore:

1. steps the block-aligned interior of the segment as usual (the fused C kernel on CPU);
2. steps each shared ("edge") piece with the eager math, keeping its new fp32 states instead of
   encoding them (:class:`Deferred`), and records the piece's max |x|;
3. all-reduces (MAX) the partial maxima over the ranks that split the parameter: one call per
   process group per step, over every shared block of every such parameter (a NaN anywhere in a
   block makes its absmax NaN, as in one process);
4. encodes each edge piece with its block's absmax.

On CPU the eager math and the fused kernel give the same bits, so a run equals the
single-process run bit for bit (same gradients in, same parameters and states out) whatever the
shard sizes. Which blocks are shared follows from the global shape and the mesh alone
(``Shard(0)``'s chunking, checked against this rank's own offset), so every rank takes part in
the same all-reduces, also a rank whose segment is empty. Fake tensors (``memlab.memory.
estimate``, whose fake process group has no offsets to read) keep each shard's blocks to itself
(phase 0): that is rank 0's layout (its segment starts at 0), the rank the per-rank estimate
measures, so its state bytes are exact; another rank, whose segment starts inside a block, can
hold one absmax value (4 bytes) per state more, and the few-KiB temporaries of the edge pieces
are not modelled.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from memlab._optim_state import _is_fake
from memlab.distributed import flat_shard, is_dtensor, shard_group
from memlab.quant import QTensor


def segments(p: Tensor) -> Optional[List[Tuple[int, int]]]:
    """(start, numel) in the flattened global tensor of every rank's shard of DTensor ``p``, in
    the order of its shard group's ranks; None when ``p`` is not split along dim 0 into one
    segment per rank (plain tensor, Replicate only, other placements)."""
    if not is_dtensor(p) or _is_fake(p.to_local()) or flat_shard(p) is None \
            or shard_group(p) is None:
        return None
    from torch.distributed.tensor import Shard
    dim = next(i for i, pl in enumerate(p.placements) if pl.is_shard())
    world, me = p.device_mesh.size(dim), p.device_mesh.get_local_rank(dim)
    rows, row = p.shape[0], math.prod(p.shape[1:])
    split = getattr(Shard, "local_shard_size_and_offset", None) or \
        (lambda size, n, r: Shard(0)._local_shard_size_and_offset(size, n, r))
    segs = []
    for r in range(world):
        size, offset = split(rows, world, r)
        segs.append((int(offset) * row if size else rows * row, int(size) * row))
    mine = flat_shard(p)
    if mine[1] and tuple(mine) != segs[me]:            # pragma: no cover - another chunking
        raise RuntimeError(f"the shard of a parameter of shape {tuple(p.shape)} is {mine}, "
                           f"not {segs[me]} as Shard(0) chunks it: cannot share its blocks")
    return segs


def shared_blocks(segs: List[Tuple[int, int]], bs: int) -> List[int]:
    """The global blocks that more than one rank's segment touches (sorted)."""
    return sorted({a // bs for a, n in segs if n and a % bs})


def phase(p: Tensor, bs: int) -> int:
    """Where this rank's shard of ``p`` starts inside a block (0: on a boundary, or not an
    FSDP2 Shard(0) parameter)."""
    seg = flat_shard(p) if is_dtensor(p) and not _is_fake(p.to_local()) else None
    return seg[0] % bs if seg is not None and seg[1] else 0


def split(p: Tensor, bs: int):
    """(interior (start, end), [(start, end, global block)] edge pieces, shared blocks) of this
    rank's shard of ``p`` in local flat elements, or None when no rank shares a block of ``p``
    (the shared blocks: every rank's, sorted)."""
    segs = segments(p)
    if segs is None:
        return None
    a, n = flat_shard(p)
    total = p.numel()
    head = min((bs - a % bs) % bs, n)
    e = a + n
    tail = e % bs if (n > head and e % bs and e < total) else 0
    edges = ([(0, head, a // bs)] if head else []) + ([(n - tail, n, e // bs)] if tail else [])
    blocks = shared_blocks(segs, bs)
    if not blocks:
        return None
    return (head, n - tail), edges, blocks   # edges may be empty: this rank's ends align


def cached_split(cache: dict, p: Tensor, bs: int):
    """``split(p, bs)``, computed once per parameter, layout and block size (``cache``: a dict
    the optimizer keeps, id(param) -> (key, result))."""
    key = (tuple(p.shape), tuple(p.placements), id(p.device_mesh), bs)
    hit = cache.get(id(p))
    if hit is None or hit[0] != key:
        hit = cache[id(p)] = (key, split(p, bs))
    return hit[1]


class Deferred(QTensor):
    """A one-block QTensor view whose ``copy_`` keeps the new fp32 values (and their max |x|)
    instead of encoding them: the block's absmax is known only after the all-reduce."""

    def copy_(self, x: Tensor, scratch: Optional[Tensor] = None, nonneg: bool = False):
        self.pending = x.detach().reshape(-1).to(torch.float32)         # (n,) new fp32 state
        self.partial = (self.pending if nonneg else self.pending.abs()).amax()   # 0-dim
        return self

    quantize_ = copy_


class _Group:
    """One process group's share of a step's all-reduce."""

    def __init__(self, group):
        self.group = group
        self.size = 0            # slots: the shared blocks x states of its parameters
        self.first: dict = {}    # id(param) -> (first slot, {global block: index}, blocks)
        self.pieces: list = []   # (slot, Deferred) of this rank's edge pieces


class Slots:
    """The all-reduce of one step: per process group, every shared block of every parameter
    (in plan order, the same on every rank), and this rank's edge pieces that fill them."""

    def __init__(self):
        self.groups: dict = {}          # id(process group) -> _Group

    def add(self, p: Tensor, nstates: int, blocks: List[int]) -> None:
        """Reserve the slots of parameter ``p``: ``nstates`` x its shared ``blocks``."""
        group = shard_group(p)
        g = self.groups.setdefault(id(group), _Group(group))
        g.first[id(p)] = (g.size, {b: i for i, b in enumerate(blocks)}, len(blocks))
        g.size += nstates * len(blocks)

    def piece(self, p: Tensor, block: int, states: list) -> None:
        """Register an edge piece of ``p`` in global ``block`` with its deferred states."""
        g = self.groups[id(shard_group(p))]
        first, index, count = g.first[id(p)]
        g.pieces += [(first + i * count + index[block], s) for i, s in enumerate(states)]

    def finish(self) -> None:
        """All-reduce the partial maxima and encode every edge piece with its block's absmax."""
        for g in self.groups.values():
            if not g.size:
                continue
            device = g.pieces[0][1].absmax.device if g.pieces else _device(g.group)
            vals = torch.zeros(g.size, dtype=torch.float32, device=device)
            for k, s in g.pieces:         # one piece per slot on a rank: head, tail blocks differ
                vals[k] = s.partial
            vals = all_reduce_max(vals, g.group)
            for k, s in g.pieces:
                s.absmax.copy_(vals[k])
                s.encode_with_absmax_(s.pending)
                del s.pending, s.partial


def all_reduce_max(vals: Tensor, group) -> Tensor:
    """MAX of float32 ``vals`` over the ranks of ``group``, NaN-aware: a NaN on any rank makes
    that value NaN (as ``amax`` in one process; inf stays inf). A new tensor on vals' device."""
    nan = torch.isnan(vals)
    buf = torch.cat([vals.masked_fill(nan, 0.0), nan.float()]).to(_device(group))  # max, flag
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    buf = buf.to(vals.device)
    k = vals.numel()
    return torch.where(buf[k:] > 0, float("nan"), buf[:k])


def _device(group) -> torch.device:
    """Where a collective of ``group`` takes its tensors (NCCL: this rank's CUDA device)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
