"""Plotly figures of memory: one colour per category in every figure, the same in every tutorial.

    from memlab.ui.figures import breakdown_figure, timeline_figure, reference_line, log_range
    breakdown_figure(sweep(cfg, "batch_size", [2, 4, 8]), xaxis_title="batch size")
    timeline_figure(measure_step(cfg))          # live bytes through one step, phases shaded

Builders return ``go.Figure``s; the dashboard (``memlab.ui.dashboard``) wraps the figures of
``peak_bars_figure`` / ``live_timeline_figure`` / ``curves_figure`` in ``FigureWidget``s and
fills them with the ``set_*`` functions below, which work on either (call them inside
``FigureWidget.batch_update()``). This module imports plotly, never ipywidgets.

Units, as plotly.js uses them: on a log axis the range and annotation positions are in log10
units, shape coordinates in data units (``reference_line`` handles it).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from memlab import tasks
from memlab import techniques as tech
from memlab.memory import CATEGORIES
from memlab.report import higher_is_better, metric_label

MiB = 2 ** 20
FAR_LIMIT = 5     # a limit / budget line this many times the tallest bar is named, not drawn
BUDGET_NOTE = " · <span style='color:#c62828'>budget "
FONT = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=12)

# One colour per category, the same in every figure (Vega/Tableau 10 tones).
CATEGORY_COLORS = {
    "parameters": "#4C78A8",   # blue
    "gradients": "#F58518",    # orange
    "optimizer": "#54A24B",    # green
    "activations": "#E45756",  # red
    "other": "#9D9D9D",        # grey
}
PHASE_FILL = {"forward": "rgba(76,120,168,0.07)", "backward": "rgba(228,87,86,0.07)",
              "optimizer": "rgba(84,162,75,0.10)"}
# Runs get their own palette (line plots, table swatches), distinct from the categories.
RUN_COLORS = ("#3366CC", "#990099", "#0099C6", "#DD4477", "#66AA00", "#B82E2E", "#316395",
              "#994499", "#22AA99", "#AAAA11", "#6633CC", "#E67300")
# metric -> (line dash, drawn on the evaluation curves); minDCF stays in the runs' metrics:
# a third line per run crowds the plot. A metric not named here: solid, drawn.
METRIC_STYLE = {"accuracy": ("solid", True), "eer": ("dot", True),
                "min_dcf": ("dashdot", False), "ter": ("solid", True)}
TIMELINE_TITLE = "Live bytes through one training step"


def mib(n: Optional[float]) -> float:
    return float(n) / MiB if n is not None else 0.0


def curve_metrics(task: str) -> Tuple[str, ...]:
    """The metrics of ``task`` the dashboard plots and tabulates (from the task object)."""
    return tuple(m for m in tasks.get(task).metrics if METRIC_STYLE.get(m, ("solid", True))[1])


def short_label(cfg) -> str:
    """Two lines for a bar's x tick: the task's own kinds, the optimizer, other kinds when not
    at their default; then the sizes."""
    task = tasks.get(cfg.task)
    own = [cfg.choice(k) for k in task.label_kinds if tech.applies(k, cfg.task)]
    others = [cfg.choice(k) for k in tech.kinds() if k not in task.label_kinds
              and k != "optimizer" and tech.applies(k, cfg.task)
              and cfg.choice(k) != tech.default(k)]
    top = " ".join([*own, cfg.optimizer, *others])
    shape = f"d{cfg.depth}" if cfg.blocks is None else "x".join(map(str, cfg.blocks))
    return f"{top}<br>{shape} w{cfg.width} B{cfg.batch_size}"


def bargap(n: int) -> float:
    """Gap between bars: one or two bars should not fill the whole plot."""
    return {0: 0.6, 1: 0.6, 2: 0.5}.get(n, 0.3)


# ----------------------------------------------------------------------------- reference lines
def reference_line(fig: go.Figure, y: float, text: str = "", *, yref: str = "y",
                   xref: str = "x", color: str = "#888", dash: str = "dot", width: float = 1.5,
                   side: str = "left", font_size: int = 11) -> go.Figure:
    """A horizontal line at data value ``y`` across the plot, labelled ``text`` just above it.

    Unlike ``fig.add_hline(annotation_text=...)`` this is right on a log axis too: plotly.js reads
    a shape's y in data units but an annotation's y in axis units, log10(y) on a log axis, so
    add_hline's label for 80 GB lands at 10^80 and drags the autorange there. The axis type is
    read now: set ``type="log"`` before calling. ``side``: "left" or "right" end of the line.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not (isinstance(y, (int, float)) and math.isfinite(y)):
        raise TypeError(f"y must be a finite number, got {y!r}")
    axis = fig.layout[f"yaxis{yref[1:]}"]
    log = axis.type == "log"
    if log and y <= 0:
        raise ValueError(f"y must be > 0 on the log axis {yref}, got {y!r}")
    fig.add_shape(type="line", xref=f"{xref} domain", x0=0, x1=1, yref=yref, y0=y, y1=y,
                  line=dict(color=color, width=width, dash=dash), layer="above",
                  name="reference")
    if text:
        fig.add_annotation(xref=f"{xref} domain", x=0 if side == "left" else 1,
                           xanchor=side, yref=yref, y=math.log10(y) if log else y,
                           yanchor="bottom", text=text, showarrow=False,
                           font=dict(size=font_size, color=color),
                           bgcolor="rgba(255,255,255,0.7)")
    return fig


