"""4-bit Adam and AdamW: both moments in 4 bits, ~1.06 B/param of state instead of 8.

References
----------
* B. Li, J. Chen, J. Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023,
  arXiv 2309.01507: first moment block-wise (128) with the signed dynamic-exponent map; second
  moment with rank-1 normalization and the linear map without zero (no second moment is stored
  as 0, which would make Adam step by m / eps); dequantize, update in fp32, requantize. The
  requantization is dithered by default (``rounding``, see :class:`Adam4bit`; the paper rounds
  to the nearest value).
* The update rule is ``torch.optim.Adam`` / ``AdamW`` (single-tensor form, no amsgrad); a
  tensor with fewer than ``min_4bit_size`` elements keeps fp32 moments and gets exactly torch's
  update.

The formats (maps, normalization, packing) are in :mod:`memlab.quant4`. State of a 4-bit
parameter, all plain tensors in ``optimizer.state[p]`` (so every storage counter sees them):
``exp_avg_q4`` (uint8, ceil(N/2): two codes per byte), ``exp_avg_absmax`` (fp32, one per block),
``exp_avg_sq_q4`` and either ``exp_avg_sq_rank1`` (fp32 per-axis maxima) or
``exp_avg_sq_absmax`` (block-wise, for 1-D tensors and where rank-1 would cost more: see
:func:`memlab.quant4.use_rank1`), and ``step`` (int). A small tensor has ``exp_avg`` /
``exp_avg_sq`` (fp32), as torch.

Layout as :mod:`memlab.optim`: the math of one step is one pure function
(:func:`_adam4bit_step`); the classes do validation, param groups, state creation and
``state_dict``. A contiguous float32 CPU tensor is stepped in C (:mod:`memlab._q4_kernel`, the
same bits, no temporaries); everything else in torch ops, the same on CPU, CUDA and fake tensors
(``memlab.memory.estimate``). In torch ops the fp32 working copies exist only during one
tensor's update: ~27 B per element of that tensor, and a tensor of more than 2 x 65,536 elements
is updated a chunk of rows at a time (:mod:`memlab._q4_chunks`: two passes where a rank-1
second moment needs the new maxima first; the same bits), so the temporaries stay ~1.8 MB
instead of growing with the largest tensor (a 512 x 1024 Linear took 13.4 MB of temporaries
next to its 0.83 MB of state).

FSDP2 (DTensor parameters, ``Shard(0)``): each rank keeps 4-bit states of its shard only, laid
out so that a run equals one process bit for bit for any shard sizes, and ``state_dict()`` gives
a sharding-independent form that ``torch.distributed.checkpoint`` reshards
(:mod:`memlab._q4_shards`); 4-bit or fp32 and rank-1 or block-wise are decided on the global
shape.

Non-finite gradients: as torch, the parameter element becomes NaN/inf. In the 4-bit state a
non-finite value spoils its first-moment block (128 elements) and, with rank-1, its second
moment's row and column (block-wise: its block) from the next step on. Skip such steps
(``torch.amp.GradScaler`` does) if that matters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from memlab import _foreach_steps, _q4_chunks, _q4_kernel, _q4_shards
from memlab._optim_state import _to_local, check_grad, checked_states
from memlab.distributed import is_dtensor, local
from memlab.quant4 import Q4Tensor, num_blocks, sqrt_rounded, use_rank1

__all__ = ["Adam4bit", "AdamW4bit", "stored_moments", "ROUNDINGS"]

ROUNDINGS = ("dither", "nearest")

State = Union[Q4Tensor, Tensor]


# ----------------------------------------------------------------------------------------------
# the math


def _adam4bit_step(p: Tensor, grad: Tensor, exp_avg: State, exp_avg_sq: State, *, step: int,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   decoupled: bool, maximize: bool, dither: bool = False) -> None:
    """One Adam (decoupled=False) / AdamW (decoupled=True) step for one tensor, as torch.optim.

    p, grad: same shape; exp_avg (signed DE map) and exp_avg_sq (zero-free linear map):
    Q4Tensor or fp32 tensor of p's shape, updated in place; step: the step number after this
    update (1, 2, ...); dither: the new 4-bit moments are rounded with the thresholds of
    :func:`memlab.quant4.dither` at ``step`` (else to the nearest value).
    """
    if _q4_kernel.eligible(p, grad, exp_avg, exp_avg_sq):          # CPU float32: in C
        if _q4_kernel.real(p, grad, exp_avg.codes, exp_avg.scale, exp_avg_sq.codes,
                           exp_avg_sq.scale):
            return _q4_kernel.adam4bit_step(p, grad, exp_avg, exp_avg_sq, step=step, lr=lr,
                                            beta1=beta1, beta2=beta2, eps=eps,
                                            weight_decay=weight_decay, decoupled=decoupled,
                                            maximize=maximize, dither=dither)
        return     # fake tensors (estimate) of a step the kernel does: it allocates no tensor
    if _q4_chunks.usable(p, grad, exp_avg, exp_avg_sq):            # a large tensor: by chunks
        return _q4_chunks.adam4bit_step(p, grad, exp_avg, exp_avg_sq, step=step, lr=lr,
                                        beta1=beta1, beta2=beta2, eps=eps,
                                        weight_decay=weight_decay, decoupled=decoupled,
                                        maximize=maximize, dither=dither)
    g = grad if grad.dtype == torch.float32 else grad.float()      # (*S,)
    if maximize:
        g = -g
    if weight_decay != 0:
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay).float()                 # fp32 for any p dtype
    m = exp_avg.dequantize() if isinstance(exp_avg, Q4Tensor) else exp_avg            # (*S,)
    v = exp_avg_sq.dequantize() if isinstance(exp_avg_sq, Q4Tensor) else exp_avg_sq   # (*S,)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    root = sqrt_rounded(v) if isinstance(exp_avg_sq, Q4Tensor) else v.sqrt()   # fp32: torch's
    denom = (root / bias_correction2 ** 0.5).add_(eps)             # (*S,)
    p.addcdiv_(m, denom, value=-step_size)
    if isinstance(exp_avg, Q4Tensor):
        exp_avg.copy_(m, step if dither else None)
    if isinstance(exp_avg_sq, Q4Tensor):
        exp_avg_sq.copy_(v, step if dither else None)


# ----------------------------------------------------------------------------------------------
# bookkeeping

_SPECS = (("exp_avg", True), ("exp_avg_sq", False))      # (name, signed map)


# small checks (the same messages as memlab.optim's; kept here, that module's private helpers
# are not an interface)


def _refuse_dtensor(who: str, p: Tensor) -> None:
    """TypeError for a DTensor parameter whose shard is not one segment of the flattened tensor
    (a placement sharding a dim other than 0): the sharded 4-bit states follow Shard(0)."""
    if is_dtensor(p) and not _q4_shards.supported(p):
        raise TypeError(f"{who}: params holds a DTensor parameter of shape {tuple(p.shape)} "
                        f"with placements {p.placements}; 4-bit states of sharded parameters "
                        f"follow FSDP2's Shard(0) (and Replicate) only")


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{str(t.dtype)[6:]} with {t.numel()} elements of shape {tuple(t.shape)}"
    return f"{type(t).__name__} {t!r}"[:120]


def _checked_step(s, where: str) -> int:
    """A saved step counter: an int >= 0 or a 0-dim real tensor holding one."""
    val = None
    if isinstance(s, Tensor):
        if s.dim() == 0 and not s.is_complex() and s.dtype != torch.bool:
            val = s.item()
    elif _is_int(s):
        val = s
    if val is None or not math.isfinite(val) or val < 0 or val != int(val):
        raise ValueError(f"{where}: state 'step' must be an int >= 0 (or a 0-dim tensor holding "
                         f"one), got {_describe(s)}")
    return int(val)


def _own(t: Tensor, device: torch.device) -> Tensor:
    """A contiguous copy of ``t`` on ``device`` with a storage of its own (never shared with the
    state_dict it came from)."""
    return t.detach().to(device=device, copy=True).contiguous().clone()


def _states(p: Tensor, st: Mapping, group: dict) -> list:
    """The two moments of ``p`` as Q4Tensor views over ``st``'s tensors or fp32 tensors."""
    out = []
    for name, signed in _SPECS:
        if name in st:
            out.append(st[name])
            continue
        rank1 = name + "_rank1" in st
        scale = st[name + ("_rank1" if rank1 else "_absmax")]
        out.append(Q4Tensor(st[name + "_q4"], scale, p.shape, signed, group["block_size"],
                            rank1))
    return out


