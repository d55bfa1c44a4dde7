"""Data-parallel Experiments: the same run on N ranks (DDP or FSDP2), gloo on CPU, NCCL on CUDA.

    memlab compare --task speaker --optimizer adam8bit --nproc 2              # DDP, 2 CPU ranks
    memlab compare --task speaker --nproc 2 --parallel fsdp2 --sync-bn
    torchrun --nproc-per-node 2 -m memlab.train --task speaker --parallel ddp

What changes against one process (``Config.parallel`` "ddp" | "fsdp2", ``Config.nproc`` N):

* Data: every rank draws the same global batch of ``batch_size`` (same generator) and keeps its
  DistributedSampler-style slice ``batch[rank::N]``; the loss is each slice's mean and DDP /
  FSDP2 average the gradients, so N ranks at global batch B take exactly the steps one process
  at B takes (``batch_size % N == 0`` is required). The recorded loss is the ranks' mean.
* Model: DDP wraps the model after the optimizer is built (LowRankAdam's factors are then
  ordinary parameters; its frozen full weights have no gradient and are never reduced). FSDP2
  shards every block (each child of a ``ModuleList`` with parameters, a ``ReversibleSequence``
  as one unit: its autograd function must see the unsharded parameters), then the model, and
  builds the optimizer again on the DTensor parameters.
* BatchNorm: each rank normalizes with its own slice's statistics unless ``sync_bn=True``,
  which swaps every BatchNorm for :class:`SyncBatchNorm` (statistics all-reduced, on CPU too:
  torch's own is CUDA-only); only then does a parallel run with BatchNorm equal one process.
* Evaluation: on rank 0 only, with the full model (DDP: its module; FSDP2: the full state dict
  gathered onto a plain copy of the model), then broadcast, so every rank's records carry the
  same metrics. BatchNorm running statistics are rank 0's (without sync_bn: of its slices).
* Memory: each rank meters its own process (``MemoryMeter``); a metered record's ``ranks`` holds
  every rank's peak and breakdown (gathered), ``peak``/``breakdown`` stay the rank's own.

Refused (ValueError at ``Config.validate``): a batch not divisible by N, optimizer-step
'in-backward' (it steps before the gradients are reduced), lowrank-adam under FSDP2 (it rewires
the modules that FSDP2 shards), nproc > 1 without a parallel mode, more CUDA ranks than devices.
``Experiment.stop()`` is not supported across ranks (stop one rank and the others wait).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from memlab import lab
from memlab.lab import Experiment
from memlab.memory import format_bytes

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover
    dist = None

MODES = ("none", "ddp", "fsdp2")
_NOT_UNDER_FSDP2 = {          # optimizer -> why it cannot step FSDP2's sharded parameters
    "lowrank-adam": "it rewires the modules FSDP2 shards",
}
# where a rank's memory summary comes from in a metered Record
_RANK_FIELDS = ("peak", "breakdown", "category_peaks", "device_peak", "host_peak")


# ----------------------------------------------------------------------------- checks
def validate(cfg) -> None:
    """The parallel fields of a Config (called by ``Config.validate``)."""
    mode, n = getattr(cfg, "parallel", "none"), getattr(cfg, "nproc", 1)
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {MODES}, got {mode!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"nproc must be an int >= 1, got {n!r}")
    if not isinstance(getattr(cfg, "sync_bn", False), bool):
        raise TypeError(f"sync_bn must be a bool, got {cfg.sync_bn!r}")
    if mode == "none":
        if n > 1:
            raise ValueError(f"nproc={n} needs parallel='ddp' or 'fsdp2', got parallel='none'")
        if cfg.sync_bn:
            raise ValueError("sync_bn=True needs parallel='ddp' or 'fsdp2', got parallel='none'")
        return
    if cfg.batch_size % n:
        raise ValueError(f"batch_size must be divisible by nproc={n} (each rank takes "
                         f"batch_size / nproc utterances), got batch_size={cfg.batch_size}")
    if cfg.choice("optimizer-step") == "in-backward":
        raise ValueError(f"optimizer-step='in-backward' cannot run with parallel={mode!r}: it "
                         f"steps each parameter before its gradient is reduced across ranks")
    if mode == "fsdp2" and cfg.optimizer in _NOT_UNDER_FSDP2:
        raise ValueError(f"optimizer={cfg.optimizer!r} cannot run with parallel='fsdp2' "
                         f"({_NOT_UNDER_FSDP2[cfg.optimizer]}); use parallel='ddp'")
    if mode == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:  # pragma: no cover
            raise ValueError("parallel='fsdp2' needs torch.distributed.fsdp.fully_shard "
                             "(torch >= 2.6)") from None
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and n > torch.cuda.device_count():
        raise ValueError(f"nproc={n} CUDA ranks but only {torch.cuda.device_count()} CUDA "
                         f"device(s) are visible")


def backend(device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def in_group() -> bool:
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if in_group() else (0, 1)


def init_from_env(device: str = "cpu", timeout: float = 1800.0) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    if in_group():
        return
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError("parallel needs a process group: run `memlab compare --nproc N` or "
                         "`torchrun --nproc-per-node N -m memlab.train ...`")
    dist.init_process_group(backend(device), timeout=datetime.timedelta(seconds=timeout))


# ----------------------------------------------------------------------------- BatchNorm
class _AllReduce(torch.autograd.Function):
    """Sum over the ranks; its gradient is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks (sum and
    centred sum of squares all-reduced, differentiably), on any device; outside a process group
    or in eval mode it is a plain BatchNorm. Same parameters and buffers as the one it replaces."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and in_group() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        total = _AllReduce.apply(torch.cat([xf.sum(dims), count.view(1)]))       # (C + 1,)
        n = total[-1]
        mean = total[:-1] / n                                               # (C,)
        centred = xf - mean.view(shape)
        var = _AllReduce.apply(centred.square().sum(dims)) / n                    # (C,) biased
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():               # tensor ops only, no values read: an
                self.num_batches_tracked.add_(1)     # estimate on fake tensors runs this too
                m = (1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
                     if self.momentum is None else self.momentum)
                v = var.detach()
                unbiased = torch.where(n > 1, v * (n / (n - 1)).clamp_min(0), v)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm in ``module`` as a :class:`SyncBatchNorm` sharing its parameters and
    buffers (the same tensors: an optimizer built before keeps working)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, device="meta")
        out.weight, out.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            out._buffers[name] = module._buffers.get(name)
        out.train(module.training)
        return out
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


