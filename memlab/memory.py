"""MemoryMeter: where the bytes of a training step go, counted tensor storage by tensor storage.

How it counts
-------------
The meter is a ``TorchDispatchMode``: every ATen op that runs inside ``with MemoryMeter(...)``
passes through it, and every tensor the op returns is looked at. A storage the meter has not
seen before is a new allocation: its ``nbytes`` are added to the live total and a weak reference
with a callback subtracts them again when the storage is freed. Views share their base's
storage, so each storage is counted once however many views point at it. Storages that existed
before the meter was entered (parameters, gradients, optimizer state, the input batch) are found
through ``model=``, ``optimizer=``, ``inputs=`` or, with ``scan=True``, by a scan of the live
tensors (``gc``); they make up the baseline.

Categories (the same rule for the timeline and for the breakdown at the peak)
-----------------------------------------------------------------------------
* ``parameters``  -- storages of parameters and buffers of the known modules.
* ``gradients``   -- ``.grad`` tensors found at entry, and everything allocated by backward with
  grad mode off: parameter gradients and the gradients of activations in flight.
* ``optimizer``   -- ``optimizer.state`` found at entry, and everything allocated inside
  ``optimizer.step()`` (its state and its temporaries).
* ``activations`` -- everything allocated in forward (saved tensors and live intermediates), and
  recomputation in backward (grad mode on, as in checkpointing or reversible blocks).
* ``other``       -- pre-existing tensors that are none of the above (inputs, caches).

On CUDA the meter also reads ``torch.cuda.max_memory_allocated`` (``meter.device_peak``); the two
agree up to the caching allocator's rounding (blocks of 512 bytes) and library workspaces.
Host storages a CUDA meter sees allocated (offload) count apart: ``host_peak``, ``host_allocated``.

``estimate(step_fn, setup=...)`` runs the same meter over fake tensors
(``torch._subclasses.FakeTensorMode``): shapes, dtypes and storages exist, data does not, so a
full-size configuration can be measured without the memory it would need.

References: PyTorch "Understanding CUDA memory usage"; torch.utils._python_dispatch.
"""

from __future__ import annotations

import gc
import math
import numbers
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "other")
PHASES = ("forward", "backward", "optimizer")
_CAT_INDEX = {c: i for i, c in enumerate(CATEGORIES)}


class MemoryBudgetExceeded(RuntimeError):
    """Raised by a MemoryMeter with ``budget=`` when live memory goes past the budget (like an OOM)."""

    def __init__(self, message: str, *, requested: int, live: int, budget: int, op: str):
        super().__init__(message)
        self.requested, self.live, self.budget, self.op = requested, live, budget, op


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


@dataclass(frozen=True)
class TimelinePoint:
    index: int                 # event number within the metered region
    phase: str                 # "forward" | "backward" | "optimizer"
    op: str                    # the op that allocated (or "free")
    bytes: Dict[str, int]      # live bytes by category after the event

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _device_type(device) -> str:
    if isinstance(device, torch.device):
        return device.type
    if isinstance(device, str):
        return torch.device(device).type
    raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")


