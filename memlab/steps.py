"""Step-level techniques: the standard alternatives that change the training step, not the model.

Each is registered once in ``memlab.techniques.builtin`` under a kind of its own, with a no-op
default, and combines with every model, optimizer and loss through the hooks of
``memlab.lab.train_step`` (see ``memlab.techniques.base``):

* precision (``fp32`` | ``bf16`` | ``fp16``): ``torch.autocast`` around forward + loss; the
  parameters (master weights), their gradients and the optimizer stay fp32. ``fp16`` adds a
  ``GradScaler`` (scale the loss, unscale, step, update) and exists only where CUDA does.
  Autocast casts each weight once per step; the meter counts those copies (2 B/param) as
  activations.
* accumulation (``none`` | ``accumulate2`` | ``accumulate4`` | ``accumulateK`` | ``K``): the
  batch is split into K micro-batches, each loss scaled by its share of the batch, the gradients
  summed, then one optimizer step: the summed gradient is the full-batch mean-loss gradient.
  ``Config.steps`` counts optimizer steps; ``batch_size`` stays the batch of one step.
  Caveat: BatchNorm normalizes (and updates its running statistics) per micro-batch, so a
  network with BatchNorm (the speaker ResNets) does not train exactly as on the whole batch.
* optimizer step (``after-backward`` | ``in-backward``): each parameter is updated by an
  optimizer of its own (the chosen optimizer's factory on that one parameter) from a
  ``register_post_accumulate_grad_hook`` and its gradient freed at once, so the gradients of
  all parameters never exist together. Refuses LowRankAdam (whole-matrix factors) and any
  technique that needs all gradients after backward (fp16 scaling, accumulation, clipping).
* offload (``none`` | ``host``, CUDA only): ``torch.autograd.graph.save_on_cpu(pin_memory=True)``
  keeps tensors saved for backward in pinned host memory; the meter reports the host bytes
  (``MemoryMeter.host_peak``, ``Record.host_peak``) beside the device breakdown.

References: PyTorch "Automatic Mixed Precision" and "How to save memory by fusing the optimizer
step into the backward pass" tutorials; ``torch.autograd.graph.save_on_cpu``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from memlab import techniques as tech

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def device_type(step: "tech.StepInfo") -> str:
    """The device type of the step's batch (the model's when the batch has no tensors)."""
    for t in step.batch:
        if isinstance(t, torch.Tensor):
            return t.device.type
    p = next(iter(step.model.parameters()), None)
    return p.device.type if p is not None else "cpu"


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def needs_cuda(kind: str, name: str) -> Callable[[Any], None]:
    """A ``check`` refusing a Config whose device is not CUDA."""
    def check(cfg):
        if torch.device(cfg.device).type != "cuda":
            raise ValueError(f"{kind}={name!r} needs device='cuda', got device={cfg.device!r}")
    return check


# ----------------------------------------------------------------------------- precision
def autocast(dtype: torch.dtype) -> Callable[["tech.StepInfo"], Any]:
    """``forward_context``: autocast to ``dtype`` on the batch's device type."""
    def context(step):
        return torch.autocast(device_type(step), dtype=dtype)
    return context


def _scaler(step) -> "torch.amp.GradScaler":
    scaler = step.state.get("grad_scaler")
    if scaler is None:                      # one per run: its scale adapts over the steps
        scaler = step.state["grad_scaler"] = torch.amp.GradScaler(device_type(step))
    return scaler


def scaled_backward(loss: torch.Tensor, step) -> None:
    """``backward``: backward of the loss times the current scale (fp16 gradients stay finite)."""
    _scaler(step).scale(loss).backward()


def scaled_optimizer_step(step) -> None:
    """``optimizer_step``: unscale the gradients, step unless one is inf/NaN, update the scale."""
    scaler = _scaler(step)
    grads = [p.grad for g in step.optimizer.param_groups for p in g["params"]
             if p.grad is not None]
    if grads and _is_fake(grads[0]):         # estimate: no data to check for inf (the unscale is
        step.optimizer.step()                # in place and allocates nothing); the same step
        return
    scaler.step(step.optimizer)
    scaler.update()


# ----------------------------------------------------------------------------- accumulation
def splitter(k: int) -> Callable[[tuple], List[Tuple[tuple, float]]]:
    """``split_batch``: ``k`` micro-batches along dim 0 (views, no copy), each with its share."""
    def split_batch(batch):
        n = int(batch[0].shape[0])
        parts = max(1, min(k, n))
        cols = [t.tensor_split(parts) if isinstance(t, torch.Tensor) and t.dim() > 0
                and t.shape[0] == n else (t,) * parts for t in batch]
        micro = [tuple(c) for c in zip(*cols)]                 # [(feats_i, ..., labels_i)]
        return [(m, int(m[0].shape[0]) / n) for m in micro]
    return split_batch


_ACCUMULATE = re.compile(r"(?:accumulate)?([0-9]+)")
_RESOLVED: Dict[str, "tech.Technique"] = {}