def log_range(values, *, below: float = 0.4, above: float = 0.4) -> List[float]:
    """An explicit log-axis range (log10 units) over the positive ``values`` with ``below`` and
    ``above`` decades of room: for figures whose values (bars, reference lines) move with a
    slider, so the axis follows them instead of plotly's autorange."""
    pos = [float(v) for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not pos:
        raise ValueError(f"values must hold a positive number, got {list(values)!r}")
    return [math.log10(min(pos)) - below, math.log10(max(pos)) + above]


# ----------------------------------------------------------------------------- timeline
def timeline_parts(tl: Dict[str, list]):
    """From ``MemoryMeter.timeline_arrays()`` columns: y values in MiB per category, phase bands
    (shapes) and labels + a peak marker (annotations)."""
    xs = list(tl["index"])
    ys: Dict[str, list] = {"index": xs, "op": list(tl.get("op", [""] * len(xs)))}
    for c in CATEGORIES:
        ys[c] = [mib(v) for v in tl[c]]
    shapes: List[dict] = []
    notes: List[dict] = []
    phases = list(tl["phase"])
    if not xs:
        return ys, shapes, notes
    span = xs[-1] - xs[0] + 1
    start = 0
    for i in range(1, len(phases) + 1):   # contiguous runs of one phase -> a shaded band
        if i == len(phases) or phases[i] != phases[start]:
            ph = phases[start]
            x0 = xs[start] - 0.5
            x1 = (xs[i] - 0.5) if i < len(xs) else xs[-1] + 0.5
            shapes.append(dict(type="rect", xref="x", yref="paper", x0=x0, x1=x1, y0=0, y1=1,
                               fillcolor=PHASE_FILL.get(ph, "rgba(0,0,0,0)"),
                               line=dict(width=0), layer="below", name="phase"))
            if start > 0:
                shapes.append(dict(type="line", xref="x", yref="paper", x0=x0, x1=x0, y0=0,
                                   y1=1, line=dict(color="#aaa", width=1, dash="dot"),
                                   layer="below", name="phase"))
            if x1 - x0 >= max(1.0, 0.06 * span):
                notes.append(dict(x=(x0 + x1) / 2, xref="x", y=0.99, yref="paper",
                                  yanchor="top", text=f"<i>{ph}</i>", showarrow=False,
                                  font=dict(size=11, color="#555")))
            start = i
    totals = [sum(ys[c][j] for c in CATEGORIES) for j in range(len(xs))]
    j = max(range(len(totals)), key=totals.__getitem__)
    notes.append(dict(x=xs[j], y=totals[j], xref="x", yref="y",
                      text=f"peak {totals[j]:.2f} MiB", showarrow=True, arrowhead=2,
                      ax=55 if j < len(xs) / 2 else -55, ay=32, font=dict(size=11),
                      bgcolor="rgba(255,255,255,0.9)", bordercolor="#999", borderpad=2))
    return ys, shapes, notes


def timeline_top(ys: Dict[str, list], budget_mib: Optional[float] = None) -> Optional[list]:
    """y range of a timeline: 0 to the peak (or the budget line) plus room for the phase labels
    at the top, so they are not drawn over the tallest stack; None (autorange) when empty."""
    totals = [sum(v) for v in zip(*(ys[c] for c in CATEGORIES))]
    top = max(totals + ([budget_mib] if budget_mib else []), default=0.0)
    return [0, 1.18 * top] if top > 0 else None


def _timeline_traces() -> List[go.Scatter]:
    return [go.Scatter(name=c, x=[], y=[], customdata=[], mode="lines", stackgroup="live",
                       line=dict(width=0.6, color=CATEGORY_COLORS[c]),
                       fillcolor=CATEGORY_COLORS[c],
                       hovertemplate=f"event %{{x}} · %{{customdata}}<br>{c}: %{{y:.2f}} MiB"
                                     "<extra></extra>")
            for c in CATEGORIES]


def set_timeline(fig, timeline: Optional[Dict[str, list]], title: str = TIMELINE_TITLE,
                 detail: str = "") -> None:
    """Fill a figure of ``_timeline_traces`` with ``timeline`` columns (None: empty); the
    title in bold, then `` · detail``."""
    ys, shapes, notes = timeline_parts(timeline) if timeline else ({}, [], [])
    for tr in fig.data:
        tr.x, tr.y, tr.customdata = ys.get("index", []), ys.get(tr.name, []), ys.get("op", [])
    fig.layout.shapes = shapes
    fig.layout.annotations = notes
    fig.layout.title.text = f"<b>{title}</b>" + (f" · {detail}" if detail else "")
    fig.layout.yaxis.range = timeline_top(ys) if ys else None


def fit_timeline_range(fig, budget_mib: Optional[float] = None) -> None:
    """The timeline's y range from its stacks and the budget line ``set_budget`` drew (MiB).
    On a FigureWidget call it after the batch_update that set the data (reads see old values
    inside one)."""
    ys = {tr.name: list(tr.y or []) for tr in fig.data}
    fig.layout.yaxis.range = timeline_top(ys, budget_mib)


def timeline_figure(timeline, title: str = TIMELINE_TITLE, height: int = 360,
                    width: Optional[int] = None) -> go.Figure:
    """Stacked areas of live bytes by category through a metered region, phases shaded.

    ``timeline``: a ``MemoryMeter`` (its ``timeline_arrays()``) or those columns
    (``Record.timeline``).
    """
    if hasattr(timeline, "timeline_arrays"):
        timeline = timeline.timeline_arrays(max_points=600)
    if not isinstance(timeline, dict) or "index" not in timeline:
        raise TypeError("timeline must be a MemoryMeter or MemoryMeter.timeline_arrays() "
                        f"columns, got {type(timeline).__name__}")
    fig = go.Figure(_timeline_traces())
    fig.update_layout(template="plotly_white", height=height, width=width,
                      title=dict(x=0.01, y=0.97),
                      xaxis=dict(title=dict(text="allocation / free event in the step (events)")),
                      yaxis=dict(title=dict(text="live memory (MiB)"), rangemode="tozero"),
                      legend=dict(orientation="h", yanchor="bottom", y=1.06, x=0,
                                  traceorder="normal"),
                      margin=dict(l=60, r=20, t=90, b=60))
    set_timeline(fig, timeline, title)
    return fig


# ----------------------------------------------------------------------------- bars
def breakdown_figure(rows: List[Dict[str, Any]], *, x: str = "label", title: str = "",
                     xaxis_title: str = "", unit: str = "MiB", height: int = 360,
                     width: Optional[int] = None, limit: Optional[float] = None,
                     limit_label: str = "") -> go.Figure:
    """Stacked bars by category (the dashboard's colours), one bar per row; totals on top.

    ``limit`` (in ``unit``) draws a dashed line, e.g. a GPU's memory, labelled ``limit_label``;
    a limit more than ``FAR_LIMIT`` times the tallest bar (tiny fast-mode sizes) would flatten
    the bars, so it is named in a note at the top instead.
    """
    scale = {"MiB": MiB, "GiB": 2 ** 30, "GB": 1e9, "MB": 1e6}.get(unit)
    if scale is None:
        raise ValueError(f"unit must be one of MiB, GiB, GB, MB, got {unit!r}")
    xs = [str(r[x]) for r in rows]
    fig = go.Figure()
    for c in CATEGORIES:
        fig.add_bar(name=c, x=xs, y=[r.get(c, 0) / scale for r in rows],
                    marker_color=CATEGORY_COLORS[c], marker_line_width=0,
                    hovertemplate=f"%{{x}}<br>{c}: %{{y:.3g}} {unit}<extra></extra>")
    for i, r in enumerate(rows):   # x by position: labels such as "2" would read as indices
        total = sum(r.get(c, 0) for c in CATEGORIES) / scale
        fig.add_annotation(x=i, y=total, text=f"{total:.3g}", showarrow=False,
                           yanchor="bottom", font=dict(size=11))
    fig.update_layout(barmode="stack", template="plotly_white", height=height, width=width,
                      title=dict(text=f"<b>{title}</b>" if title else "", x=0.01),
                      xaxis=dict(title=dict(text=xaxis_title), type="category"),
                      yaxis=dict(title=dict(text=f"memory at the peak ({unit})")),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0,
                                  traceorder="normal"),
                      margin=dict(l=60, r=20, t=80, b=60), bargap=bargap(len(rows)))
    tallest = max((sum(r.get(c, 0) for c in CATEGORIES) / scale for r in rows), default=0.0)
    if limit is not None and tallest > 0 and limit > FAR_LIMIT * tallest:
        fig.update_layout(title_subtitle=dict(
            text=f"{limit_label or 'limit'}: {limit:g} {unit}, {limit / tallest:.0f}× the "
                 "tallest bar (off this scale)", font=dict(color="#c62828", size=12)),
            margin_t=100)
    elif limit is not None:
        reference_line(fig, limit, limit_label, color="#c62828", dash="dash")
    return fig