class _Dispatch(TorchDispatchMode):
    def __init__(self, meter: "MemoryMeter"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.meter._on_op(func, out)
        return out


class MemoryMeter:
    """Count live tensor bytes by category through a region of code (see the module docstring).

    Args:
        device: "cpu", "cuda", "cuda:0" or a torch.device; only storages on that device type count.
        model: module(s) whose parameters and buffers are "parameters" (and whose ``.grad``s found
            at entry are "gradients").
        optimizer: optimizer(s) whose state is "optimizer"; ``step()`` calls are the optimizer phase.
        inputs: pre-existing tensors to count as "other" (e.g. the batch).
        scan: also find pre-existing tensors, modules and optimizers by scanning live objects
            (default: only when neither model nor optimizer is given).
        budget: bytes (an int or float >= 1); going past it raises ``MemoryBudgetExceeded``
            from the allocating op. ``None`` or ``math.inf`` means no limit (``meter.budget``
            is then None); NaN, negative, zero and bool budgets are refused.
        timeline: keep a point per allocation and free (default True).
    """

    def __init__(self, device="cpu", *, model=None, optimizer=None, inputs: Iterable = (),
                 scan: Optional[bool] = None, budget: Optional[int] = None, timeline: bool = True,
                 _track_all_devices: bool = False):
        self.device_type = _device_type(device)
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.budget = _check_budget(budget)
        self._models = _as_list(model, nn.Module, "model")
        self._optimizers = _as_list(optimizer, torch.optim.Optimizer, "optimizer")
        for i, m in enumerate(self._models):       # half-built objects: say so now, not at entry
            _module_tensors(m, _where("model", model, i))
        for i, o in enumerate(self._optimizers):
            _optimizer_tensors(o, _where("optimizer", optimizer, i))
        self._inputs = list(inputs)
        self._scan = scan if scan is not None else (not self._models and not self._optimizers)
        self._keep_timeline = timeline
        self._all_devices = _track_all_devices
        self._reset()

    # ------------------------------------------------------------------ bookkeeping
    def _reset(self):
        self._live: Dict[int, Tuple[Any, int, int]] = {}   # id(storage) -> (weakref, nbytes, cat)
        self._totals = [0] * len(CATEGORIES)
        self._cat_peaks = [0] * len(CATEGORIES)
        self.current = 0
        self.peak = 0
        self.baseline = 0
        self._peak_totals = [0] * len(CATEGORIES)
        self.peak_phase = None
        self.peak_op = None
        self._events = 0
        self._timeline: List[Tuple[int, str, str, Tuple[int, ...]]] = []
        self._phase_override: Optional[str] = None
        self._in_optim = 0
        self._hooks = []
        self.device_peak: Optional[int] = None
        self.device_baseline: Optional[int] = None
        self._active = False
        self._host_live, self._host_current, self._host_peak, self.host_allocated = {}, 0, 0, 0

    host_peak = property(lambda self: None if self.device_type == "cpu" else self._host_peak)

    def _add_host(self, storage) -> None:
        key, nbytes = id(storage), int(storage.nbytes())

        def _freed(_ref, key=key, meter_ref=weakref.ref(self)):
            m = meter_ref()
            if m is not None and key in m._host_live:
                m._host_current -= m._host_live.pop(key)[1]
        self._host_live[key] = (weakref.ref(storage, _freed), nbytes)
        self._host_current, self.host_allocated = (self._host_current + nbytes,
                                                   self.host_allocated + nbytes)
        self._host_peak = max(self._host_peak, self._host_current)

    def _counts(self, storage) -> bool:
        if self._all_devices:
            return True
        return storage.device.type == self.device_type

    def _add(self, storage, cat: int, op: str, *, allocation: bool) -> int:
        key = id(storage)
        if key in self._live:
            return 0
        try:
            nbytes = int(storage.nbytes())
        except Exception:  # storages without bytes (e.g. sparse internals)
            return 0
        live = self._live

        def _freed(_ref, key=key, meter_ref=weakref.ref(self)):
            meter = meter_ref()
            if meter is not None:
                meter._on_free(key)

        live[key] = (weakref.ref(storage, _freed), nbytes, cat)
        self._totals[cat] += nbytes
        self.current += nbytes
        if self._totals[cat] > self._cat_peaks[cat]:
            self._cat_peaks[cat] = self._totals[cat]
        if allocation:
            self._record(op)
            if self.current > self.peak:
                self.peak = self.current
                self._peak_totals = list(self._totals)
                self.peak_phase = self.phase
                self.peak_op = op
            if self.budget is not None and self.current > self.budget:
                over = self.current - self.budget
                msg = (f"{op} allocated {format_bytes(nbytes)} during {self.phase}: live memory "
                       f"{format_bytes(self.current)} is {format_bytes(over)} over the budget of "
                       f"{format_bytes(self.budget)}")
                raise MemoryBudgetExceeded(msg, requested=nbytes, live=self.current,
                                           budget=self.budget, op=op)
        return nbytes

    def _on_free(self, key: int):
        entry = self._live.pop(key, None)
        if entry is None:
            return
        _, nbytes, cat = entry
        self._totals[cat] -= nbytes
        self.current -= nbytes
        if self._active:
            self._record("free")

    def _record(self, op: str):
        self._events += 1
        if self._keep_timeline:
            self._timeline.append((self._events, self.phase, op, tuple(self._totals)))

    @property
    def phase(self) -> str:
        if self._phase_override is not None:
            return self._phase_override
        if self._in_optim:
            return "optimizer"
        if _in_backward():
            return "backward"
        return "forward"

    def _category_for_allocation(self) -> int:
        if self._in_optim:
            return _CAT_INDEX["optimizer"]
        if _in_backward():
            return _CAT_INDEX["activations" if torch.is_grad_enabled() else "gradients"]
        if self._phase_override == "optimizer":
            return _CAT_INDEX["optimizer"]
        if self._phase_override == "backward":
            return _CAT_INDEX["gradients"]
        return _CAT_INDEX["activations"]

    def _on_op(self, func, out):
        flat, _ = tree_flatten(out)
        cat = None
        for t in _plain_tensors(flat):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            try:
                st = t.untyped_storage()
            except Exception:
                continue
            if id(st) in self._live or id(st) in self._host_live:
                continue
            if self.device_type != "cpu" and t.device.type == "cpu":
                self._add_host(st)                   # host memory: counted apart (offload)
                continue
            if not self._counts(st):
                continue
            if cat is None:
                cat = self._category_for_allocation()
            self._add(st, cat, str(getattr(func, "__name__", func)), allocation=True)

    # ------------------------------------------------------------------ entry / exit
    def _register_existing(self):
        cats: List[Tuple[torch.Tensor, str]] = []
        models, optimizers = list(self._models), list(self._optimizers)
        loose: List[torch.Tensor] = []
        if self._scan:
            for obj in gc.get_objects():
                cls = type(obj)  # type(), not isinstance(): proxies must not be touched
                if issubclass(cls, nn.Module):
                    models.append(obj)
                elif issubclass(cls, torch.optim.Optimizer):
                    optimizers.append(obj)
                elif issubclass(cls, torch.Tensor):
                    loose.append(obj)
        # Given objects are checked (a half-built one raises a TypeError naming the argument);
        # scanned ones that are half-built (a constructor that raised, kept alive by a
        # traceback or a cycle) are skipped.
        n_models, n_opts = len(self._models), len(self._optimizers)
        model_cats: List[Tuple[torch.Tensor, str]] = []
        grad_cats: List[Tuple[torch.Tensor, str]] = []
        for i, m in enumerate(models):
            found = _module_tensors(m, _where("model", self._models, i) if i < n_models else None)
            if found is None:
                continue
            model_cats += found[0]
            grad_cats += found[1]
        cats += model_cats + grad_cats
        for i, opt in enumerate(optimizers):
            found = _optimizer_tensors(
                opt, _where("optimizer", self._optimizers, i) if i < n_opts else None)
            if found is not None:
                cats += found
        for t in self._inputs:
            for v in _tensors_in(t):
                cats.append((v, "other"))
        for t in loose:
            if isinstance(t, nn.Parameter):
                cats.append((t, "parameters"))
            else:
                cats.append((t, "other"))
        for t, c in [(p, c) for t, c in cats for p in _plain_tensors([t])]:
            try:
                if t.layout != torch.strided:
                    continue
                st = t.untyped_storage()
            except Exception:
                continue
            if self._counts(st):
                self._add(st, _CAT_INDEX[c], "existing", allocation=False)
        self.baseline = self.current
        self.peak = self.current
        self._peak_totals = list(self._totals)
        self._cat_peaks = list(self._totals)
        self._record("enter")

    def __enter__(self) -> "MemoryMeter":
        if self._active:
            raise RuntimeError("this MemoryMeter is already active; use a new one per region")
        self._reset()
        self._active = True
        if self.device_type == "cuda" and torch.cuda.is_available() and not self._all_devices:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.device_baseline = torch.cuda.memory_allocated(self.device)
        self._register_existing()
        from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                           register_optimizer_step_pre_hook)

        def pre(opt, args, kwargs):
            self._in_optim += 1

        def post(opt, args, kwargs):
            self._in_optim = max(0, self._in_optim - 1)

        self._hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        self._mode = _Dispatch(self)
        self._mode.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self._mode.__exit__(exc_type, exc, tb)
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self._record("exit")
            self._active = False
            if self.device_type == "cuda" and torch.cuda.is_available() and not self._all_devices:
                torch.cuda.synchronize(self.device)
                self.device_peak = torch.cuda.max_memory_allocated(self.device)
            self._live = {}  # stop following storages that outlive the region
            self._host_live = {}
        return False

    # ------------------------------------------------------------------ results
    def mark(self, phase: Optional[str]):
        """Force the phase label (``None`` returns to automatic detection)."""
        if phase is not None and phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES} or None, got {phase!r}")
        self._phase_override = phase

    def breakdown(self) -> Dict[str, int]:
        """Live bytes by category at the peak."""
        return dict(zip(CATEGORIES, self._peak_totals))

    def category_peaks(self) -> Dict[str, int]:
        """The highest live bytes each category reached (not necessarily at the same moment)."""
        return dict(zip(CATEGORIES, self._cat_peaks))

    def now(self) -> Dict[str, int]:
        """Live bytes by category right now."""
        return dict(zip(CATEGORIES, self._totals))

    @property
    def timeline(self) -> List[TimelinePoint]:
        return [TimelinePoint(i, ph, op, dict(zip(CATEGORIES, tot)))
                for i, ph, op, tot in self._timeline]

    def timeline_arrays(self, max_points: Optional[int] = None) -> Dict[str, list]:
        """Columns for plotting: ``index``, ``phase``, ``op`` and one list per category.

        ``max_points`` thins the timeline evenly, always keeping the peak.
        """
        rows = self._timeline
        if max_points is not None and len(rows) > max_points > 2:
            step = len(rows) / max_points
            keep = {int(i * step) for i in range(max_points)} | {len(rows) - 1}
            peak_i = max(range(len(rows)), key=lambda i: sum(rows[i][3]))
            keep.add(peak_i)
            rows = [rows[i] for i in sorted(keep)]
        cols: Dict[str, list] = {"index": [r[0] for r in rows], "phase": [r[1] for r in rows],
                                 "op": [r[2] for r in rows]}
        for j, c in enumerate(CATEGORIES):
            cols[c] = [r[3][j] for r in rows]
        return cols

    def summary(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.breakdown().items())
        s = f"peak {format_bytes(self.peak)} in {self.peak_phase} ({parts})"
        if self.device_peak is not None:
            s += f"; torch.cuda.max_memory_allocated {format_bytes(self.device_peak)}"
        return s + (f"; host {format_bytes(self.host_peak)}" if self.host_peak else "")

    def __repr__(self) -> str:
        return f"MemoryMeter(device={self.device_type!r}, peak={self.peak}, current={self.current})"


