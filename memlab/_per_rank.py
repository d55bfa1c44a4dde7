"""Memory per rank of a data-parallel Config (``parallel="ddp"|"fsdp2"``, ``nproc=N``), measured
by the meter on fake tensors of one rank's step (``memlab.lab.estimate_config`` calls this).

What each of N ranks needs, the model behind the figure:

* The step is the local one: the rank's ``B / N`` utterances (``B`` the global batch, which must
  divide by N), so activations and the batch ("other") are those of B / N.
* The estimate runs as rank 0 of a *fake* process group of N ranks (torch's ``fake`` backend:
  collectives do nothing, each rank's buffers are still allocated), so ``SyncBatchNorm`` and the
  8-bit optimizers' gathers run their own code on fake tensors.
* DDP (``memlab.parallel.wrap``: ``gradient_as_bucket_view=True``): parameters, gradients and
  optimizer state are full on every rank. DDP itself cannot run on fake tensors (its C++
  reducer reads data), so its buckets are modelled: one flat gradient buffer per rank, allocated
  when the model is wrapped and alive for the whole run (counted as "gradients" from the start),
  each parameter's gradient copied into its view when autograd has accumulated it and the fresh
  one freed (what the reducer does with bucket views). No second copy of the gradients.
* FSDP2 runs for real on the fake group (``fully_shard`` per block of ``fsdp_blocks``, then the
  model, the optimizer built on the DTensor shards, as ``ParallelExperiment``): parameters,
  gradients and optimizer state are this rank's shards, ``ceil(dim0 / N)`` rows of every
  parameter (FSDP2 pads the last rank's shard; rank 0's, the largest, is what is measured);
  buffers are not sharded. On top, what FSDP2 all-gathers: the root module's own parameters
  (the stem and the head: not resharded after forward) and, one block at a time, the current
  block's unsharded parameters plus the next one's prefetched (forward and backward), and the
  unsharded gradients of a block until they are reduce-scattered. The meter counts those
  gathered buffers where they are allocated: "activations" in forward (and in backward with
  grad mode on), "gradients" in backward.

The breakdown keeps the meter's categories; ``RankEstimate.summary()`` says "per rank".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from memlab._estimate import Estimate


@dataclass
class RankEstimate(Estimate):
    """An :class:`Estimate` of one rank of a data-parallel run (rank 0)."""
    parallel: str = "none"
    nproc: int = 1
    local_batch: int = 0

    def summary(self) -> str:
        from memlab.memory import format_bytes
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self._breakdown.items())
        return (f"estimated peak per rank {format_bytes(self.peak)} in {self.peak_phase} "
                f"({self.parallel} on {self.nproc} ranks, {self.local_batch} utterances each; "
                f"{parts})")


def local_batch(batch_size: int, nproc: int) -> int:
    """B / N, or a ValueError naming batch_size and nproc."""
    if batch_size % nproc:
        raise ValueError(f"batch_size must be divisible by nproc={nproc} (each rank takes "
                         f"batch_size / nproc utterances), got batch_size={batch_size}")
    return batch_size // nproc


@contextlib.contextmanager
def fake_group(nproc: int, device):
    """A fake process group of ``nproc`` ranks (this process rank 0) and its 1-D device mesh,
    destroyed on exit. Refused inside a real process group (torch has one default group)."""
    import torch.distributed as dist
    from memlab.parallel import in_group
    if in_group():
        raise ValueError("a per-rank estimate (parallel='ddp'/'fsdp2') runs in a fake process "
                         "group of its own: call estimate_config outside a process group "
                         "(e.g. before torchrun's ranks start, or in `memlab plan --nproc N`)")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:  # pragma: no cover - builds without torch.distributed
        raise ValueError("a per-rank estimate needs torch.distributed (the fake backend)") \
            from None
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=nproc)
    try:
        yield init_device_mesh(torch.device(device).type, (nproc,))
    finally:
        dist.destroy_process_group()


def ddp_buckets(model: torch.nn.Module) -> list:
    """DDP's gradient buckets with ``gradient_as_bucket_view=True``, modelled: one flat buffer
    per dtype, every parameter's ``.grad`` a view of it from now on (after autograd accumulates a
    fresh gradient it is copied into the view and the fresh one dropped). Returns the buffers
    (keep them alive: DDP's reducer does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    flats = []
    for dtype in dict.fromkeys(p.dtype for p in params):
        group = [p for p in params if p.dtype == dtype]
        flat = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=group[0].device)
        flats.append(flat)
        off = 0
        for p in group:
            view = flat[off:off + p.numel()].view_as(p)
            off += p.numel()
            p.grad = view

            def copy_in(p, view=view):
                if p.grad is not view:
                    with torch.no_grad():
                        view.copy_(p.grad)
                    p.grad = view
            p.register_post_accumulate_grad_hook(copy_in)
    return flats


def estimate_per_rank(cfg, batch_size: int, frames: int, steps: int,
                      num_classes: Optional[int], target_len: Optional[int]) -> RankEstimate:
    """What each of ``cfg.nproc`` ranks needs for one step of ``cfg`` at global batch
    ``batch_size`` (see the module docstring)."""
    from memlab import parallel, tasks
    from memlab.lab import build_model, build_optimizer, training_step
    from memlab.memory import estimate
    n, mode = cfg.nproc, cfg.parallel
    b = local_batch(batch_size, n)
    task, step = tasks.get(cfg.task), training_step(cfg)
    keep: list = []

    def setup():
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=num_classes)
        if cfg.sync_bn:
            model = parallel.convert_sync_batchnorm(model)
        if mode == "fsdp2":
            model = parallel.wrap(model, "fsdp2", torch.device(cfg.device), mesh=mesh)
        else:
            keep.extend(ddp_buckets(model))
        opt = build_optimizer(cfg, model)
        return (model, opt, *task.random_batch(cfg, b, frames, num_classes, target_len))

    def run(model, opt, *batch):
        step(model, opt, batch)

    with fake_group(n, cfg.device) as mesh:
        e = estimate(run, setup, steps=steps, device=cfg.device)
    keep.clear()
    return RankEstimate(e.peak, e.baseline, e.peak_phase, e.breakdown(), e.category_peaks(),
                        e.host_peak, parallel=mode, nproc=n, local_batch=b)