def _new_state(p: Tensor, group: dict) -> dict:
    """Zero states of ``p``; a DTensor (FSDP2) gets states of its local shard, 4-bit or fp32
    decided on its global numel (:mod:`memlab._q4_shards`)."""
    if p.numel() < group["min_4bit_size"]:
        return {name: torch.zeros_like(local(p), dtype=torch.float32,
                                       memory_format=torch.preserve_format)
                for name, _ in _SPECS}
    if is_dtensor(p):
        return _q4_shards.new_state(p, group)
    out = {}
    for name, signed in _SPECS:
        rank1 = not signed and use_rank1(p.shape, group["block_size"], group["rank1"])
        q = Q4Tensor.zeros(p.shape, signed, group["block_size"], rank1, p.device)
        out[name + "_q4"] = q.codes
        out[name + ("_rank1" if rank1 else "_absmax")] = q.scale
    return out


def stored_moments(opt: Optimizer, p: Tensor) -> Optional[tuple]:
    """(exp_avg, exp_avg_sq) of ``p`` as ``opt`` (Adam4bit / AdamW4bit) stores them, dequantized
    to fp32 of p's shape; None before its first step."""
    st = opt.state.get(p)
    if not st or "step" not in st:
        return None
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    if is_dtensor(p) and "exp_avg_q4" in st:                 # FSDP2: this rank's shard
        return _q4_shards.local_moments(p, st, group["block_size"])
    return tuple(s.dequantize() if isinstance(s, Q4Tensor) else s.clone()
                 for s in _states(p, st, group))


