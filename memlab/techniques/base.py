"""Techniques and kinds: the one registry everything in memlab lists its choices from.

A *kind* is a question a run answers once ("memory": how activations are kept, "optimizer",
"loss", later "precision", "accumulation", ...). The set of kinds is open: ``register_kind``
adds one with a default name, so configurations written before it existed keep working.
A *technique* is one answer, registered once under ``(kind, name)``; it declares the tasks it
applies to and contributes to a run through a few hooks:

* ``model_args[task]``: keyword arguments for that task's model constructor (``memory="checkpoint"``
  for the speaker nets, ``loss="samplewise"`` for the transducer: the loss choice);
* ``factory(model, lr, weight_decay=0.0, **kw)``: the optimizer (kind "optimizer");
* ``step_context(step)``: a context manager entered around forward + backward of every training
  step (``step`` is a ``StepInfo``: model, optimizer, batch).

This module imports only the standard library: techniques can register themselves without
pulling in the lab, and models never import it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterable, Mapping, Optional, Tuple


@dataclass(frozen=True)
class Kind:
    name: str                      # e.g. "memory"; also the Config attribute / CLI option
    default: str                   # the name a Config gets when it says nothing
    description: str = ""          # one line: what the kind chooses (CLI --help)


@dataclass(frozen=True)
class StepInfo:
    """What a step context sees: the model, the optimizer and the batch of this step."""
    model: Any
    optimizer: Any
    batch: tuple


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

    def applies_to(self, task: Optional[str]) -> bool:
        return task is None or self.tasks is None or task in self.tasks

    def model_kwargs(self, task: str) -> Dict[str, Any]:
        """Keyword arguments this technique adds to ``task``'s model constructor."""
        return dict(self.model_args.get(task, {}))

    def context(self, step: StepInfo) -> ContextManager:
        """The context entered around forward + backward (a no-op without a hook)."""
        return self.step_context(step) if self.step_context is not None else \
            contextlib.nullcontext()


# kind -> {name -> Technique}; memlab.registry._REGISTRY is this very dict
_KINDS: Dict[str, Kind] = {}
_REGISTRY: Dict[str, Dict[str, Technique]] = {}


def register_kind(kind: str, *, default: str, description: str = "",
                  noop: Optional[str] = None) -> Kind:
    """Add (or redefine) a kind. ``noop``: also register ``default`` as a technique that does
    nothing, for every task, with this description (step-level kinds: 'none')."""
    if not isinstance(kind, str) or not kind.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"kind must be a non-empty name of letters, digits, '-' or '_', "
                         f"got {kind!r}")
    if not isinstance(default, str) or not default:
        raise TypeError(f"default must be a non-empty str, got {default!r}")
    entry = Kind(kind, default, description)
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
             **options: Any) -> Technique:
    """Register (or re-register) technique ``name`` of ``kind``; returns the entry."""
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if tasks is not None:
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a sequence of task names, got the str {tasks!r}")
        tasks = tuple(tasks)
    if step_context is not None and not callable(step_context):
        raise TypeError(f"step_context must be callable, got {type(step_context).__name__}")
    entry = Technique(kind, name, description, tasks, factory, dict(options),
                      {t: dict(a) for t, a in (model_args or {}).items()}, step_context)
    _REGISTRY[kind][name] = entry
    return entry


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
    if not isinstance(name, str) or name not in _REGISTRY[kind]:
        raise ValueError(f"{kind} must be one of {names(kind, task)}, got {name!r}")
    entry = _REGISTRY[kind][name]
    if not entry.applies_to(task):
        raise ValueError(f"{kind}={name!r} does not apply to task={task!r}; "
                         f"choose from {names(kind, task)}")
    return entry
