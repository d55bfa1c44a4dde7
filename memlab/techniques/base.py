"""Techniques and kinds: the one registry everything in memlab lists its choices from.

A *kind* is a question a run answers once ("memory": how activations are kept, "optimizer",
"loss", "precision", "accumulation", ...). The set of kinds is open: ``register_kind`` adds one
with a default name, so configurations written before it existed keep working. A kind may have a
``resolve(name)`` that builds a technique for a name it was never registered under (e.g.
"accumulate8"). A *technique* is one answer, registered once under ``(kind, name)``; it declares
the tasks it applies to and contributes to a run through a few hooks:

* ``model_args[task]``: keyword arguments for that task's model constructor (``memory="checkpoint"``
  for the speaker nets, ``loss="samplewise"`` for the transducer: the loss choice);
* ``factory(model, lr, weight_decay=0.0, **kw)``: the optimizer (kind "optimizer");
* ``check(cfg)``: raise a ValueError for a Config it cannot run (a combination, a device);
* ``build_optimizer(model, make)``: the run's optimizer, from ``make(module)`` = the chosen
  optimizer's factory with lr etc. bound (optimizer step in backward);

and through hooks into ``memlab.lab.train_step``, the one training step (``step`` is a
``StepInfo``: model, optimizer, batch and a per-run ``state`` dict)::

    optimizer.zero_grad()
    with step_context(step) of every technique:          # whole step: offload, saved-tensor hooks
        for micro, share in split_batch(batch):           # default: [(batch, 1.0)]
            with forward_context(step) of every technique:  # forward + loss only: autocast
                loss = task_loss(model, micro)
            backward(loss * share, step)                  # default: (loss * share).backward()
    optimizer_step(step)                                  # default: optimizer.step()

``split_batch``, ``backward`` and ``optimizer_step`` replace the default, so at most one chosen
technique may provide each (``hooks`` says which; a second is a ValueError naming both).
``options["needs_gradients"]``: the technique needs every parameter's gradient to exist after
backward (scaling, clipping, summing micro-batches), which an optimizer step in backward refuses.

This module imports only the standard library: techniques can register themselves without
pulling in the lab, and models never import it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import (Any, Callable, ContextManager, Dict, Iterable, Mapping, Optional,
                    Sequence, Tuple)


@dataclass(frozen=True)
class Kind:
    name: str                      # e.g. "memory"; also the Config attribute / CLI option
    default: str                   # the name a Config gets when it says nothing
    description: str = ""          # one line: what the kind chooses (CLI --help)
    resolve: Optional[Callable[[str], Optional["Technique"]]] = None  # unregistered names


@dataclass(frozen=True)
class StepInfo:
    """What a step hook sees: the model, the optimizer and the batch of this step, and ``state``,
    a dict that lives as long as the run (e.g. the fp16 gradient scaler)."""
    model: Any
    optimizer: Any
    batch: tuple
    state: Dict[str, Any] = field(default_factory=dict)


# hooks of train_step that replace its default; at most one chosen technique provides each
REPLACING_HOOKS = ("split_batch", "backward", "optimizer_step", "build_optimizer")


@dataclass(frozen=True)
class Technique:
    kind: str                      # a registered kind, e.g. "optimizer"
    name: str                      # registry key, e.g. "adam8bit"
    description: str               # one line for --help and tooltips
    tasks: Optional[Tuple[str, ...]] = None  # tasks it applies to (None: every task)
    factory: Optional[Callable[..., Any]] = None  # optimizers: factory(model, lr, weight_decay, **kw)
    options: Dict[str, Any] = field(default_factory=dict)  # free-form extras (e.g. default_lr)
    model_args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # task -> kwargs
    step_context: Optional[Callable[[StepInfo], ContextManager]] = None
    forward_context: Optional[Callable[[StepInfo], ContextManager]] = None
    split_batch: Optional[Callable[[tuple], Sequence[Tuple[tuple, float]]]] = None
    backward: Optional[Callable[[Any, StepInfo], None]] = None
    optimizer_step: Optional[Callable[[StepInfo], None]] = None
    build_optimizer: Optional[Callable[[Any, Callable[[Any], Any]], Any]] = None
    check: Optional[Callable[[Any], None]] = None

    @property
    def hooks(self) -> Tuple[str, ...]:
        """The replacing hooks of train_step this technique provides."""
        return tuple(h for h in REPLACING_HOOKS if getattr(self, h) is not None)

    def applies_to(self, task: Optional[str]) -> bool:
        return task is None or self.tasks is None or task in self.tasks

    def model_kwargs(self, task: str) -> Dict[str, Any]:
        """Keyword arguments this technique adds to ``task``'s model constructor."""
        return dict(self.model_args.get(task, {}))

    def context(self, step: StepInfo) -> ContextManager:
        """The context entered around forward + backward (a no-op without a hook)."""
        return self.step_context(step) if self.step_context is not None else \
            contextlib.nullcontext()

    def forward(self, step: StepInfo) -> ContextManager:
        """The context entered around forward + loss of each micro-batch (a no-op without one)."""
        return self.forward_context(step) if self.forward_context is not None else \
            contextlib.nullcontext()


# kind -> {name -> Technique}; memlab.registry._REGISTRY is this very dict
_KINDS: Dict[str, Kind] = {}
_REGISTRY: Dict[str, Dict[str, Technique]] = {}