class Adam4bit(Optimizer):
    """Adam whose two moments are stored in 4 bits (Li, Chen, Zhu 2023): the first moment
    block-wise (``block_size`` 128) with the signed dynamic-exponent map, the second with the
    linear map without zero and rank-1 normalization (block-wise for 1-D tensors, and by default
    where rank-1's scales would be more than one per 32 elements: :func:`memlab.quant4.use_rank1`;
    ``rank1=True`` forces it for every tensor with two dims > 1, ``False`` never). ~1.04 B/param
    of state instead of 8. Same update as ``torch.optim.Adam`` (no amsgrad); L2 ``weight_decay``
    added to the gradient.

    ``rounding``: how the updated moments are rounded to the 16 values of their map.
    ``"dither"`` (default): to the value below or above with the probability that makes the
    stored value unbiased, the thresholds a lattice over the elements shifted by a hash of the
    step (:func:`memlab.quant4.dither`: deterministic, resumable bit for bit, the same on every
    path and sharding). ``"nearest"``: the nearest value, as the paper. With 4 bits
    an EMA's increment ``(1 - beta) * (g - m)`` is mostly smaller than half the gap between
    two values, so nearest rounding drops it and the moments stall (m lags g, v barely moves):
    on the 8-bit tests' MLP regression the loss curve then trails fp32 Adam's by up to 40% at
    its steep part (every tensor in 4 bits: 99%), dithered by 3.9% (17%).

    Tensors with fewer than ``min_4bit_size`` elements keep fp32 moments and follow torch's
    update exactly.
    """

    _decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, min_4bit_size: int = 4096, block_size: int = 128, *,
                 rank1: Optional[bool] = None, maximize: bool = False,
                 rounding: str = "dither"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        min_4bit_size=min_4bit_size, block_size=block_size, rank1=rank1,
                        maximize=maximize, rounding=rounding)
        super().__init__(params, defaults)

    # -- validation --------------------------------------------------------------------------

    @staticmethod
    def _validate(group: dict) -> None:
        _check("lr", group["lr"], _is_number(group["lr"]) and group["lr"] >= 0, "a float >= 0")
        betas, eps, wd = group["betas"], group["eps"], group["weight_decay"]
        _check("betas", betas, isinstance(betas, (tuple, list)) and len(betas) == 2
               and all(_is_number(b) and 0 <= b < 1 for b in betas), "two floats in [0, 1)")
        _check("eps", eps, _is_number(eps) and eps > 0, "a float > 0")
        _check("weight_decay", wd, _is_number(wd) and wd >= 0, "a float >= 0")
        m4 = group["min_4bit_size"]
        _check("min_4bit_size", m4, _is_int(m4) and m4 >= 0, "an int >= 0")
        bs = group["block_size"]
        _check("block_size", bs, _is_int(bs) and bs > 0, "a positive int")
        r1 = group["rank1"]
        _check("rank1", r1, r1 is None or isinstance(r1, bool), "None, True or False")
        _check("maximize", group["maximize"], isinstance(group["maximize"], bool), "a bool")
        _check("rounding", group["rounding"], group["rounding"] in ROUNDINGS,
               " or ".join(map(repr, ROUNDINGS)))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate(group)
            for p in group["params"]:
                if not p.is_floating_point():
                    raise TypeError(f"params must be floating-point tensors, got {p.dtype}")
                _refuse_dtensor(type(self).__name__, p)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    # -- step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """One optimizer step. ``closure`` re-evaluates the model and returns the loss.

        Every parameter and gradient is checked and every missing state allocated before any
        parameter, state or step counter changes, so a bad gradient (or an allocation that
        fails) leaves the optimizer and the model as they were."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                check_grad(self, p)
                _refuse_dtensor(type(self).__name__, p)
                st = self.state.get(p, {})
                staged = {} if "step" in st else _new_state(p, group)
                plan.append((p, group, staged, int(st.get("step", 0)) + 1))
        small: dict = {}                 # id(group) -> (group, [fp32-state CPU tensors])
        for p, group, staged, step in plan:
            st = self.state[p]
            st.update(staged)
            st["step"] = step
            beta1, beta2 = group["betas"]
            kw = dict(step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"], decoupled=self._decoupled,
                      maximize=group["maximize"], dither=group["rounding"] == "dither")
            if (not is_dtensor(p) and "exp_avg" in st and _foreach_steps.usable(
                    p, p.grad, (st["exp_avg"], st["exp_avg_sq"]), fake=True)):
                small.setdefault(id(group), (group, []))[1].append(
                    (p.detach(), p.grad, st["exp_avg"], st["exp_avg_sq"], step))
            elif is_dtensor(p) and "exp_avg_q4" in st:     # FSDP2 shard: a collective
                _q4_shards.adam4bit_step(p, p.grad, st, block_size=group["block_size"], **kw)
            elif is_dtensor(p):                            # fp32 states of the local shard
                _adam4bit_step(local(p).detach(), local(p.grad), st["exp_avg"],
                               st["exp_avg_sq"], **kw)
            else:
                _adam4bit_step(p.detach(), p.grad, *_states(p, st, group), **kw)
        for group, items in small.values():        # torch's update, one foreach call an op
            beta1, beta2 = group["betas"]
            _foreach_steps.adam(items, lr=group["lr"], beta1=beta1, beta2=beta2,
                                eps=group["eps"], weight_decay=group["weight_decay"],
                                decoupled=self._decoupled, maximize=group["maximize"])
        return loss

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """As torch's; the states of DTensor (FSDP2) parameters in their checkpoint form, which
        does not depend on the sharding (:mod:`memlab._q4_shards`: codes one per element as a
        DTensor laid out like the parameter, block absmaxes all-gathered; a collective: call on
        every rank) -- what ``torch.distributed.checkpoint`` saves on N ranks and loads on M."""
        sd = super().state_dict()
        owners = [(p, g) for g in self.param_groups for p in g["params"]]   # torch's ids
        sd["state"] = {k: (_q4_shards.to_checkpoint(st, owners[k][0], owners[k][1]["block_size"],
                                                    f"param {k}")
                           if st and is_dtensor(owners[k][0]) else st)
                       for k, st in sd["state"].items()}
        return sd

    def state_nbytes(self) -> int:
        """Bytes held in ``self.state`` (each storage once; memlab.memory.storage_bytes)."""
        from memlab.memory import storage_bytes
        return storage_bytes(self.state.values())

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but checked first and the states keep their dtypes (torch would cast the
        uint8 codes to the parameter dtype). Group and parameter counts, hyper-parameters and
        each parameter's state (keys, dtypes, sizes for its shape) are checked before anything
        changes; a mismatch raises a ValueError naming the group, the parameter, the key and
        expected vs got, and leaves the optimizer as it was. Loaded tensors are copied to the
        parameter's device (never shared with ``state_dict``)."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if isinstance(groups, list):           # saved before ``rounding`` existed: nearest
            state_dict = {**state_dict, "param_groups": [
                {"rounding": "nearest", **g} if isinstance(g, Mapping) else g for g in groups]}
        states = self._checked_states(state_dict)
        super().load_state_dict({**state_dict, "state": {}})
        for p, st in states.items():
            self.state[p] = st

    def _checked_states(self, state_dict) -> dict:
        return checked_states(self, state_dict, validate_group=self._validate,
                              param_state=self._checked_param_state)

    @staticmethod
    def _checked_param_state(st: Mapping, p: Tensor, group: dict, where: str) -> dict:
        if not st:
            return {}
        if "step" not in st:
            raise ValueError(f"{where}: state has no 'step' (keys: {sorted(map(str, st))})")
        n, bs = p.numel(), group["block_size"]

        def need(key, dtype, count, extra=""):
            t = st.get(key)
            if not (isinstance(t, Tensor) and t.dtype == dtype and t.numel() == count):
                raise ValueError(f"{where}: state '{key}' must be {str(dtype)[6:]} with {count} "
                                 f"elements{extra}, got {_describe(t)}")
        for name, signed in _SPECS:
            if name in st:
                t = st[name]
                if not (isinstance(t, Tensor) and t.dtype == torch.float32
                        and t.shape == p.shape):
                    raise ValueError(f"{where}: state '{name}' must be a float32 tensor of shape "
                                     f"{tuple(p.shape)}, got {_describe(t)}")
            elif name + "_q4" in st:
                bad = _q4_shards.checked_codes(st[name + "_q4"], n)
                if bad:
                    raise ValueError(f"{where}: state '{name}_q4' must be {bad}, got "
                                     f"{_describe(st[name + '_q4'])}")
                if name + "_rank1" in st and not signed:
                    dims = [d for d in p.shape if d != 1]
                    if len(dims) < 2:
                        raise ValueError(f"{where}: state '{name}_rank1' needs a parameter with "
                                         f">= 2 dims of size > 1")
                    need(name + "_rank1", torch.float32, sum(dims), " (sum of the dims > 1)")
                else:
                    need(name + "_absmax", torch.float32, num_blocks(n, bs),
                         f" (block_size={bs})")
            else:
                raise ValueError(f"{where}: state lacks '{name}' (fp32) or '{name}_q4' + its "
                                 f"scales (4-bit); it has {sorted(map(str, st))}")
        new = {k: (_own(_loaded(k, v, p, bs, where), local(p).device)
                   if isinstance(v, Tensor) else v) for k, v in st.items()}
        new["step"] = _checked_step(st["step"], where)
        for k in list(new):
            if k.endswith(("_q4", "_absmax", "_rank1")):
                new[k] = new[k].view(-1)
        return new