# ----------------------------------------------------------------------------- wrapping
def fsdp_blocks(model: nn.Module) -> List[nn.Module]:
    """The units FSDP2 shards before the model: each child with parameters of a ModuleList,
    outermost first; a ReversibleSequence (or a module holding one) is never split further."""
    from memlab.reversible import ReversibleSequence
    out: List[nn.Module] = []

    def walk(m: nn.Module):
        if isinstance(m, ReversibleSequence):
            return
        for child in m.children():
            if isinstance(m, nn.ModuleList) and any(True for _ in child.parameters()):
                out.append(child)
            else:
                walk(child)
    walk(model)
    return out


def wrap(model: nn.Module, mode: str, device: torch.device, mesh=None) -> nn.Module:
    """``model`` under DDP or FSDP2 (fully_shard per block, then the model; ``mesh``: FSDP2's
    device mesh, default the whole default process group)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        # gradients are views into DDP's buckets: no second copy of every gradient
        return DDP(model, device_ids=ids, gradient_as_bucket_view=True)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for block in fsdp_blocks(model):
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    raise ValueError(f"parallel must be 'ddp' or 'fsdp2' to wrap a model, got {mode!r}")


def full_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's full state dict on CPU on rank 0 ({} elsewhere); a collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


# ----------------------------------------------------------------------------- the experiment
class ParallelExperiment(Experiment):
    """An Experiment run by every rank of a process group (``Experiment(cfg)`` with
    ``cfg.parallel`` other than "none" is one of these); see the module docstring."""

    def __init__(self, config):
        super().__init__(config)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.device(self.config.device).type == "cuda" and \
                torch.device(self.config.device).index is None:
            self.config = self.config.replace(device=f"cuda:{local}")
        self._eval_model: Optional[nn.Module] = None

    def _setup(self):
        cfg = self.config
        init_from_env(cfg.device)
        self.rank, self.world = rank_world()
        if self.world != cfg.nproc:
            raise ValueError(f"nproc={cfg.nproc} but the process group has {self.world} ranks")
        dev = torch.device(cfg.device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        super()._setup()                       # the model, optimizer and global batch stream
        self.module = self.model               # the plain model (evaluation, state dicts)
        if cfg.sync_bn:
            self.module = convert_sync_batchnorm(self.module)
        self.model = wrap(self.module, cfg.parallel, dev)
        if cfg.parallel == "fsdp2":            # DTensor parameters: a new optimizer on them
            self.optimizer = lab.build_optimizer(cfg, self.model)
            self.scheduler = lab._schedule(cfg, self.optimizer)

    def _to_device(self, batch):
        # this rank's DistributedSampler-style slice of the global batch, a copy: a view would
        # keep the whole global batch alive on the rank (on CPU, where .to() does not copy)
        return super()._to_device(tuple(t[self.rank::self.world].contiguous() for t in batch))

    def _train_step(self, batch) -> float:
        loss = self._step(self.model, self.optimizer, batch).detach().float().reshape(1)
        dist.all_reduce(loss)                  # the global batch's mean loss
        return float(loss) / self.world

    def evaluate(self) -> Dict[str, float]:
        """The task's metrics on rank 0 with the full model, broadcast to every rank."""
        if self.config.parallel == "fsdp2":
            state = full_state(self.model)     # every rank takes part
            if self.rank == 0:
                if self._eval_model is None:
                    torch.manual_seed(self.config.seed)
                    self._eval_model = lab.build_model(self.config).to(self.config.device)
                self._eval_model.load_state_dict(state)
            model = self._eval_model
        else:
            model = self.module
        out: List[Any] = [None]
        if self.rank == 0:
            was = model.training
            model.eval()
            try:
                out[0] = self.task.evaluate(model, self.data, self.config.device)
            finally:
                model.train(was)
        dist.broadcast_object_list(out, src=0)
        return out[0]

    def run(self):
        for rec in super().run():
            if rec.metered:
                mine = {k: getattr(rec, k) for k in _RANK_FIELDS}
                mine["rank"] = self.rank
                every: List[Any] = [None] * self.world
                dist.all_gather_object(every, mine)
                rec.ranks = every
            yield rec


