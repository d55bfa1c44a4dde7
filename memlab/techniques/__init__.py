"""Techniques: one object per registered name, grouped in an open set of kinds.

    from memlab import techniques
    techniques.kinds()                       # ("memory", "optimizer", "loss", ...)
    techniques.names("memory", "speaker")    # what a dashboard dropdown lists
    techniques.get("optimizer", "adam8bit").factory(model, lr=1e-3)

Registering once (``register`` / ``register_kind``) makes a technique appear in
``memlab.lab.Config`` validation, ``memlab compare`` (one ``--<kind>`` option per kind) and the
dashboard. See ``memlab.techniques.base`` for the hooks a technique contributes through (model
arguments, optimizer factory, checks, and the hooks of the one training step) and
``memlab.steps`` for the step-level techniques (precision, accumulation, optimizer step in
backward, activation offload).
"""

from memlab.techniques.base import (REPLACING_HOOKS, Kind, StepInfo, Technique, applies, default,
                                    get, kind, kinds, make, names, register, register_kind,
                                    step_hooks, unregister, unregister_kind)

__all__ = ["REPLACING_HOOKS", "Kind", "StepInfo", "Technique", "applies", "default", "get",
           "kind", "kinds", "make", "names", "register", "register_kind", "step_hooks",
           "unregister", "unregister_kind"]
