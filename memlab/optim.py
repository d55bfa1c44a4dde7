"""8-bit optimizers: SGD with momentum, Adam and AdamW with block-wise dynamic-tree states.

References
----------
* T. Dettmers, M. Lewis, S. Shleifer, L. Zettlemoyer, "8-bit Optimizers via Block-wise
  Quantization", ICLR 2022, arXiv 2110.02861: states stored as 8-bit dynamic-tree codes with one
  absmax per block of 256 (signed map for momentum / Adam's first moment, unsigned map for the
  second moment); each step dequantizes, updates in fp32 and requantizes; small tensors keep
  32-bit state.
* Z. Liu, Y. Qian, "Memory-Efficient Training for Deep Speaker Embedding Learning in Speaker
  Verification", arXiv 2412.01195: the same optimizers for speaker-embedding ResNets.
* The update rules are those of ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (single-tensor form);
  a tensor with fewer than ``min_8bit_size`` elements gets exactly torch's fp32 update.

Layout, after the style of torchao's optimizers: the math of one step for one tensor is one pure
function (``_sgd8bit_step``, ``_adam8bit_step``) that takes the parameter, its gradient and its
states -- each either a :class:`memlab.quant.QTensor` (8-bit) or an fp32 tensor -- and updates
them in place. The classes only do bookkeeping: validation, param groups, state creation,
``state_dict``, and feeding the pure function.

Memory: an 8-bit state is a uint8 code per element plus a float32 absmax per block, both plain
tensors in ``optimizer.state`` (``<name>_codes``, ``<name>_absmax``), so anything that counts
tensor storages sees ~1.016 B/param per state (SGD momentum ~1 B, Adam ~2 B instead of 4 / 8).
The fp32 working copies exist only during ``step()``, one piece of whole blocks at a time
(``CPU_CHUNK`` = 128 Ki elements on CPU, where cache-sized pieces are also 2-3x faster than whole
tensors; ``CUDA_CHUNK`` elsewhere), so they add a bounded ~20 B x piece, not 20 B/param.
Chunking changes nothing in the result: blocks are independent (tested bit for bit).

Speed: on CPU the default (``compile=None``) runs each 8-bit tensor's step as one fused C loop
per block (:mod:`memlab._cpu_kernels`, built with the system C compiler on first use and cached):
decode, update, absmax and encode touch each byte once, where the eager torch ops take 15-30
passes. Same math as the pure functions below, which stay the reference (tests compare the two;
float rounding can differ in the last bit, see that module). Without a C compiler, with
``MEMLAB_CPU_KERNEL=0`` or ``compile=False``, the pure function runs as eager torch ops,
vectorized over whole blocks. On CUDA the pure function is wrapped in
``torch.compile(fullgraph=True, dynamic=True)`` at first use; numbers that change (lr, step)
are passed as 0-dim tensors so an LR schedule does not recompile, and a failure to compile warns
once and falls back to eager. ``compile=True`` forces torch.compile on any device (on CPU
inductor's code for this gather-heavy step measured no faster than eager).

Data parallel: under DDP parameters and states are ordinary tensors; nothing changes. Under
FSDP2 (``torch.distributed.fsdp.fully_shard``, DTensor parameters) each rank steps its local
shard (``p.to_local()`` / ``grad.to_local()``, the fused kernel included) and holds states for
that shard only: ~1/world of the unsharded state bytes per rank. Blocks are the global
tensor's: a shard that starts or ends inside a block shares it with the next rank, and the step
all-reduces (MAX) the absmax of such blocks before encoding them (``memlab._shard_edges``), so a
run equals a single-process run (same bits of state for the same gradients) for any shard sizes.
8-bit or fp32 is decided on the global numel. ``state_dict()`` gives a sharding-independent form
that ``torch.distributed.checkpoint`` saves on N ranks and loads on M (:mod:`memlab._optim_state`).

Non-finite gradients: the update is computed in fp32 exactly as torch does, so a NaN/inf
gradient element makes that parameter element NaN/inf just as with ``torch.optim``. In the 8-bit
state it also makes its *block's* absmax non-finite, so the whole block (at most ``block_size``
elements of that one tensor) reads back as NaN from the next step on; other blocks and tensors
are untouched. Skip such steps (``torch.amp.GradScaler`` does) if that matters.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from memlab import _cpu_kernels, _foreach_steps, _shard_edges
from memlab._optim_state import (  # noqa: F401  (the helpers stay importable from here)
    _budget_meter, _check, _check_common, _checked_step, _compile_errors, _copy_state,
    _describe, _is_fake, _is_number, _own, _tensors, check_grad, checked_states, to_checkpoint)
from memlab.distributed import is_dtensor, local
from memlab.quant import QTensor

__all__ = ["SGD8bit", "Adam8bit", "AdamW8bit", "LowRankAdam"]

CPU_CHUNK = 2 ** 17          # elements per piece on CPU (rounded down to whole blocks)
CUDA_CHUNK = 2 ** 24         # on other devices: only bounds the fp32 temporaries of huge tensors

State = Union[QTensor, Tensor]
Scalar = Union[float, Tensor]  # python float on CPU; 0-dim tensor in the compiled CUDA path


# ----------------------------------------------------------------------------------------------
# the math: one pure function per optimizer


def _load(s: State, out: Optional[Tensor] = None) -> Tensor:
    """fp32 working copy of a state (the state itself when it is already fp32); ``out``: an
    fp32 buffer of the same numel to decode into (saves an allocation)."""
    return s.dequantize(out=out) if isinstance(s, QTensor) else s


def _store(s: State, x: Tensor, scratch: Optional[Tensor] = None, nonneg: bool = False) -> None:
    """Write the working copy back (a no-op for fp32 states, which were updated in place)."""
    if isinstance(s, QTensor):
        s.copy_(x, scratch, nonneg=nonneg)


def _add_scaled_(p: Tensor, x: Tensor, scale: Scalar) -> None:
    """p += scale * x, for a python-float or 0-dim-tensor scale."""
    if isinstance(scale, Tensor):
        p.add_(x * scale)
    else:
        p.add_(x, alpha=scale)


def _sgd8bit_step(p: Tensor, grad: Tensor, buf: Optional[State] = None, *, lr: Scalar,
                  momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                  maximize: bool, first: bool) -> None:
    """One SGD(+momentum) step for one tensor, as torch.optim.SGD; ``buf`` is updated in place.

    p, grad: same shape (or flat chunks); buf: QTensor / fp32 tensor of the same numel, or None
    when momentum == 0; first: the buffer is empty (torch starts it at the gradient).
    """
    g = grad if grad.dtype == torch.float32 else grad.float()      # (*S,)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay).float()                     # fp32 for any p dtype
    if buf is not None:
        b = _load(buf).view_as(g)                                   # (*S,) fp32
        if first:
            b.copy_(g)
        else:
            b.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(b, alpha=momentum) if nesterov else b
        _add_scaled_(p, g, -lr)
        _store(buf, b)
    else:
        _add_scaled_(p, g, -lr)


def _adam8bit_step(p: Tensor, grad: Tensor, exp_avg: State, exp_avg_sq: State, *, step: Scalar,
                   lr: Scalar, beta1: float, beta2: float, eps: float, weight_decay: float,
                   decoupled: bool, maximize: bool) -> None:
    """One Adam (decoupled=False) / AdamW (decoupled=True) step for one tensor, as torch.optim.

    p, grad: same shape (or flat chunks); exp_avg (signed map) and exp_avg_sq (unsigned map):
    QTensor or fp32 tensor, updated in place; step: the step number after this update (1, 2, ...).
    """
    g = grad if grad.dtype == torch.float32 else grad.float()      # (*S,)
    if maximize:
        g = -g
    if weight_decay != 0:
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay).float()                 # fp32 for any p dtype
    m = _load(exp_avg).view_as(g)                                   # (*S,) fp32
    v = _load(exp_avg_sq).view_as(g)                                # (*S,) fp32
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    if isinstance(step_size, Tensor):                               # compiled path: pure ops
        denom = (v.sqrt() / bias_correction2 ** 0.5).add_(eps)     # (*S,)
        p.sub_(m / denom * step_size)
    else:                                                           # eager: same ops, in place
        if isinstance(exp_avg_sq, QTensor) and v.device.type == "cpu":
            # correctly rounded sqrt, as the fused C kernel's sqrtf (torch's vectorized float
            # sqrt is not on every CPU, e.g. AVX-512): the two paths give the same bits
            root = v.double().sqrt_().float()                      # (*S,)
        else:                                                       # fp32 states: torch's bits
            root = v.sqrt()                                         # (*S,)
        denom = root.div_(bias_correction2 ** 0.5).add_(eps)       # (*S,)
        p.addcdiv_(m, denom, value=-step_size)
    _store(exp_avg, m, scratch=denom)                               # denom is free now: scratch
    _store(exp_avg_sq, v, scratch=denom, nonneg=True)               # v >= 0: no |v| pass


# ----------------------------------------------------------------------------------------------
# bookkeeping


class _Optimizer8bit(Optimizer):
    """Shared bookkeeping: states as QTensor (>= min_8bit_size elements) or fp32 tensors.

    Subclasses set ``_math`` (the pure step function) and implement ``_state_specs(group)``
    ((name, signed map) per state), ``_validate(group)`` and ``_kwargs(...)``.
    """

    def __init__(self, params, defaults: dict, compile: Optional[bool] = None):
        _check("compile", compile, compile in (None, True, False), "None, True or False")
        self._compile = compile
        self._compiled: dict = {}          # device type -> compiled step function (or None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_common(group)
            self._validate(group)
            for p in group["params"]:
                if not p.is_floating_point():
                    raise TypeError(f"params must be floating-point tensors, got {p.dtype}")
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    def _validate(self, group: dict) -> None:
        raise NotImplementedError

    def _state_specs(self, group: dict) -> tuple:
        raise NotImplementedError

    # -- state -------------------------------------------------------------------------------

    def _prepare(self, p: Tensor, state: dict, group: dict, staged: Optional[dict] = None):
        """The states of ``p`` (created as zeros when missing) as QTensor views over the stored
        tensors or fp32 tensors, and whether any was just created. New tensors go into
        ``staged`` when given (``state`` is then only read), else into ``state``. A DTensor
        ``p`` (FSDP2) gets states of its local shard; 8-bit or not is decided on its global
        numel, so every rank decides alike and a shard below ``min_8bit_size`` stays 8-bit."""
        # id(param) -> how the last step's views were built, with weak references to the stored
        # tensors (the cache never keeps a state alive: opt.state.clear() frees it at once)
        views = self.__dict__.setdefault("_views", {})
        hp, hit = p, views.get(id(p)) if state else None
        numel, p = p.numel(), local(p)                # global numel; the local shard
        if hit is not None and hit[0] is group and hit[1] == group["block_size"] \
                and hit[2] == p.shape and hit[5] == len(state) \
                and all(state.get(k) is r() for k, r in hit[3]):
            return [state[name] if signed is None else
                    QTensor.trusted(state[name + "_codes"], state[name + "_absmax"], p.shape,
                                    signed, group["block_size"], hit[6])
                    for name, signed in hit[4]], False        # the same stored tensors
        out = state if staged is None else staged
        states, fresh = [], False
        ph = _shard_edges.phase(hp, group["block_size"])    # FSDP2: where the shard starts
        for name, signed in self._state_specs(group):
            have = {**state, **out} if staged is not None else state
            if name not in have and name + "_codes" not in have:
                fresh = True
                if numel >= group["min_8bit_size"]:
                    q = QTensor.zeros(p.shape, signed, group["block_size"], p.device, ph)
                    out[name + "_codes"], out[name + "_absmax"] = q.codes, q.absmax
                else:
                    out[name] = torch.zeros_like(p, dtype=torch.float32,
                                                 memory_format=torch.preserve_format)
                have = {**state, **out}
            if name in have:
                states.append(have[name])
            else:
                states.append(QTensor(have[name + "_codes"], have[name + "_absmax"], p.shape,
                                      signed, group["block_size"], ph))
        if not fresh and states:
            used = [(k, weakref.ref(state[k])) for k in state if k != "step"]
            how = [(name, None if name in state else signed)
                   for name, signed in self._state_specs(group)]    # None: an fp32 state
            views[id(hp)] = (group, group["block_size"], p.shape, used, how, len(state), ph)
        return states, fresh

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but checked first and states keep their dtypes (torch would cast uint8
        codes and fp32 states to the parameter dtype). Everything is checked before anything
        changes (group and parameter counts, the hyper-parameters, each parameter's state
        against its shape); a mismatch raises a ValueError naming the group, the parameter, the
        state key and expected vs got, and leaves the optimizer as it was. Loaded tensors are
        moved to the parameter's device and get contiguous storage of their own (a crafted
        view, e.g. stride 0, never reaches the fused kernel's raw pointers)."""
        states = checked_states(self, state_dict)
        super().load_state_dict({**state_dict, "state": {}})
        for p, st in states.items():
            self.state[p] = st

    def state_dict(self) -> dict:
        """As torch's; the states of DTensor (FSDP2) parameters in their checkpoint form, which
        does not depend on the sharding (:mod:`memlab._optim_state`): codes and fp32 states as
        DTensors laid out like the parameter, absmax all-gathered (a collective: call on every
        rank) -- what ``torch.distributed.checkpoint`` saves on N ranks and loads on M."""
        sd = super().state_dict()
        owners = [(p, g) for g in self.param_groups for p in g["params"]]   # torch's ids
        if any(is_dtensor(p) for p, _ in owners):
            sd["state"] = {k: (to_checkpoint(self, st, *owners[k], f"param {k} (shape "
                                             f"{tuple(owners[k][0].shape)})")
                               if is_dtensor(owners[k][0]) and st else st)
                           for k, st in sd["state"].items()}
        return sd

    def state_nbytes(self) -> int:
        """Bytes held in ``self.state`` (each storage once; memlab.memory.storage_bytes)."""
        from memlab.memory import storage_bytes
        return storage_bytes(self.state.values())

    # -- step --------------------------------------------------------------------------------

    def _step_fn(self, device: torch.device) -> Callable:
        """The pure step function; wrapped in torch.compile on CUDA (lazily, falls back)."""
        eager = type(self)._math
        use = self._compile if self._compile is not None else device.type == "cuda"
        if not use or not hasattr(torch, "compile"):
            return eager
        if device.type not in self._compiled:
            try:  # fullgraph: a graph break fails before anything runs, so falling back is safe
                self._compiled[device.type] = torch.compile(eager, fullgraph=True, dynamic=True)
            except Exception as e:  # pragma: no cover - depends on the install
                warnings.warn(f"torch.compile unavailable ({e}); using eager step")
                self._compiled[device.type] = None
        return self._compiled[device.type] or eager

    def _run(self, fn: Callable, device: torch.device, *args, **kw) -> None:
        if fn is type(self)._math:
            return fn(*args, **kw)
        try:
            return fn(*args, **kw)
        except _compile_errors() as e:  # raised while compiling (fullgraph): nothing ran yet
            warnings.warn(f"torch.compile of {type(self).__name__} step failed ({type(e).__name__}:"
                          f" {str(e)[:200]}); falling back to eager")
            self._compiled[device.type] = None
            return type(self)._math(*args, **kw)

    def _pieces(self, p: Tensor, grad: Tensor, states: list, block_size: int):
        """(p, grad, states) to hand to the step function: flat 1-D views when p and grad are
        contiguous (so one compiled graph serves every shape), cut into pieces of whole blocks
        when the states are 8-bit, so the fp32 temporaries stay small (on CPU: cache-sized,
        which is also faster); the tensors as they are otherwise."""
        p = p.detach()
        if not (p.is_contiguous() and grad.is_contiguous()):
            yield p, grad, states
            return
        n = p.numel()
        pf, gf = p.view(-1), grad.view(-1)                            # (N,)
        flat = [s.narrow(0, n) if isinstance(s, QTensor) else s.view(-1) for s in states]
        chunk = CPU_CHUNK if p.device.type == "cpu" else CUDA_CHUNK
        chunk = max(block_size, chunk // block_size * block_size)
        if n <= chunk or not all(isinstance(s, QTensor) for s in states):
            yield pf, gf, flat
            return
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            yield pf[start:end], gf[start:end], [s.narrow(start, end) for s in flat]

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """One optimizer step. ``closure`` re-evaluates the model and returns the loss.

        All or nothing: phase 1 checks every parameter and gradient and allocates every missing
        state into a staging dict (under a memory budget these are the allocations that fail),
        without touching parameters, ``self.state`` or step counters; phase 2 commits and runs
        the math. The eager/compiled pieces allocate fp32 temporaries after they start writing,
        so when a budgeted ``memlab.memory.MemoryMeter`` is active, phase 1 also dry-runs the
        largest piece of each kind on copies (outside that meter, under a meter of its own) and
        then reserves that many bytes under the active meter: if the step would go over the
        budget it fails there, before any write. The reservation reaches exactly the step's own
        peak (so a budget that fits the step still fits). Cost, only under a budget: one extra
        piece of math per kind and step (measured +31% step time, compile=False, on a 12-parameter
        0.7 M-parameter MLP; less as models grow) and copies of one piece, briefly and outside
        the meter's count. The fused C path allocates nothing in phase 2: no dry run.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan, slots = self._plan()                   # phase 1: may raise, changes nothing
        fused: dict = {}                   # (id(group), how) -> (group, how, [tensors]) for below
        for p, lp, lg, group, staged, step, states, fresh, how, work in plan:   # phase 2
            state = self.state[p]
            state.update(staged)
            state["step"] = step
            if how in ("fused", "foreach"):          # below: one call per group and kind
                fused.setdefault((id(group), how), (group, how, []))[2].append(
                    (lp, lg, states, step, fresh))
            elif how == "eager":
                fn, kw, pieces = work
                for pp, gg, ss in pieces:
                    self._run(fn, lp.device, pp, gg, *ss, **kw)
            # how == "fake-fused": fake tensors (memlab.memory.estimate) of a step that the real
            # run does in the fused C kernel, which allocates no torch tensor: nothing to run
        for group, how, items in fused.values():
            if how == "fused":
                self._fused_many(group, items)
            else:
                self._foreach_many(group, items)
        slots.finish()        # FSDP2 blocks shared by two ranks: all-reduce absmax, then encode
        return loss

    def _fused_many(self, group: dict, items: list) -> None:
        """The fused C step of a group's 8-bit tensors, items (p, grad, states, step, fresh), in
        one C call (memlab._cpu_kernels; one call per tensor cost ~90 us of Python)."""
        raise NotImplementedError

    def _foreach_many(self, group: dict, items: list) -> None:
        """The fp32-state step of a group's small CPU tensors in torch._foreach_* calls (the
        eager step's operations, the same bits: memlab._foreach_steps)."""
        raise NotImplementedError

    def _plan(self) -> list:
        """Phase 1 of ``step``: (param, local param, local grad, group, staged states, new step,
        states, fresh, how, work) per parameter with a gradient, and the step's
        ``_shard_edges.Slots``; raises before anything is modified. A DTensor (FSDP2) param is
        stepped on ``p.to_local()`` / ``grad.to_local()``; when its shards share blocks, its
        block-aligned interior as any tensor and each shared piece eagerly (``_shard_edges``)."""
        plan, slots = [], _shard_edges.Slots()
        meter = _budget_meter()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                check_grad(self, p)
                lp, lg = local(p).detach(), local(p.grad)       # this rank's shard
                if is_dtensor(p) != is_dtensor(p.grad) or lg.shape != lp.shape:
                    raise ValueError(f"grad of a {type(p).__name__} parameter with local shape "
                                     f"{tuple(lp.shape)} is a {type(p.grad).__name__} with local "
                                     f"shape {tuple(lg.shape)}")
                old = self.state.get(p, {})
                step = old.get("step", 0)       # int; a tensor in a torch.optim checkpoint
                step = (int(step.item()) if isinstance(step, Tensor) else step) + 1
                staged: dict = {}
                states, fresh = self._prepare(p, old, group, staged)
                lp, lg, states = self._cut_edges(plan, slots, p, lp, lg, group, staged, step,
                                                 states, fresh)
                head = (p, lp, lg, group, staged, step, states, fresh)
                if self._fused_ok(lp, states, lg):
                    plan.append((*head, "fused", None))
                    continue
                if self._fused_on_fake(lp, states, lg):
                    plan.append((*head, "fake-fused", None))
                    continue
                if (self._compile is None and meter is None and states
                        and _foreach_steps.usable(lp, lg, states)):     # no QTensor in states
                    plan.append((*head, "foreach", None))      # small fp32-state tensors
                    continue
                fn = self._step_fn(lp.device)
                kw = self._kwargs(group, step, fresh, lp.device,
                                  compiled=fn is not type(self)._math)
                pieces = list(self._pieces(lp, lg, states, group["block_size"]))
                plan.append((*head, "eager", (fn, kw, pieces)))
        if meter is not None:
            self._reserve(plan, meter)
        return plan, slots

    def _cut_edges(self, plan, slots, p, lp, lg, group, staged, step, states, fresh):
        """For a DTensor ``p`` whose shards share 8-bit blocks (``_shard_edges``): plan each
        shared piece of this rank's shard (eager, deferred encode) and return the block-aligned
        interior (local param, grad, states) for the usual paths; else the arguments as given."""
        bs = group["block_size"]
        if not (is_dtensor(p) and states and all(isinstance(s, QTensor) for s in states)
                and lp.is_contiguous() and lg.is_contiguous()):
            return lp, lg, states
        cut = _shard_edges.cached_split(self.__dict__.setdefault("_cuts", {}), p, bs)
        if cut is None:
            return lp, lg, states
        (i, j), edges, blocks = cut
        slots.add(p, len(states), blocks)
        fp, fg = lp.view(-1), lg.view(-1)                                 # (n,) local, flat
        kw = self._kwargs(group, step, fresh, lp.device, compiled=False)
        for a, b, block in edges:
            ds = [q.one_block(a, b, _shard_edges.Deferred) for q in states]
            slots.piece(p, block, ds)
            plan.append((p, fp[a:b], fg[a:b], group, staged, step, ds, fresh, "eager",
                         (type(self)._math, kw, [(fp[a:b], fg[a:b], ds)])))
        return fp[i:j], fg[i:j], [q.narrow(i, j) for q in states]

    def _reserve(self, plan: list, meter) -> None:
        """Under a budgeted MemoryMeter: allocate (and free) as many bytes as the largest eager
        piece needs for temporaries, so that a budget error strikes before any write."""
        from memlab.memory import MemoryMeter
        from torch.utils._python_dispatch import _disable_current_modes
        all_devices = getattr(meter, "_all_devices", False)
        largest: dict = {}               # kind of piece -> (numel, fn, kw, piece, device)
        for _, p, _, group, _, _, _, fresh, how, work in plan:
            if how != "eager" or not (all_devices or p.device.type == meter.device_type):
                continue
            fn, kw, pieces = work
            for pp, gg, ss in pieces:
                kind = (id(group), fresh, fn, pp.dtype, gg.dtype, pp.is_contiguous(), p.device,
                        tuple(isinstance(x, QTensor) for x in ss))
                if kind not in largest or pp.numel() > largest[kind][0]:
                    largest[kind] = (pp.numel(), fn, kw, (pp, gg, ss), p.device)
        need, device = 0, None
        for _, fn, kw, (pp, gg, ss), dev in largest.values():
            with _disable_current_modes():            # copies and dry run outside the meter
                copies = (pp.clone(), gg.clone(), [_copy_state(x) for x in ss])
                flat = [copies[0], copies[1]] + [t for x in copies[2] for t in _tensors(x)]
                with MemoryMeter(dev, scan=False, inputs=flat, timeline=False) as dry:
                    self._run(fn, dev, copies[0], copies[1], *copies[2], **kw)
            if dry.peak - dry.baseline > need:
                need, device = dry.peak - dry.baseline, dev
        if need:
            torch.empty(need, dtype=torch.uint8, device=device)   # the meter raises if over

    def _fused_ok(self, p: Tensor, states: list, g: Optional[Tensor] = None) -> bool:
        """Use the fused C kernel (``memlab._cpu_kernels``): CPU, ``compile`` left at None,
        every state 8-bit, a float32 contiguous parameter and gradient (plain tensors: a
        DTensor's local shard; ``g`` defaults to ``p.grad``), and a compiler found."""
        g = p.grad if g is None else g
        return (self._compile is None and p.device.type == "cpu" and bool(states)
                and all(isinstance(s, QTensor) for s in states)
                and _cpu_kernels.usable(p, g) and _cpu_kernels.available())

    def _fused_on_fake(self, p: Tensor, states: list, g: Optional[Tensor] = None) -> bool:
        """Whether ``p`` is a fake tensor (``memlab.memory.estimate``) whose real counterpart
        would take the fused kernel (``_fused_ok``, which refuses fake tensors)."""
        g = p.grad if g is None else g
        return (self._compile is None and p.device.type == "cpu" and bool(states)
                and all(isinstance(s, QTensor) for s in states) and _is_fake(p)
                and p.dtype == torch.float32 and g.dtype == torch.float32
                and p.is_contiguous() and g.is_contiguous() and p.numel() > 0
                and _cpu_kernels.available())

    @staticmethod
    def _scalar(x: float, device: torch.device, compiled: bool) -> Scalar:
        # the compiled function gets changing numbers (lr, step) as 0-dim tensors: no recompiles
        return torch.tensor(float(x), dtype=torch.float32, device=device) if compiled else x


class SGD8bit(_Optimizer8bit):
    """SGD with momentum whose momentum buffer is stored in 8 bits (signed dynamic map, blocks of
    ``block_size``): ~1 B/param of state instead of 4. Same update as ``torch.optim.SGD``.

    Tensors with fewer than ``min_8bit_size`` elements keep an fp32 buffer. ``momentum=0`` keeps
    no state. ``compile``: None (default) = fused C kernel on CPU, torch.compile on CUDA;
    False = eager torch ops; True = torch.compile.
    """

    _math = staticmethod(_sgd8bit_step)

    def __init__(self, params, lr: float, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, min_8bit_size: int = 4096,
                 block_size: int = 256, *, maximize: bool = False, compile: Optional[bool] = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, min_8bit_size=min_8bit_size, block_size=block_size,
                        maximize=maximize)
        super().__init__(params, defaults, compile)

    def _validate(self, group: dict) -> None:
        mom, damp = group["momentum"], group["dampening"]
        _check("momentum", mom, _is_number(mom) and 0 <= mom < 1, "a float in [0, 1)")
        _check("dampening", damp, _is_number(damp) and 0 <= damp <= 1, "a float in [0, 1]")
        _check("nesterov", group["nesterov"], isinstance(group["nesterov"], bool), "a bool")
        if group["nesterov"] and (mom == 0 or damp != 0):
            raise ValueError(f"nesterov=True requires momentum > 0 and dampening == 0, got "
                             f"momentum={mom!r}, dampening={damp!r}")

    def _fused_many(self, group, items):
        _cpu_kernels.sgd8bit_many([(p, g, st[0], fresh) for p, g, st, _, fresh in items],
                                  lr=group["lr"], momentum=group["momentum"],
                                  dampening=group["dampening"],
                                  weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                                  maximize=group["maximize"])

    def _foreach_many(self, group, items):
        _foreach_steps.sgd([(p, g, st[0], fresh) for p, g, st, _, fresh in items],
                           lr=group["lr"], momentum=group["momentum"],
                           dampening=group["dampening"], weight_decay=group["weight_decay"],
                           nesterov=group["nesterov"], maximize=group["maximize"])

    def _state_specs(self, group):  # no buffer at all without momentum
        return (("momentum_buffer", True),) if group["momentum"] != 0 else ()

    def _kwargs(self, group, step, first, device, compiled):
        return dict(lr=self._scalar(group["lr"], device, compiled), momentum=group["momentum"],
                    dampening=group["dampening"], weight_decay=group["weight_decay"],
                    nesterov=group["nesterov"], maximize=group["maximize"], first=first)


class Adam8bit(_Optimizer8bit):
    """Adam whose two moments are stored in 8 bits: first moment with the signed dynamic map,
    second moment with the unsigned one, blocks of ``block_size`` (~2 B/param instead of 8).
    Same update as ``torch.optim.Adam`` (no amsgrad); L2 ``weight_decay`` added to the gradient.

    Tensors with fewer than ``min_8bit_size`` elements keep fp32 moments and follow torch's
    update exactly. ``compile``: None (default) = fused C kernel on CPU, torch.compile on CUDA;
    False = eager torch ops; True = torch.compile.
    """

    _math = staticmethod(_adam8bit_step)
    _decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, min_8bit_size: int = 4096, block_size: int = 256, *,
                 maximize: bool = False, compile: Optional[bool] = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        min_8bit_size=min_8bit_size, block_size=block_size, maximize=maximize)
        super().__init__(params, defaults, compile)

    def _validate(self, group: dict) -> None:
        betas, eps = group["betas"], group["eps"]
        _check("betas", betas, isinstance(betas, (tuple, list)) and len(betas) == 2
               and all(_is_number(b) and 0 <= b < 1 for b in betas), "two floats in [0, 1)")
        _check("eps", eps, _is_number(eps) and eps > 0, "a float > 0")

    def _state_specs(self, group):
        return (("exp_avg", True), ("exp_avg_sq", False))

    def _fused_many(self, group, items):
        beta1, beta2 = group["betas"]
        _cpu_kernels.adam8bit_many([(p, g, st[0], st[1], step) for p, g, st, step, _ in items],
                                   lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                   weight_decay=group["weight_decay"],
                                   decoupled=self._decoupled, maximize=group["maximize"])

    def _foreach_many(self, group, items):
        beta1, beta2 = group["betas"]
        _foreach_steps.adam([(p, g, st[0], st[1], step) for p, g, st, step, _ in items],
                            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                            weight_decay=group["weight_decay"], decoupled=self._decoupled,
                            maximize=group["maximize"])

    def _kwargs(self, group, step, first, device, compiled):
        beta1, beta2 = group["betas"]
        return dict(step=self._scalar(step, device, compiled),
                    lr=self._scalar(group["lr"], device, compiled), beta1=beta1, beta2=beta2,
                    eps=group["eps"], weight_decay=group["weight_decay"],
                    decoupled=self._decoupled, maximize=group["maximize"])


class AdamW8bit(Adam8bit):
    """Adam8bit with decoupled weight decay (``torch.optim.AdamW``): p *= 1 - lr * weight_decay."""

    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = 4096, block_size: int = 256, *,
                 maximize: bool = False, compile: Optional[bool] = None):
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size, block_size,
                         maximize=maximize, compile=compile)


from memlab.lowrank import LowRankAdam  # noqa: E402  (re-exported: one place for optimizers)