def register_kind(kind: str, *, default: str, description: str = "",
                  noop: Optional[str] = None,
                  resolve: Optional[Callable[[str], Optional[Technique]]] = None) -> Kind:
    """Add (or redefine) a kind. ``noop``: also register ``default`` as a technique that does
    nothing, for every task, with this description (step-level kinds: 'none'). ``resolve``:
    ``resolve(name)`` -> a Technique (built with ``make``) or None, for names not registered."""
    if not isinstance(kind, str) or not kind.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"kind must be a non-empty name of letters, digits, '-' or '_', "
                         f"got {kind!r}")
    if not isinstance(default, str) or not default:
        raise TypeError(f"default must be a non-empty str, got {default!r}")
    if resolve is not None and not callable(resolve):
        raise TypeError(f"resolve must be callable or None, got {type(resolve).__name__}")
    entry = Kind(kind, default, description, resolve)
    _KINDS[kind] = entry
    _REGISTRY.setdefault(kind, {})
    if noop is not None and default not in _REGISTRY[kind]:
        register(kind, default, description=noop, tasks=None)
    return entry


def unregister_kind(kind: str) -> None:
    """Remove a kind and all its techniques (tests use it to undo a registration)."""
    _KINDS.pop(kind, None)
    _REGISTRY.pop(kind, None)


def _check_kind(kind: str) -> None:
    _load_builtin()
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {tuple(_KINDS)}, got {kind!r}")


def register(kind: str, name: str, *, description: str, tasks: Optional[Iterable[str]] = None,
             factory: Optional[Callable[..., Any]] = None,
             model_args: Optional[Mapping[str, Mapping[str, Any]]] = None,
             step_context: Optional[Callable[[StepInfo], ContextManager]] = None,
             **hooks_and_options: Any) -> Technique:
    """Register (or re-register) technique ``name`` of ``kind``; returns the entry.

    Keyword arguments named like a hook (``forward_context``, ``split_batch``, ``backward``,
    ``optimizer_step``, ``build_optimizer``, ``check``) are hooks; the rest are options."""
    _check_kind(kind)
    entry = make(kind, name, description=description, tasks=tasks, factory=factory,
                 model_args=model_args, step_context=step_context, **hooks_and_options)
    _REGISTRY[kind][name] = entry
    return entry


_HOOKS = ("forward_context", "split_batch", "backward", "optimizer_step", "build_optimizer",
          "check")


def make(kind: str, name: str, *, description: str, tasks: Optional[Iterable[str]] = None,
         factory: Optional[Callable[..., Any]] = None,
         model_args: Optional[Mapping[str, Mapping[str, Any]]] = None,
         step_context: Optional[Callable[[StepInfo], ContextManager]] = None,
         **hooks_and_options: Any) -> Technique:
    """A Technique, checked but not registered (what ``register`` and a kind's resolve use)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if tasks is not None:
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a sequence of task names, got the str {tasks!r}")
        tasks = tuple(tasks)
    hooks = {h: hooks_and_options.pop(h) for h in _HOOKS if h in hooks_and_options}
    for h, fn in dict(hooks, step_context=step_context).items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{h} must be callable, got {type(fn).__name__}")
    return Technique(kind, name, description, tasks, factory, dict(hooks_and_options),
                     {t: dict(a) for t, a in (model_args or {}).items()}, step_context, **hooks)


def unregister(kind: str, name: str) -> None:
    _REGISTRY.get(kind, {}).pop(name, None)


_LOADED = []


def _load_builtin() -> None:
    # Importing the module runs its register calls. Late import: no cycles.
    if not _LOADED:
        _LOADED.append(True)
        import importlib
        importlib.import_module("memlab.techniques.builtin")


def kinds() -> Tuple[str, ...]:
    """Every registered kind, in registration order (the dashboard builds one control each)."""
    _load_builtin()
    return tuple(_KINDS)


def kind(kind: str) -> Kind:
    _check_kind(kind)
    return _KINDS[kind]


def default(kind: str) -> str:
    """The name a configuration that says nothing about ``kind`` gets."""
    _check_kind(kind)
    return _KINDS[kind].default


def names(kind: str, task: Optional[str] = None) -> Tuple[str, ...]:
    """Registered names of ``kind`` (optionally only those that apply to ``task``)."""
    _check_kind(kind)
    return tuple(n for n, t in _REGISTRY[kind].items() if t.applies_to(task))


def applies(kind: str, task: str) -> bool:
    """Whether any technique of ``kind`` applies to ``task`` (e.g. no loss for speakers)."""
    return bool(names(kind, task))


def get(kind: str, name: str, task: Optional[str] = None) -> Technique:
    """The entry for ``name``; a clear ValueError naming the argument and the choices."""
    _check_kind(kind)
    entry = _REGISTRY[kind].get(name) if isinstance(name, str) else None
    if entry is None and isinstance(name, str) and _KINDS[kind].resolve is not None:
        entry = _KINDS[kind].resolve(name)         # e.g. "accumulate8"
    if entry is None:
        raise ValueError(f"{kind} must be one of {names(kind, task)}, got {name!r}")
    if not entry.applies_to(task):
        raise ValueError(f"{kind}={name!r} does not apply to task={task!r}; "
                         f"choose from {names(kind, task)}")
    return entry


def step_hooks(chosen: Iterable[Technique]) -> Dict[str, Technique]:
    """hook name -> the one technique providing it, for the replacing hooks of train_step;
    a ValueError naming both techniques when two of ``chosen`` provide the same hook."""
    out: Dict[str, Technique] = {}
    for t in chosen:
        for h in t.hooks:
            if h in out:
                o = out[h]
                raise ValueError(f"{o.kind}={o.name!r} and {t.kind}={t.name!r} cannot be combined: "
                                 f"both replace the training step's {h}")
            out[h] = t
    return out
