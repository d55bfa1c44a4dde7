"""What a learner sees, in three layers that import only what they need:

* ``memlab.ui.measure``   -- headless: ``measure_step``, ``sweep`` (torch; no plotly, no widgets)
* ``memlab.ui.figures``   -- plotly figures of memory (no ipywidgets)
* ``memlab.ui.dashboard`` -- ``MemoryLab``, the ipywidgets dashboard over the figures

``from memlab.ui import MemoryLab, sweep, breakdown_figure`` works too; each name imports its
own module on first use, so ``import memlab.ui.measure`` pulls in neither plotly nor ipywidgets.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "measure_step": "measure", "sweep": "measure",
    "CATEGORY_COLORS": "figures", "breakdown_figure": "figures", "timeline_figure": "figures",
    "reference_line": "figures", "log_range": "figures",
    "MemoryLab": "dashboard",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"memlab.ui.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'memlab.ui' has no attribute {name!r}")