def _loaded(key: str, v: Tensor, p: Tensor, bs: int, where: str) -> Tensor:
    """A checked saved state tensor as this optimizer holds it for ``p``: codes packed two a
    byte (of the local shard for a DTensor ``p``), block absmaxes of the blocks the shard
    touches, rank-1 maxima global (:mod:`memlab._q4_shards`)."""
    if key.endswith("_q4"):
        if is_dtensor(p) or is_dtensor(v) or v.numel() != num_blocks(p.numel(), 2):
            return _q4_shards.codes_to_local(v, p)
        return v
    if key.endswith("_rank1"):
        return v.full_tensor() if is_dtensor(v) else v
    if key.endswith("_absmax") or key in ("exp_avg", "exp_avg_sq"):
        return _to_local(v, p, bs, key.endswith("_absmax"), where)
    return v


class AdamW4bit(Adam4bit):
    """Adam4bit with decoupled weight decay (``torch.optim.AdamW``): p *= 1 - lr * weight_decay."""

    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_4bit_size: int = 4096, block_size: int = 128, *,
                 rank1: Optional[bool] = None, maximize: bool = False,
                 rounding: str = "dither"):
        super().__init__(params, lr, betas, eps, weight_decay, min_4bit_size, block_size,
                         rank1=rank1, maximize=maximize, rounding=rounding)