# ----------------------------------------------------------------------------- the dashboard's
def _common() -> Dict[str, Any]:
    return dict(template="plotly_white", font=FONT, hovermode="closest",
                legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0,
                            font=dict(size=11), traceorder="normal"))


def peak_bars_figure() -> go.Figure:
    """Stacked bars by category at each run's peak, runs side by side (empty)."""
    return go.Figure(
        data=[go.Bar(name=c, x=[], y=[], marker_color=CATEGORY_COLORS[c], marker_line_width=0,
                     customdata=[],
                     hovertemplate=f"%{{customdata}}<br>{c}: %{{y:.2f}} MiB<extra></extra>")
              for c in CATEGORIES],
        layout=go.Layout(
            **_common(), barmode="stack", height=380, width=470, bargap=0.35,
            title=dict(text="<b>Memory at the peak</b> · by category", x=0.01, y=0.97,
                       font=dict(size=14)),
            margin=dict(l=60, r=15, t=80, b=70),
            xaxis=dict(title=dict(text="run"), type="category", tickfont=dict(size=10)),
            yaxis=dict(title=dict(text="memory at the peak (MiB)"), rangemode="tozero")))


def set_peak_bars(fig, bars: Sequence[Tuple[str, str, Dict[str, int], int]]) -> None:
    """Bars ``(x tick, hover label, breakdown at the peak, peak bytes)``, totals on top."""
    for tr in fig.data:
        tr.x = [b[0] for b in bars]
        tr.y = [mib(b[2].get(tr.name, 0)) for b in bars]
        tr.customdata = [b[1] for b in bars]
    fig.layout.annotations = [dict(x=i, y=mib(b[3]), text=f"{mib(b[3]):.2f}", showarrow=False,
                                   yanchor="bottom", font=dict(size=11))
                              for i, b in enumerate(bars)]
    fig.layout.bargap = bargap(len(bars))


