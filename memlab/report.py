"""Reports of runs as text: the plain-text table and the one-line run summary.

    from memlab.report import format_table, run_summary, format_metrics
    print(format_table([{"run": "adam", "peak": 3 * 2**20, "step_s": 0.25}]))
    print(run_summary("adam", records, "optimizer"))   # records of one Experiment run

One place for what the CLI (``memlab compare``), the tutorials and the dashboard (its status
line and table) print about a run, so the three say the same thing the same way. Imports neither
ipywidgets nor plotly; the lab only when a summary is asked for (``memlab --help`` stays fast).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

from memlab.memory import CATEGORIES, format_bytes

# metric name -> how a table or legend names it, and whether higher is better
METRIC_NAMES = {"accuracy": ("accuracy", True), "eer": ("EER", False),
                "min_dcf": ("minDCF", False), "ter": ("TER", False)}


def metric_label(name: str) -> str:
    """'eer' -> 'EER'; a metric this table does not know keeps its own name."""
    return METRIC_NAMES.get(name, (name, True))[0]


def higher_is_better(name: str) -> bool:
    return METRIC_NAMES.get(name, (name, True))[1]


# ----------------------------------------------------------------------------- tables
def format_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """Plain-text table of dict rows (bytes columns ending in '_bytes' are humanised)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(k, v):
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.4g}"
        if isinstance(v, int) and (k.endswith("bytes") or k in CATEGORIES or k == "peak"):
            return format_bytes(v)
        return str(v)

    body = [[cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    out = [line, sep] + ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(out)


# ----------------------------------------------------------------------------- runs
def format_metrics(metrics: Optional[Dict[str, float]], names: Iterable[str]) -> str:
    """'accuracy 0.812 · EER 0.210' for the ``names`` present in ``metrics`` ('–' if none)."""
    parts = []
    for k in names:
        v = (metrics or {}).get(k)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            parts.append(f"{metric_label(k)} {v:.3f}")
    return " · ".join(parts) if parts else "–"


def last_metrics(records: Sequence[Any]) -> Dict[str, float]:
    """The metrics of the latest evaluation of a run ({} before the first one)."""
    for r in reversed(records):
        if r.metrics:
            return r.metrics
    return {}


def last_loss(records: Sequence[Any]) -> Optional[float]:
    """The loss of the latest training step (step 0 is the untrained evaluation)."""
    return next((r.loss for r in reversed(records) if r.step > 0 and math.isfinite(r.loss)),
                None)


def run_summary(name: str, records: List[Any], category: Optional[str] = None) -> str:
    """One line for a finished run: its peak (``memlab.lab.peak_record``), ``category``'s bytes
    at that peak, the final loss and the metrics of the last evaluation (first -> last when it
    evaluated more than once), e.g. for printing the runs of ``MemoryLab.run(block=True)`` side
    by side."""
    from memlab.lab import peak_record

    if not records:
        raise ValueError(f"records of run {name!r} is empty: the run did not take a step")
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    parts = [f"{name:17s}"]
    peak = peak_record(records)
    if peak is not None:
        parts.append(f"peak {format_bytes(peak.peak):>10s}")
        if category is not None:
            parts.append(f"{category} at the peak {format_bytes(peak.breakdown[category]):>10s}")
    parts.append(f"final loss {records[-1].loss:.3f}")
    evals = [r.metrics for r in records if r.metrics]
    if evals:
        first, last = evals[0], evals[-1]
        parts += [f"{k} {first[k]:.3f} -> {v:.3f}" if len(evals) > 1 and k in first
                  else f"{k} {v:.3f}" for k, v in last.items()]
    return ", ".join(parts)