def accumulation(k: int, name: Optional[str] = None) -> Dict[str, Any]:
    """Keyword arguments of ``register("accumulation", name, ...)`` for k micro-batches."""
    name = name or f"accumulate{k}"

    def check(cfg):
        if cfg.batch_size < k:
            raise ValueError(f"accumulation={name!r} splits a batch into {k} micro-batches: "
                             f"batch_size must be >= {k}, got {cfg.batch_size}")
    return dict(description=f"{k} micro-batches of batch_size/{k}, gradients summed, one "
                            f"optimizer step (BatchNorm statistics per micro-batch)",
                split_batch=splitter(k), check=check, needs_gradients=k > 1, micro_batches=k)


def resolve_accumulation(name: str) -> Optional["tech.Technique"]:
    """The technique for ``accumulateK`` or ``K`` (K >= 1) when not registered under that name."""
    m = _ACCUMULATE.fullmatch(name.strip())
    if m is None or int(m.group(1)) < 1:
        return None
    if name not in _RESOLVED:
        _RESOLVED[name] = tech.make("accumulation", name, **accumulation(int(m.group(1)), name))
    return _RESOLVED[name]


# ----------------------------------------------------------------------------- step in backward
class _One(nn.Module):
    """One parameter as a module: what an optimizer factory ``factory(model, lr, ...)`` takes."""

    def __init__(self, p: nn.Parameter):
        super().__init__()
        self.p = p


class _StateView(Mapping):
    """``optimizer.state`` of every per-parameter optimizer, read as one mapping."""

    def __init__(self, optimizers):
        self._optimizers = optimizers

    def _merged(self):
        return {p: s for o in self._optimizers.values() for p, s in o.state.items()}

    def __getitem__(self, p):
        opt = self._optimizers.get(p)
        if opt is None or p not in opt.state:
            raise KeyError(p)
        return opt.state[p]

    def __iter__(self):
        return iter(self._merged())

    def __len__(self):
        return len(self._merged())

    def __contains__(self, p):
        return p in self._optimizers and p in self._optimizers[p].state


class InBackwardOptimizer(torch.optim.Optimizer):
    """Steps each parameter as soon as its gradient is complete, then frees that gradient.

    ``make(module)`` builds the chosen optimizer on a one-parameter module; this object's
    ``param_groups`` are theirs (the same dicts), so an LR scheduler on it schedules them all.
    ``step()`` steps only parameters that still hold a gradient (set without backward);
    ``remove()`` takes the hooks off the parameters.
    """

    def __init__(self, model: nn.Module, make: Callable[[nn.Module], torch.optim.Optimizer]):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("optimizer-step='in-backward' needs a model with trainable "
                             "parameters, got none")
        self.optimizers = {p: make(_One(p)) for p in params}
        super().__init__(params, {})
        self.param_groups = [g for o in self.optimizers.values() for g in o.param_groups]
        self.state = _StateView(self.optimizers)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, p: torch.Tensor) -> None:
        self.optimizers[p].step()                  # the gradient is complete: use it ...
        p.grad = None                              # ... and free it before the next one exists

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for p, opt in self.optimizers.items():
            if p.grad is not None:
                opt.step()
        return loss

    def add_param_group(self, param_group):
        if hasattr(self, "_handles"):
            raise TypeError("InBackwardOptimizer: parameters are fixed at construction")
        super().add_param_group(param_group)

    def state_dict(self):
        return {"per_parameter": [o.state_dict() for o in self.optimizers.values()]}

    def load_state_dict(self, state_dict):
        got = state_dict.get("per_parameter") if isinstance(state_dict, dict) else None
        if not isinstance(got, list) or len(got) != len(self.optimizers):
            raise ValueError(f"state_dict must hold 'per_parameter': a list of "
                             f"{len(self.optimizers)} optimizer states, got {type(got).__name__}")
        for o, s in zip(self.optimizers.values(), got):
            o.load_state_dict(s)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def in_backward_check(cfg) -> None:
    """Refuse the combinations a per-parameter step in backward cannot do."""
    chosen = cfg.chosen()
    opt = chosen.get("optimizer")
    if opt is not None and not opt.options.get("per_parameter", True):
        raise ValueError(f"optimizer-step='in-backward' cannot be combined with "
                         f"optimizer={opt.name!r}: it steps the model as a whole, not one "
                         f"parameter at a time")
    for t in chosen.values():
        if t.options.get("needs_gradients"):
            raise ValueError(f"optimizer-step='in-backward' cannot be combined with "
                             f"{t.kind}={t.name!r}: it needs every parameter's gradient after "
                             f"backward, and a step in backward frees each one at once")


def build_in_backward(model: nn.Module, make) -> InBackwardOptimizer:
    """``build_optimizer`` hook of optimizer-step='in-backward'."""
    return InBackwardOptimizer(model, make)


# ----------------------------------------------------------------------------- offload
def offload_context(step) -> Any:
    """``step_context``: tensors saved for backward go to pinned host memory and come back."""
    return torch.autograd.graph.save_on_cpu(pin_memory=True)


__all__ = ["DTYPES", "InBackwardOptimizer", "accumulation", "autocast", "build_in_backward",
           "device_type", "in_backward_check", "needs_cuda", "offload_context",
           "resolve_accumulation", "scaled_backward", "scaled_optimizer_step", "splitter"]