def set_budget(fig, budget: Optional[int]) -> Optional[float]:
    """Replace the dashed budget line of ``fig`` (bytes; None: no budget); returns the line's
    height in MiB, None when none is drawn. A budget more than ``FAR_LIMIT`` times the tallest
    stack would flatten the bars or areas under it: it is named at the end of the title
    instead of drawn."""
    shapes = [sh for sh in fig.layout.shapes if sh.name != "budget"]
    title = (fig.layout.title.text or "").split(BUDGET_NOTE)[0]
    stacks = [sum(v) for v in zip(*(tr.y or [] for tr in fig.data))]
    tallest = max(stacks, default=0.0)
    if budget is not None and tallest > 0 and mib(budget) > FAR_LIMIT * tallest:
        title += f"{BUDGET_NOTE}{mib(budget):.4g} MiB, off the scale</span>"
    elif budget is not None:
        shapes.append(dict(type="line", xref="paper", x0=0, x1=1, yref="y", y0=mib(budget),
                           y1=mib(budget), name="budget",
                           line=dict(color="#c62828", width=1.5, dash="dash")))
    fig.layout.shapes = shapes
    fig.layout.title.text = title
    drawn = budget is not None and not title.endswith("off the scale</span>")
    return mib(budget) if drawn else None


def live_timeline_figure() -> go.Figure:
    """The dashboard's timeline (empty): the latest metered step of the latest run."""
    return go.Figure(data=_timeline_traces(), layout=go.Layout(
        **_common(), height=380, width=620,
        title=dict(text=f"<b>{TIMELINE_TITLE}</b>", x=0.01, y=0.97, font=dict(size=14)),
        margin=dict(l=60, r=15, t=80, b=70),
        xaxis=dict(title=dict(text="allocation / free event in the step (events)"),
                   rangemode="tozero"),
        yaxis=dict(title=dict(text="live memory (MiB)"), rangemode="tozero")))