def _as_list(obj, cls, name) -> list:
    if obj is None:
        return []
    items = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    for o in items:
        if not isinstance(o, cls):
            raise TypeError(f"{name} must be a {cls.__name__} (or a list of them), "
                            f"got {type(o).__name__}")
    return items


def _check_budget(budget) -> Optional[int]:
    """``budget=`` of MemoryMeter: None or inf -> no limit; otherwise an int >= 1 (bytes)."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a number of bytes (int or float) or None, got "
                        f"{budget!r} of type {type(budget).__name__}")
    budget = float(budget) if not isinstance(budget, int) else budget
    if isinstance(budget, float) and math.isnan(budget):
        raise ValueError(f"budget must be a number of bytes >= 1 (or inf/None for no limit), "
                         f"got {budget!r}")
    if budget == math.inf:
        return None
    if budget < 1:
        raise ValueError(f"budget must be a number of bytes >= 1 (or inf/None for no limit), "
                         f"got {budget!r}")
    return int(budget)


def _where(name: str, given, i: int) -> str:
    """``optimizer`` or ``optimizer[1]``: how to name item i of an argument in a message."""
    return f"{name}[{i}]" if isinstance(given, (list, tuple)) else name


def _module_tensors(m, where: Optional[str]):
    """(parameters and buffers, gradients) of a module as (tensor, category) pairs.

    A half-built module (its ``nn.Module.__init__`` never ran) gives None when it was found by
    the scan (``where`` None) and a TypeError naming the argument when it was given.
    """
    d = getattr(m, "__dict__", {})
    if not all(isinstance(d.get(k), dict) for k in ("_parameters", "_buffers", "_modules")):
        if where is None:
            return None
        raise TypeError(f"{where} must be a constructed nn.Module, got a half-built "
                        f"{type(m).__name__} (its nn.Module.__init__ did not run: did its "
                        f"constructor raise?)")
    try:
        params = list(m.parameters())
        buffers = list(m.buffers())
    except Exception as e:  # a broken submodule deeper down
        if where is None:
            return None
        raise TypeError(f"{where}: cannot list the parameters of {type(m).__name__} "
                        f"({type(e).__name__}: {e})") from e
    main = [(p, "parameters") for p in params] + [(b, "parameters") for b in buffers]
    grads = [(p.grad, "gradients") for p in params if p.grad is not None]
    return main, grads


def _optimizer_tensors(opt, where: Optional[str]):
    """(tensor, category) pairs of an optimizer's parameters, their gradients and its state.

    A half-built optimizer (no ``param_groups`` list of dicts with "params", or no ``state``
    mapping, e.g. after its constructor raised) gives None when found by the scan (``where``
    None) and a TypeError naming the argument when it was given.
    """
    try:  # (getattr, not __dict__: wrappers may define them as properties)
        groups = getattr(opt, "param_groups", None)
        state = getattr(opt, "state", None)
    except Exception:  # a property that fails on a half-built object
        groups = state = None

    def bad(what):
        if where is None:
            return None
        raise TypeError(f"{where} must be a constructed torch.optim.Optimizer, got a half-built "
                        f"{type(opt).__name__} ({what}: did its constructor raise?)")

    if not isinstance(groups, list):
        return bad("no param_groups list")
    if not isinstance(state, Mapping):
        return bad("no state mapping")
    out: List[Tuple[torch.Tensor, str]] = []
    for group in groups:
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, (list, tuple)):
            return bad("a param group without a 'params' list")
        for p in params:
            if not isinstance(p, torch.Tensor):
                return bad(f"a parameter of type {type(p).__name__}")
            out.append((p, "parameters"))
            if p.grad is not None:
                out.append((p.grad, "gradients"))
    for st in list(state.values()):
        for v in _tensors_in(st):
            out.append((v, "optimizer"))
    return out


def _plain_tensors(items) -> List[Any]:
    """``items`` with every wrapper tensor subclass (a DTensor: FSDP2's sharded parameters and
    gradients) replaced by the tensors it holds (its local shard), recursively: a wrapper's own
    storage has the *global* size and no memory behind it; what a rank holds is its local part."""
    out: List[Any] = []
    for t in items:
        if isinstance(t, torch.Tensor) and is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            out.extend(_plain_tensors([getattr(t, n) for n in names]))
        else:
            out.append(t)
    return out


def _tensors_in(obj) -> List[torch.Tensor]:
    flat, _ = tree_flatten(obj)
    out = []
    for t in flat:
        if isinstance(t, torch.Tensor):
            out.append(t)
        elif hasattr(t, "__dict__"):  # small holder types (e.g. quantized state)
            out.extend(v for v in vars(t).values() if isinstance(v, torch.Tensor))
    return out


def storage_bytes(objs: Iterable) -> int:
    """Bytes of the distinct storages behind the tensors in ``objs`` (tensors, containers of
    them such as ``optimizer.state`` values, small holder types), each storage counted once."""
    seen, total = set(), 0
    for t in _tensors_in(list(objs)):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


# ---------------------------------------------------------------------- estimate
# (memlab._estimate: the meter on fake tensors, and the host tensors a step may read there)
from memlab._estimate import (HOST_VALUES_LIMIT, Estimate, estimate, host_tensor,  # noqa: E402,F401
                              host_values, on_host, real_tensors)
