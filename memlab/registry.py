"""Strategy registries: one name per technique, listed by the lab, the CLI and the widgets.

A strategy is a name in one of three registries:

* ``memory``    -- how a model keeps its activations ("vanilla", "checkpoint", "reversible", ...)
* ``optimizer`` -- which optimizer trains it ("sgd", "adam", "adam8bit", "lowrank-adam", ...)
* ``loss``      -- how the transducer loss is computed ("batched", "samplewise")

Registering once makes a technique appear everywhere: ``memlab.lab.Config`` validates against
these registries, ``memlab compare --help`` lists them and ``MemoryLab`` builds its dropdowns
from them. This module imports nothing but the standard library so that techniques can register
themselves without pulling in the lab.

Example::

    from memlab.registry import register_optimizer

    @register_optimizer("my-sgd", description="plain SGD", tasks=("speaker", "asr"))
    def build(model, lr, weight_decay=0.0, **kw):
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

KINDS = ("memory", "optimizer", "loss")
TASKS = ("speaker", "asr")


@dataclass(frozen=True)
class Strategy:
    kind: str                      # "memory" | "optimizer" | "loss"
    name: str                      # registry key, e.g. "adam8bit"
    description: str               # one line for --help and tooltips
    tasks: Tuple[str, ...]         # tasks the strategy applies to
    factory: Optional[Callable[..., Any]] = None  # optimizers: factory(model, lr, weight_decay, **kw)
    options: Dict[str, Any] = field(default_factory=dict)  # free-form extras (e.g. defaults)


_REGISTRY: Dict[str, Dict[str, Strategy]] = {k: {} for k in KINDS}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def register(kind: str, name: str, *, description: str, tasks: Iterable[str] = TASKS,
             factory: Optional[Callable[..., Any]] = None, **options: Any) -> Strategy:
    """Register (or re-register) strategy ``name`` of ``kind``; returns the entry."""
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    tasks = tuple(tasks)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks must be drawn from {TASKS}, got {t!r}")
    entry = Strategy(kind, name, description, tasks, factory, dict(options))
    _REGISTRY[kind][name] = entry
    return entry


def register_memory(name: str, *, description: str, tasks: Iterable[str] = ("speaker",), **options):
    return register("memory", name, description=description, tasks=tasks, **options)


def register_loss(name: str, *, description: str, tasks: Iterable[str] = ("asr",), **options):
    return register("loss", name, description=description, tasks=tasks, **options)


def register_optimizer(name: str, *, description: str, tasks: Iterable[str] = TASKS, **options):
    """Decorator: ``factory(model, lr, weight_decay=0.0, **kw) -> torch.optim.Optimizer``."""
    def deco(factory):
        register("optimizer", name, description=description, tasks=tasks, factory=factory, **options)
        return factory
    return deco


def _load_builtin() -> None:
    # Importing these modules runs their register_* calls. Late import: no cycles.
    import importlib
    for mod in ("memlab.strategies",):
        importlib.import_module(mod)


def names(kind: str, task: Optional[str] = None) -> Tuple[str, ...]:
    """Registered names of ``kind`` (optionally only those that apply to ``task``)."""
    _check_kind(kind)
    _load_builtin()
    return tuple(n for n, s in _REGISTRY[kind].items() if task is None or task in s.tasks)


def get(kind: str, name: str, task: Optional[str] = None) -> Strategy:
    """The entry for ``name``; a clear ValueError naming the choices otherwise."""
    _check_kind(kind)
    _load_builtin()
    arg = {"memory": "memory", "optimizer": "optimizer", "loss": "loss"}[kind]
    if name not in _REGISTRY[kind]:
        raise ValueError(f"{arg} must be one of {names(kind, task)}, got {name!r}")
    entry = _REGISTRY[kind][name]
    if task is not None and task not in entry.tasks:
        raise ValueError(f"{arg}={name!r} does not apply to task={task!r}; "
                         f"choose from {names(kind, task)}")
    return entry