# ----------------------------------------------------------------------------- per-rank memory
def _metered_ranks(rank, world, cfgs, steps):
    from memlab.memory import MemoryMeter
    out = []
    for cfg in cfgs:
        exp = Experiment(cfg)
        exp._setup()
        best: Optional[Dict[str, Any]] = None
        for _ in range(steps):             # the metered step of Experiment.run, no evaluation
            batch = exp._to_device(next(exp._stream))
            with MemoryMeter(exp.config.device, model=exp.model, optimizer=exp.optimizer,
                             inputs=batch) as meter:
                exp._train_step(batch)
            if best is None or meter.peak >= best["peak"]:
                best = {"rank": rank, "peak": meter.peak, "breakdown": meter.breakdown(),
                        "phase": meter.peak_phase}
        out.append(best)
    return out


def measure_ranks(cfg, steps: int = 2, timeout: float = 300.0) -> List[Any]:
    """Train ``steps`` metered steps of a parallel ``cfg`` on ``cfg.nproc`` local ranks
    (gloo on CPU; memlab.distributed.launch, every process ended within ``timeout`` s): each
    rank's highest metered peak with its breakdown and phase, in rank order. ``cfg`` may be a
    list of Configs with the same nproc, run one after the other in one launch: then a list of
    those lists. Beside ``estimate_config(cfg)`` (the per-rank estimate) in tutorial 05 and
    the tests."""
    from memlab.distributed import launch
    cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg]
    if not cfgs:
        raise ValueError("cfg: measure_ranks needs a Config or a non-empty list of them")
    for c in cfgs:
        c.validate()
        if c.parallel == "none":
            raise ValueError("cfg: measure_ranks needs parallel='ddp' or 'fsdp2', got 'none'")
    n = cfgs[0].nproc
    if any(c.nproc != n for c in cfgs):
        raise ValueError(f"cfg: every Config must have the same nproc, got "
                         f"{[c.nproc for c in cfgs]}")
    threads = max(1, (os.cpu_count() or 1) // n)
    per_rank = launch(_metered_ranks, n, (cfgs, steps), timeout=timeout,
                      backend=backend(cfgs[0].device), threads=threads)
    out = [[per_rank[r][i] for r in range(n)] for i in range(len(cfgs))]
    return out if isinstance(cfg, (list, tuple)) else out[0]


# ----------------------------------------------------------------------------- compare
def _rank_row(rank, world, cfg, index, total, progress):
    from memlab.cli import _run_one
    row = _run_one(cfg, index, total, progress=progress and rank == 0)
    return row if rank == 0 else None


def summarize(row: Dict[str, Any], records) -> Dict[str, Any]:
    """A compare row of a parallel run: its label names the mode, ``rank_peaks`` every rank's
    highest metered peak (``rank_peak_bytes``: the same
    as ints), ``peak`` and the breakdown those of the rank with the highest."""
    cfg = row["config"]
    row["run"] = f"{row['run']} {cfg['parallel']}x{cfg['nproc']}"
    per_rank: Dict[int, Dict[str, Any]] = {}
    for rec in records:
        for r in (rec.ranks or []):
            best = per_rank.get(r["rank"])
            if best is None or r["peak"] >= best["peak"]:
                per_rank[r["rank"]] = r
    if per_rank:
        ranks = [per_rank[k] for k in sorted(per_rank)]
        top = max(ranks, key=lambda r: r["peak"])
        row["peak"] = top["peak"]
        row.update(top["breakdown"])
        row["rank_peak_bytes"] = [r["peak"] for r in ranks]
        row["rank_peaks"] = " / ".join(format_bytes(r["peak"]) for r in ranks)
    return row


def launches(cfg) -> bool:
    """True when this process must start ``cfg.nproc`` ranks (a parallel Config, and this
    process is not already one of its ranks)."""
    return getattr(cfg, "parallel", "none") != "none" and not in_group()


def run_one(cfg, index: int = 0, total: int = 1, progress: bool = True,
            timeout: Optional[float] = None) -> Dict[str, Any]:
    """Train ``cfg`` on ``cfg.nproc`` local ranks (memlab.distributed.launch); rank 0's row."""
    from memlab.distributed import launch
    timeout = float(os.environ.get("MEMLAB_PARALLEL_TIMEOUT", 7 * 86400)) if timeout is None \
        else timeout
    threads = max(1, (os.cpu_count() or 1) // cfg.nproc)
    rows = launch(_rank_row, cfg.nproc, (cfg, index, total, progress), timeout=timeout,
                  backend=backend(cfg.device), threads=threads)
    return rows[0]