def curves_figure() -> go.Figure:
    """Training loss (left) and evaluation metrics (right) per step, no traces yet."""
    fig = go.Figure(make_subplots(rows=1, cols=2, horizontal_spacing=0.09,
                                  subplot_titles=("<b>training loss</b>", "<b>evaluation</b>")))
    fig.update_layout(**_common(), height=330, width=1100, margin=dict(l=60, r=15, t=70, b=55))
    fig.update_layout(legend=dict(y=1.12))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="metric", row=1, col=2, rangemode="tozero")
    return fig


def curve_traces(run: str, color: str, metrics: Iterable[str]):
    """``(series, trace, col)`` for one run: its loss (col 1) and each metric (col 2)."""
    out = [("loss", go.Scatter(x=[], y=[], mode="lines", name=f"{run} loss", legendgroup=run,
                               line=dict(color=color, width=2),
                               hovertemplate=f"{run} step %{{x}}<br>loss %{{y:.3f}}"
                                             "<extra></extra>"), 1)]
    for m in metrics:
        label, dash = metric_label(m), METRIC_STYLE.get(m, ("solid", True))[0]
        out.append((m, go.Scatter(
            x=[], y=[], mode="lines+markers", name=f"{run} {label}", legendgroup=run,
            line=dict(color=color, width=2, dash=dash),
            marker=dict(size=6, symbol="circle" if dash == "solid" else "diamond"),
            hovertemplate=f"{run} step %{{x}}<br>{label} %{{y:.3f}}<extra></extra>"), 2))
    return out


def set_curve_axes(fig, metrics: Iterable[str], last_step: int) -> None:
    """Name the metrics on the right axis (with ↑/↓); whole steps on short runs."""
    fig.layout.yaxis2.title.text = ", ".join(
        f"{metric_label(m)} {'↑' if higher_is_better(m) else '↓'}" for m in metrics)
    for ax in (fig.layout.xaxis, fig.layout.xaxis2):
        ax.dtick = 1 if 0 < last_step <= 12 else None
