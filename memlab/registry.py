"""Strategy registry (compatibility layer over ``memlab.techniques``).

``names``, ``get``, ``register`` and the ``register_memory`` / ``register_loss`` /
``register_optimizer`` helpers keep their meaning; the entries are ``memlab.techniques``
``Technique`` objects (``Strategy`` is the old name) and the set of kinds is open
(``memlab.techniques.register_kind``). Example::

    from memlab.registry import register_optimizer

    @register_optimizer("my-sgd", description="plain SGD", tasks=("speaker", "asr"))
    def build(model, lr, weight_decay=0.0, **kw):
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from memlab.techniques.base import (_REGISTRY, Technique, get, kinds, names,  # noqa: F401
                                    register as _register)

Strategy = Technique
TASKS = ("speaker", "asr")       # the built-in tasks (memlab.tasks.names() lists all)


def __getattr__(name: str):
    if name == "KINDS":          # open: every kind registered so far
        return kinds()
    raise AttributeError(f"module 'memlab.registry' has no attribute {name!r}")


def register(kind: str, name: str, *, description: str, tasks: Optional[Iterable[str]] = TASKS,
             factory=None, **options: Any) -> Technique:
    """Register (or re-register) strategy ``name`` of ``kind``; returns the entry."""
    return _register(kind, name, description=description, tasks=tasks, factory=factory, **options)


def register_memory(name: str, *, description: str, tasks: Iterable[str] = ("speaker",),
                    **options) -> Technique:
    return register("memory", name, description=description, tasks=tasks, **options)


def register_loss(name: str, *, description: str, tasks: Iterable[str] = ("asr",),
                  **options) -> Technique:
    return register("loss", name, description=description, tasks=tasks, **options)


def register_optimizer(name: str, *, description: str, tasks: Iterable[str] = TASKS, **options):
    """Decorator: ``factory(model, lr, weight_decay=0.0, **kw) -> torch.optim.Optimizer``."""
    def deco(factory):
        register("optimizer", name, description=description, tasks=tasks, factory=factory,
                 **options)
        return factory
    return deco
