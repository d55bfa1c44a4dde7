"""Small helpers for data-parallel runs: DTensor-aware views (what the 8-bit optimizers use under
FSDP2) and a launcher of N local ranks (gloo) for tests and examples.

DTensor parameters (``torch.distributed.fsdp.fully_shard``) hold one shard per rank; the helpers
here answer "which part of the flattened global tensor is mine" without any communication, except
``gather_rows`` (an all-gather over the ranks that split a tensor).
"""

from __future__ import annotations

import datetime
import io
import math
import os
import socket
import time
import traceback
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

try:  # builds without torch.distributed: nothing is ever a DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    dist, DTensor, Replicate, Shard = None, None, None, None

__all__ = ["is_dtensor", "local", "flat_shard", "shard_group", "as_dtensor_like", "gather_rows",
           "launch"]


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This rank's part of ``t`` (``t`` itself unless it is a DTensor); a view: writing into it
    writes into the DTensor."""
    return t.to_local() if is_dtensor(t) else t


def _local_offset(p) -> tuple:
    """(local shape, global offset) of this rank's shard of DTensor ``p``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    return compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)


def flat_shard(p: Tensor) -> Optional[tuple]:
    """(start, numel): this rank's shard as one segment of the flattened global tensor, or None
    when the shard is not one segment (a placement sharding a dim other than 0, or partial).
    A plain tensor is its own shard: (0, numel)."""
    if not is_dtensor(p):
        return 0, p.numel()
    if not all(pl.is_replicate() or (pl.is_shard() and pl.dim == 0 and type(pl) is Shard)
               for pl in p.placements):
        return None
    shape, offset = _local_offset(p)
    if tuple(shape[1:]) != tuple(p.shape[1:]):      # pragma: no cover - Shard(0) only
        return None
    row = math.prod(p.shape[1:])
    return (offset[0] * row if len(offset) else 0), math.prod(shape)


def shard_group(p: Tensor):
    """The process group of the ranks that split ``p`` (its one Shard(0) mesh dim), or None when
    nothing is split (plain tensor, all Replicate); ValueError for several sharded mesh dims."""
    if not is_dtensor(p):
        return None
    dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
    if not dims:
        return None
    if len(dims) > 1:
        raise ValueError(f"p must be sharded over one mesh dim, got placements {p.placements}")
    return p.device_mesh.get_group(dims[0])


def as_dtensor_like(t: Tensor, p: Tensor) -> Tensor:
    """``t`` (this rank's part, same numel as ``p.to_local()``) as a DTensor laid out like ``p``
    (same mesh, placements, global shape); no communication, no copy."""
    lp = p.to_local()
    return DTensor.from_local(t.view(lp.shape), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def gather_rows(t: Tensor, header: Sequence[int], group) -> list:
    """All-gather a 1-D tensor of any length per rank plus a few ints: [(header, tensor)] in rank
    order of ``group`` (padded to the longest for the collective, trimmed after)."""
    world = dist.get_world_size(group)
    head = torch.tensor([t.numel(), *header], dtype=torch.int64)
    heads = [torch.empty_like(head) for _ in range(world)]
    dist.all_gather(heads, head, group=group)
    longest = max(int(h[0]) for h in heads)
    pad = torch.zeros(longest, dtype=t.dtype, device=t.device)
    pad[:t.numel()] = t
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad, group=group)
    return [([int(x) for x in h[1:]], part[:int(h[0])]) for h, part in zip(heads, parts)]


# ----------------------------------------------------------------------------------------------
# launching N local ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world, port, backend, threads, timeout, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        try:
            out = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        buf = io.BytesIO()
        torch.save(out, buf)                 # bytes, not shared-memory tensors: we may exit first
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:                    # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))


def launch(fn: Callable, nprocs: int = 2, args: tuple = (), *, timeout: float = 120.0,
           backend: str = "gloo", threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` fresh processes (spawn) joined in one
    process group; return the ranks' results in rank order (each must be ``torch.save``-able with
    ``weights_only`` loading: tensors, numbers, strings, lists, dicts).

    ``fn`` must be importable (a module-level function). Every process is ended before this
    returns: after ``timeout`` seconds, or as soon as one rank fails, the others are terminated
    (then killed). A failure raises RuntimeError with the failing rank's traceback."""
    import multiprocessing as mp
    import queue as queue_mod
    if not (isinstance(nprocs, int) and nprocs >= 1):
        raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(fn, r, nprocs, port, backend, threads, timeout, args, q))
             for r in range(nprocs)]
    results, error, started = {}, None, []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.start()              # pickles fn and args: may raise (then only started ones end)
            started.append(p)
        while len(results) < nprocs and error is None:
            left = deadline - time.monotonic()
            if left <= 0:
                error = f"timed out after {timeout:.0f} s ({len(results)}/{nprocs} ranks done)"
                break
            try:
                rank, kind, payload = q.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and i not in results]
                if dead:
                    error = f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                continue
            if kind == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=True)
            else:
                error = f"rank {rank} failed:\n{payload}"
    finally:
        for p in started:
            p.join(timeout=5 if error is None else 0.5)
        for p in started:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():                  # pragma: no cover - ignored SIGTERM
                p.kill()
                p.join(timeout=5)
        q.close()
        q.join_thread()
    if error is not None:
        raise RuntimeError(error)
    return [results[r] for r in range(nprocs)]
