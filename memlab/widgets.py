"""The dashboard's import path (DESIGN public API): ``from memlab.widgets import MemoryLab``.

The code lives in ``memlab.ui`` (``dashboard``: MemoryLab; ``figures``: plotly figures;
``measure``: headless measurement) and ``memlab.report`` (tables and run summaries); the names
tutorials and older code import from here keep working.
"""

from memlab.report import format_table, run_summary  # noqa: F401
from memlab.ui.dashboard import MAX_REDRAWS_PER_S, MemoryLab  # noqa: F401
from memlab.ui.figures import (CATEGORY_COLORS, FAR_LIMIT, PHASE_FILL, RUN_COLORS,  # noqa: F401
                               breakdown_figure, log_range, reference_line, timeline_figure)
from memlab.ui.measure import measure_step, sweep  # noqa: F401

__all__ = ["CATEGORY_COLORS", "FAR_LIMIT", "MAX_REDRAWS_PER_S", "MemoryLab", "PHASE_FILL",
           "RUN_COLORS", "breakdown_figure", "format_table", "log_range", "measure_step",
           "reference_line", "run_summary", "sweep", "timeline_figure"]
