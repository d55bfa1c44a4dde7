"""``estimate``: the meter on fake tensors (shapes, no data, no memory), and host tensors.

A training step measured by :class:`memlab.memory.MemoryMeter` under torch's FakeTensorMode:
full-size configurations without the memory. Values a step must read (the lengths of each
utterance, the targets) are *host tensors* (:func:`host_tensor`): they keep their values beside
the fake tensor. Public through ``memlab.memory``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn


@dataclass
class Estimate:
    """What ``estimate`` measured: the same numbers a MemoryMeter gives."""
    peak: int
    baseline: int
    peak_phase: Optional[str]
    _breakdown: Dict[str, int]
    _category_peaks: Dict[str, int]
    host_peak: Optional[int] = None    # host bytes at most (a CUDA estimate; None on CPU)

    def breakdown(self) -> Dict[str, int]:
        return dict(self._breakdown)

    def category_peaks(self) -> Dict[str, int]:
        return dict(self._category_peaks)

    def summary(self) -> str:
        from memlab.memory import format_bytes
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self._breakdown.items())
        return f"estimated peak {format_bytes(self.peak)} in {self.peak_phase} ({parts})"


# The FakeTensorMode of the estimate now running (None outside one): host_tensor reads it.
_ESTIMATE_MODE: List[Any] = []
# estimates running now (any thread) and torch's CONSTANT_NUMEL_LIMIT before the first of them:
# the limit is raised while any runs and restored when the last one ends (saved and restored per
# call, two overlapping estimates in two threads left it raised for good)
_LIMIT_LOCK = threading.Lock()
_LIMIT_STATE: Dict[str, Any] = {"active": 0, "saved": None}

# Host values an estimated step may read (lengths, targets): at most this many elements each.
HOST_VALUES_LIMIT = 1 << 22


def running() -> int:
    """How many estimates run now, in any thread (a dashboard estimates in the background)."""
    with _LIMIT_LOCK:
        return _LIMIT_STATE["active"]


def host_tensor(data, dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
    """A tensor whose *values* a step may read even inside ``estimate``.

    Outside an estimate this is ``torch.as_tensor(data, dtype=dtype, device=device)``. Inside
    one, every tensor is fake (shapes, no data), so a step that plans its work from values --
    the transducer losses read the lengths of each utterance, the sample-wise loss plans its
    chunks from them -- could not run. A host tensor keeps its values beside the fake tensor, and
    operations on host tensors only (``lengths - 1``, ``lengths.max()``, ``.tolist()``) compute
    real results; mixed with fake tensors they give fake ones, as usual. Lengths and targets of
    a batch are small (the paper's B=1024 x 40 s batch: 1,024 lengths), so this costs nothing.
    """
    if not _ESTIMATE_MODE:
        if isinstance(data, torch.Tensor):
            return data.detach().to(dtype=dtype or data.dtype, device=device or data.device)
        return torch.as_tensor(data, dtype=dtype, device=device)
    from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
    mode = _ESTIMATE_MODE[-1]
    with unset_fake_temporarily():
        if isinstance(data, torch.Tensor) and is_fake(data):
            raise ValueError("host_tensor: data is a fake tensor, its values are unknown; pass "
                             "the values (a list or a real tensor)")
        real = torch.as_tensor(data, dtype=dtype, device="cpu")
        if real.numel() > HOST_VALUES_LIMIT:
            raise ValueError(f"host_tensor: data has {real.numel()} elements, more than the "
                             f"{HOST_VALUES_LIMIT} an estimate keeps on the host")
        real = real.clone()
    dev = torch.device(device) if device is not None else torch.device(_mode_device(mode))
    out = mode.fake_tensor_converter.from_real_tensor(mode, real, make_constant=True)
    return out if dev.type == "cpu" else out.to(dev)


def host_values(*tensors):
    """The real values behind ``tensors`` as a tuple of real tensors (themselves when real; what
    a host tensor keeps inside ``estimate``), or None when any of them is fake without values.
    Use it, under ``real_tensors()``, for checks that read the values of a batch."""
    out = []
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"host_values takes tensors, got {type(t).__name__}")
        if _ESTIMATE_MODE or type(t) is not torch.Tensor:
            from torch._subclasses.fake_tensor import is_fake
            if is_fake(t):
                c = getattr(t, "constant", None)
                if c is None:
                    return None
                t = c
        out.append(t)
    return tuple(out)


def on_host(fn: Callable[..., Any], *tensors):
    """``fn(*values)`` on the real values of ``tensors`` (``host_values``), with tensors real
    again while it runs; nothing (None) when any of them is fake without values. For checks
    that read the values of a batch, which fake tensors cannot give."""
    known = host_values(*tensors)
    if known is None:
        return None
    with real_tensors():
        return fn(*known)


def real_tensors():
    """Inside ``estimate``: a context in which tensors are real again (to build the values of
    host tensors, e.g. random targets); elsewhere it does nothing."""
    import contextlib
    if not _ESTIMATE_MODE:
        return contextlib.nullcontext()
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    return unset_fake_temporarily()


def _mode_device(mode) -> str:
    """The device ``estimate`` creates tensors on (kept beside its fake mode)."""
    return getattr(mode, "_memlab_device", "cpu")


def estimate(step_fn: Callable[..., Any], setup: Optional[Callable[[], Any]] = None, *,
             steps: int = 1, device="cpu") -> Estimate:
    """Measure a training step on fake tensors: full-size configurations without the memory.

    Args:
        step_fn: called ``steps`` times as ``step_fn(*state)`` (or ``step_fn()`` without setup).
        setup: builds what the step needs (model, optimizer, batch) and returns it as a tuple
            (or a single object). It runs under fake tensors too, so a 100 GB model is free.
            Modules and optimizers in the returned tuple are the "parameters" and "optimizer".
        steps: how many steps to run (2 shows the steady state after optimizer state exists).
        device: the device tensors are created on by default inside setup/step.

    Example::

        est = estimate(lambda m, o, x: (m(x).sum().backward(), o.step()),
                       setup=lambda: (net := ResNet(), torch.optim.Adam(net.parameters()),
                                      torch.randn(128, 200, 80)))
        est.peak, est.breakdown()
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
    if setup is not None and not callable(setup):
        raise TypeError(f"setup must be callable or None, got {type(setup).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    from torch._subclasses import fake_tensor as _ft

    dev = torch.device(device)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # constants (e.g. codebooks) may be real
    mode._memlab_device = str(dev)
    # host tensors (host_tensor) propagate their values through ops on host tensors only; torch
    # keeps values for at most CONSTANT_NUMEL_LIMIT elements, 1 by default: raised while we run
    with _LIMIT_LOCK:
        if _LIMIT_STATE["active"] == 0:
            _LIMIT_STATE["saved"] = _ft.CONSTANT_NUMEL_LIMIT
            _ft.CONSTANT_NUMEL_LIMIT = max(_ft.CONSTANT_NUMEL_LIMIT, HOST_VALUES_LIMIT)
        _LIMIT_STATE["active"] += 1
    _ESTIMATE_MODE.append(mode)
    try:
        return _estimate_in(mode, dev, step_fn, setup, steps)
    finally:
        _ESTIMATE_MODE.remove(mode)
        with _LIMIT_LOCK:
            _LIMIT_STATE["active"] -= 1
            if _LIMIT_STATE["active"] == 0:
                _ft.CONSTANT_NUMEL_LIMIT = _LIMIT_STATE["saved"]


def _estimate_in(mode, dev, step_fn, setup, steps) -> Estimate:
    from torch._subclasses.fake_tensor import DataDependentOutputException

    with mode:
        with torch.device(dev):
            state = setup() if setup is not None else ()
            if not isinstance(state, tuple):
                state = (state,)
            models = [s for s in state if isinstance(s, nn.Module)]
            opts = [s for s in state if isinstance(s, torch.optim.Optimizer)]
            others = [s for s in state if not isinstance(s, (nn.Module, torch.optim.Optimizer))]
            from memlab.memory import MemoryMeter
            meter = MemoryMeter(dev, model=models, optimizer=opts, inputs=others, scan=False,
                                _track_all_devices=True)
            with meter:
                try:
                    for _ in range(steps):
                        step_fn(*state)
                except DataDependentOutputException as e:
                    raise NotImplementedError(
                        "estimate cannot run a step that reads tensor values (e.g. .item() or "
                        "a loop over lengths): fake tensors have shapes but no data. Make the "
                        "values it reads host tensors (memlab.memory.host_tensor), as the ASR "
                        "task's batches do, or measure a smaller real step with "
                        "MemoryMeter.") from e
    return Estimate(meter.peak, meter.baseline, meter.peak_phase, meter.breakdown(),
                    meter.category_peaks(), meter.host_peak)
