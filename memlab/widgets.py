"""MemoryLab: a JupyterLab dashboard that trains a real model and shows where the memory goes.

    from memlab.widgets import MemoryLab
    lab = MemoryLab(task="speaker", batch_size=16)
    lab.show()                       # controls + live plotly figures
    records = lab.run(block=True)    # the same run from code (headless too); figures update

What it shows (one colour per memory category in every figure):

* ``fig_breakdown`` -- stacked bars: bytes by category at each run's peak (MiB), runs side by side
* ``fig_timeline``  -- stacked areas: live bytes through the latest metered step, event by event,
  with the forward / backward / optimizer phases shaded
* ``fig_curves``    -- training loss and the task metric (speaker: accuracy, EER; asr: TER) per step
* ``table``         -- one row per run: configuration, peak, step time, final metric

Training runs in a background thread (ipywidgets 8 sends widget updates from any thread), figure
updates are throttled to ``MAX_REDRAWS_PER_S`` and batched with ``FigureWidget.batch_update``.
Stop sets ``Experiment.stop()``; the step loop checks it after every step. An error in a run is
shown in the dashboard (status line + traceback); ``run(block=True)`` also re-raises it, except
``MemoryBudgetExceeded``, which is an outcome, not a bug: the run is marked "over budget".

The strategy dropdowns list what ``memlab.registry`` holds for the task, so a technique registered
later appears here without a change to this file.

References: ipywidgets 8 user guide ("Asynchronous widgets", "Output widgets"); plotly
FigureWidget (``batch_update``, plotly >= 6 renders it through anywidget).
"""

from __future__ import annotations

import html
import math
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from memlab import registry
from memlab.lab import MODELS, TASKS, Config, Experiment, Record, estimate_config
from memlab.memory import CATEGORIES, Estimate, MemoryBudgetExceeded, format_bytes

MiB = 2 ** 20
MAX_REDRAWS_PER_S = 10
FAR_LIMIT = 5     # a limit / budget line this many times the tallest bar is named, not drawn
_BUDGET_NOTE = " · <span style='color:#c62828'>budget "

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
METRIC_STYLE = {  # name -> (label, dash, higher is better)
    "accuracy": ("accuracy", "solid", True),
    "eer": ("EER", "dot", False),
    "min_dcf": ("minDCF", "dashdot", False),
    "ter": ("TER", "solid", False),
}
TASK_METRICS = {"speaker": ("accuracy", "eer"), "asr": ("ter",)}

# Config fields that have a control; everything else comes from the constructor's overrides.
_CONTROLLED = ("task", "model", "batch_size", "depth", "width", "memory", "optimizer", "loss",
               "steps", "budget")


@dataclass
class _Run:
    """Bookkeeping for one run (``MemoryLab.runs`` holds ``(config, records)`` pairs)."""
    index: int
    config: Config
    records: List[Record] = field(default_factory=list)
    status: str = "starting"      # running | done | stopped | over budget | error
    error: Optional[BaseException] = None
    started: float = field(default_factory=time.perf_counter)
    ended: Optional[float] = None
    stop_requested_at: Optional[float] = None

    @property
    def color(self) -> str:
        return RUN_COLORS[(self.index - 1) % len(RUN_COLORS)]

    @property
    def name(self) -> str:
        return f"#{self.index}"

    @property
    def peak_record(self) -> Optional[Record]:
        metered = [r for r in self.records if r.metered and r.peak is not None]
        return max(metered, key=lambda r: r.peak) if metered else None

    @property
    def last_metered(self) -> Optional[Record]:
        for r in reversed(self.records):
            if r.metered and r.timeline:
                return r
        return None

    @property
    def steps_done(self) -> int:
        return max((r.step for r in self.records), default=0)

    @property
    def step_seconds(self) -> Optional[float]:
        """Median wall time of un-metered steps (step 1 is warm-up); metered ones if none."""
        plain = [r.seconds for r in self.records if r.step > 1 and not r.metered]
        anyr = [r.seconds for r in self.records if r.step > 0]
        vals = plain or anyr
        return statistics.median(vals) if vals else None

    @property
    def final_metrics(self) -> Dict[str, float]:
        for r in reversed(self.records):
            if r.metrics:
                return r.metrics
        return {}


def _timeline_parts(tl: Dict[str, list]):
    """From ``MemoryMeter.timeline_arrays()`` columns: y values in MiB per category, phase bands
    (shapes) and labels + a peak marker (annotations)."""
    xs = list(tl["index"])
    ys: Dict[str, list] = {"index": xs, "op": list(tl.get("op", [""] * len(xs)))}
    for c in CATEGORIES:
        ys[c] = [_mib(v) for v in tl[c]]
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


def _timeline_top(ys: Dict[str, list], budget_mib: Optional[float] = None) -> Optional[list]:
    """y range of a timeline: 0 to the peak (or the budget line) plus room for the phase labels
    at the top, so they are not drawn over the tallest stack; None (autorange) when empty."""
    totals = [sum(v) for v in zip(*(ys[c] for c in CATEGORIES))]
    top = max(totals + ([budget_mib] if budget_mib else []), default=0.0)
    return [0, 1.18 * top] if top > 0 else None


def timeline_figure(timeline, title: str = "Live bytes through one training step",
                    height: int = 360, width: Optional[int] = None) -> go.Figure:
    """Stacked areas of live bytes by category through a metered region, phases shaded.

    ``timeline``: a ``MemoryMeter`` (its ``timeline_arrays()``) or those columns
    (``Record.timeline``).
    """
    if hasattr(timeline, "timeline_arrays"):
        timeline = timeline.timeline_arrays(max_points=600)
    if not isinstance(timeline, dict) or "index" not in timeline:
        raise TypeError("timeline must be a MemoryMeter or MemoryMeter.timeline_arrays() "
                        f"columns, got {type(timeline).__name__}")
    ys, shapes, notes = _timeline_parts(timeline)
    fig = go.Figure()
    for c in CATEGORIES:
        fig.add_scatter(name=c, x=ys["index"], y=ys[c], customdata=ys["op"], mode="lines",
                        stackgroup="live", line=dict(width=0.6, color=CATEGORY_COLORS[c]),
                        fillcolor=CATEGORY_COLORS[c],
                        hovertemplate=f"event %{{x}} · %{{customdata}}<br>{c}: %{{y:.2f}} MiB"
                                      "<extra></extra>")
    fig.update_layout(template="plotly_white", height=height, width=width, shapes=shapes,
                      annotations=notes, title=dict(text=f"<b>{title}</b>", x=0.01, y=0.97),
                      xaxis=dict(title=dict(text="allocation / free event in the step (events)")),
                      yaxis=dict(title=dict(text="live memory (MiB)"), rangemode="tozero",
                                 range=_timeline_top(ys)),
                      legend=dict(orientation="h", yanchor="bottom", y=1.06, x=0,
                                  traceorder="normal"),
                      margin=dict(l=60, r=20, t=90, b=60))
    return fig


def _bargap(n: int) -> float:
    """Gap between bars: one or two bars should not fill the whole plot."""
    return {0: 0.6, 1: 0.6, 2: 0.5}.get(n, 0.3)


def _short_label(cfg: Config) -> str:
    """Two lines for a bar's x tick: what a learner changes most."""
    if cfg.task == "speaker":
        top = f"{cfg.memory} {cfg.optimizer}"
    else:
        top = f"{cfg.loss} {cfg.optimizer}"
    size = f"d{cfg.depth} w{cfg.width} B{cfg.batch_size}" if cfg.blocks is None else \
        f"{'x'.join(map(str, cfg.blocks))} w{cfg.width} B{cfg.batch_size}"
    return f"{top}<br>{size}"


def _mib(n: Optional[float]) -> float:
    return float(n) / MiB if n is not None else 0.0


def _fmt_metric(metrics: Dict[str, float], task: str) -> str:
    parts = []
    for k in TASK_METRICS.get(task, ()):
        v = metrics.get(k)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            parts.append(f"{METRIC_STYLE[k][0]} {v:.3f}")
    return " · ".join(parts) if parts else "–"


class MemoryLab:
    """Controls + live figures for ``memlab.lab.Experiment`` runs.

    Args:
        task: "speaker" or "asr".
        **config_overrides: any ``memlab.lab.Config`` field; those with a control (batch_size,
            depth, width, memory, optimizer, loss, steps, model, budget) set its start value, the
            rest (seconds, eval_every, measure_every, lr, ...) apply to every run.

    Attributes:
        widget: the dashboard (an ``ipywidgets.VBox``); ``show()`` displays it.
        config: the ``Config`` the controls describe now (read-only view).
        runs: ``[(config, records), ...]``, one pair per run, records growing live.
        fig_breakdown, fig_timeline, fig_curves: the plotly ``FigureWidget``s.
        last_error: the exception that ended the latest run, or None.
    """

    def __init__(self, task: str = "speaker", **config_overrides: Any):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        unknown = set(config_overrides) - set(Config.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown Config field(s) {sorted(unknown)}; expected names from "
                            f"memlab.lab.Config")
        self._overrides = dict(config_overrides)
        self._task0 = task
        base = Config.for_task(task, **config_overrides).validate()
        self._base = base
        self.runs: List[Tuple[Config, List[Record]]] = []
        self._runs: List[_Run] = []
        self._experiment: Optional[Experiment] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.RLock()
        self._last_draw = 0.0
        self._syncing = False          # True while controls are set from code
        self.last_error: Optional[BaseException] = None
        self.last_estimate: Optional[Estimate] = None
        self._estimate_cache: Optional[Tuple[Config, Estimate]] = None
        self._build_controls(base)
        self._build_figures()
        self._build_layout()
        self._draw(force=True)

    # ------------------------------------------------------------------ controls
    def _build_controls(self, cfg: Config) -> None:
        style = {"description_width": "initial"}
        self.w_task = W.ToggleButtons(options=list(TASKS), value=cfg.task, description="task",
                                      style={"description_width": "initial",
                                             "button_width": "76px"},
                                      tooltips=["speaker verification (ResNet / DF-ResNet, "
                                                "AAM-softmax)", "transducer ASR (RNN-T loss)"])
        self.w_model = W.Dropdown(options=list(MODELS[cfg.task]), value=cfg.model_name,
                                  description="model", style=style,
                                  layout=W.Layout(width="170px"))
        slider = dict(continuous_update=False, style=style)
        self.w_batch = W.IntSlider(value=cfg.batch_size, min=1, max=max(256, cfg.batch_size),
                                   description="batch size", layout=W.Layout(width="280px"),
                                   tooltip="utterances per training step", **slider)
        self.w_depth = W.IntSlider(value=cfg.depth, min=1, max=max(8, cfg.depth),
                                   description="depth", layout=W.Layout(width="260px"),
                                   tooltip="blocks per stage (speaker) / encoder layers (asr)",
                                   **slider)
        self.w_width = W.IntSlider(value=cfg.width, min=4, max=max(256, cfg.width), step=4,
                                   description="width", layout=W.Layout(width="260px"),
                                   tooltip="base channels (speaker) / model dim (asr)", **slider)
        if cfg.blocks is not None:   # per-stage blocks override depth
            self.w_depth.disabled = True
            self.w_depth.tooltip = f"fixed by blocks={tuple(cfg.blocks)}"
        self.w_steps = W.BoundedIntText(value=cfg.steps, min=1, max=1_000_000,
                                        description="steps", style=style,
                                        layout=W.Layout(width="150px"))
        def dd(desc):   # each widget its own Layout: hiding one must not hide the others
            return W.Dropdown(description=desc, style=style, layout=W.Layout(width="230px"))
        self.w_memory, self.w_optimizer, self.w_loss = dd("activations"), dd("optimizer"), \
            dd("loss")
        self.w_hint = W.HTML(layout=W.Layout(margin="0 0 0 8px"))
        self._fill_strategies(cfg)

        budget_mib = round(cfg.budget / MiB, 2) if cfg.budget else 64.0
        self.w_budget_on = W.Checkbox(value=cfg.budget is not None, description="fit into",
                                      indent=False, layout=W.Layout(width="80px"))
        self.w_budget = W.BoundedFloatText(value=budget_mib, min=0.01, max=1e9,
                                           step=1, layout=W.Layout(width="90px"))
        self.w_budget_unit = W.Dropdown(options=["MiB", "GiB"], value="MiB",
                                        layout=W.Layout(width="72px"))
        self.w_estimate_btn = W.Button(description="Estimate", icon="calculator",
                                       tooltip="measure one step of this configuration on fake "
                                       "tensors (no memory, no data) and compare with the budget",
                                       layout=W.Layout(width="100px"))
        self.w_estimate = W.HTML(layout=W.Layout(margin="0 0 0 8px"))

        self.w_run = W.Button(description="Run", icon="play", button_style="success",
                              tooltip="train this configuration (in the background)",
                              layout=W.Layout(width="90px"))
        self.w_stop = W.Button(description="Stop", icon="stop", button_style="danger",
                               disabled=True, tooltip="stop after the current step",
                               layout=W.Layout(width="90px"))
        self.w_clear = W.Button(description="Clear", icon="trash", tooltip="forget all runs",
                                layout=W.Layout(width="90px"))
        self.w_progress = W.IntProgress(value=0, min=0, max=1, bar_style="info",
                                        layout=W.Layout(width="160px"))
        self.w_status = W.HTML(layout=W.Layout(margin="0 0 0 8px"))
        self.w_error = W.Output(layout=W.Layout(max_height="240px", overflow="auto"))

        self.w_task.observe(self._on_task, names="value")
        for w in (self.w_model, self.w_batch, self.w_depth, self.w_width, self.w_steps,
                  self.w_memory, self.w_optimizer, self.w_loss, self.w_budget_on, self.w_budget,
                  self.w_budget_unit):
            w.observe(self._on_control, names="value")
        self.w_run.on_click(lambda _b: self._safe(self._start))
        self.w_stop.on_click(lambda _b: self.stop())
        self.w_clear.on_click(lambda _b: self._safe(self.clear))
        self.w_estimate_btn.on_click(lambda _b: self._estimate_ui())

    def _fill_strategies(self, cfg: Config) -> None:
        """(Re)read the registries: the dropdowns list every strategy for the task."""
        self._syncing = True
        try:
            for w, kind, current in ((self.w_memory, "memory", cfg.memory),
                                     (self.w_optimizer, "optimizer", cfg.optimizer),
                                     (self.w_loss, "loss", cfg.loss)):
                names = list(registry.names(kind, cfg.task))
                w.options = names
                w.value = current if current in names else (names[0] if names else None)
                w.disabled = len(names) <= 1
                w.layout.display = "none" if not names else None   # e.g. no loss for speaker
                w.tooltip = self._describe(kind, w.value, cfg.task)
        finally:
            self._syncing = False
        self._update_hint()

    @staticmethod
    def _describe(kind: str, name: Optional[str], task: str) -> str:
        if not name:
            return f"no {kind} strategy applies to task {task!r}"
        try:
            return registry.get(kind, name).description
        except ValueError:
            return ""

    def _update_hint(self) -> None:
        """One line per strategy that matters for the task: what the selected one does."""
        task = self.w_task.value
        shown = [("memory", self.w_memory), ("optimizer", self.w_optimizer)]
        if task == "asr":
            shown = [("optimizer", self.w_optimizer), ("loss", self.w_loss)]
        rows = [f"<b>{html.escape(str(w.value))}</b>: "
                f"{html.escape(self._describe(kind, w.value, task))}"
                for kind, w in shown if w.value is not None]
        self.w_hint.value = ("<div style='font-size:12px;color:#555;line-height:1.45'>"
                             + "<br>".join(rows) + "</div>")

    def refresh_strategies(self) -> None:
        """Pick up strategies registered since the dashboard was built."""
        self._fill_strategies(self.config)

    def _on_task(self, change) -> None:
        if self._syncing:
            return
        task = change["new"]
        keep = {k: v for k, v in self._overrides.items() if k not in _CONTROLLED}
        if task == self._task0:   # back to the constructor's task: all of its overrides
            keep = dict(self._overrides)
        base = Config.for_task(task, **keep)
        self._base = base
        self._syncing = True
        try:
            self.w_model.options = list(MODELS[task])
            self.w_model.value = base.model_name
            self.w_batch.value = base.batch_size
            self.w_depth.value = base.depth
            self.w_depth.disabled = base.blocks is not None and task == "speaker"
            self.w_width.value = base.width
            self.w_steps.value = base.steps
        finally:
            self._syncing = False
        self._fill_strategies(base)
        self._on_control(None)

    def _on_control(self, change) -> None:
        if self._syncing:
            return
        for w, kind in ((self.w_memory, "memory"), (self.w_optimizer, "optimizer"),
                        (self.w_loss, "loss")):
            w.tooltip = self._describe(kind, w.value, self.w_task.value)
        self._update_hint()
        if self.w_budget_on.value and not self.running:
            self._estimate_ui()
        elif not self.w_budget_on.value:
            self.w_estimate.value = ""
        self._draw_budget_lines()

    def _budget_bytes(self) -> Optional[int]:
        if not self.w_budget_on.value:
            return None
        scale = MiB if self.w_budget_unit.value == "MiB" else 2 ** 30
        return max(1, int(self.w_budget.value * scale))

    @property
    def config(self) -> Config:
        """The configuration the controls describe (changing a control changes it)."""
        values = dict(task=self.w_task.value, model=self.w_model.value,
                      batch_size=int(self.w_batch.value), depth=int(self.w_depth.value),
                      width=int(self.w_width.value), steps=int(self.w_steps.value),
                      memory=self.w_memory.value or self._base.memory,
                      optimizer=self.w_optimizer.value or self._base.optimizer,
                      loss=self.w_loss.value or self._base.loss,
                      budget=self._budget_bytes())
        return self._base.replace(**values)

    def set(self, **values: Any) -> "MemoryLab":
        """Set controls from code: ``lab.set(batch_size=64, optimizer="adam8bit")``.

        ``budget`` takes bytes (or None to switch the budget off); fields without a control
        change the base configuration.
        """
        mapping = {"model": self.w_model, "batch_size": self.w_batch, "depth": self.w_depth,
                   "width": self.w_width, "steps": self.w_steps, "memory": self.w_memory,
                   "optimizer": self.w_optimizer, "loss": self.w_loss}
        if "task" in values and values["task"] != self.w_task.value:
            if values["task"] not in TASKS:
                raise ValueError(f"task must be one of {TASKS}, got {values['task']!r}")
            self.w_task.value = values["task"]
        rest = {}
        self._syncing = True          # one estimate / redraw at the end, not one per control
        try:
            for k, v in values.items():
                if k == "task":
                    continue
                if k == "budget":
                    if v is None:
                        self.w_budget_on.value = False
                        continue
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                        raise ValueError(f"budget must be a positive number of bytes or None, "
                                         f"got {v!r}")
                    if v >= 2 ** 30:
                        self.w_budget_unit.value = "GiB"
                        self.w_budget.value = round(v / 2 ** 30, 3)
                    else:
                        self.w_budget_unit.value = "MiB"
                        self.w_budget.value = round(v / MiB, 2)
                    self.w_budget_on.value = True
                    continue
                w = mapping.get(k)
                if w is None:
                    if k not in Config.__dataclass_fields__:
                        raise TypeError(f"unknown Config field {k!r}")
                    rest[k] = v
                    continue
                if isinstance(w, W.Dropdown) and v not in w.options:
                    raise ValueError(f"{k} must be one of {tuple(w.options)}, got {v!r}")
                if isinstance(w, W.IntSlider) and v > w.max:
                    w.max = int(v)
                w.value = v
        finally:
            self._syncing = False
        if rest:
            self._base = self._base.replace(**rest)
            self._overrides.update(rest)
        self._on_control(None)
        return self

    # ------------------------------------------------------------------ budget
    def _estimate_ui(self, config: Optional[Config] = None) -> Optional[Dict[str, Any]]:
        """check_budget for buttons and control changes: a failure is shown, never raised."""
        try:
            return self.check_budget(config)
        except Exception as e:  # noqa: BLE001 - shown next to the budget control
            self.w_estimate.value = (f"<span style='font-size:12px;color:#c62828'>could not "
                                     f"estimate: {html.escape(type(e).__name__)}: "
                                     f"{html.escape(str(e)[:300])}</span>")
            return None

    def check_budget(self, config: Optional[Config] = None) -> Dict[str, Any]:
        """Estimate one training step of ``config`` (default: the controls) on fake tensors.

        Returns ``{"estimate": Estimate, "peak": bytes, "budget": bytes or None,
        "fits": bool or None}`` and shows the answer next to the budget control.
        """
        cfg = config or self.config
        key = cfg.replace(budget=None)
        if self._estimate_cache is not None and self._estimate_cache[0] == key:
            est = self._estimate_cache[1]
        else:
            est = estimate_config(key)
            self._estimate_cache = (key, est)
        self.last_estimate = est
        budget = cfg.budget
        fits = None if budget is None else est.peak <= budget
        bd = est.breakdown()
        parts = " · ".join(
            f"<span style='color:{CATEGORY_COLORS[c]}'>■</span> {c} {format_bytes(bd[c])}"
            for c in CATEGORIES if bd.get(c))
        if fits is None:
            verdict = ""
        elif fits:
            verdict = (f"<b style='color:#2e7d32'>✔ fits</b> into {format_bytes(budget)} "
                       f"({100 * est.peak / budget:.0f}%)")
        else:
            verdict = (f"<b style='color:#c62828'>✘ would not fit</b> into "
                       f"{format_bytes(budget)} (needs {est.peak / budget:.1f}×)")
        self.w_estimate.value = (
            f"<span style='font-size:12px'>{verdict}{' — ' if verdict else ''}estimated peak "
            f"<b>{format_bytes(est.peak)}</b> in {est.peak_phase} "
            f"<span style='color:#666'>({parts})</span></span>")
        return {"estimate": est, "peak": est.peak, "budget": budget, "fits": fits}

    # ------------------------------------------------------------------ figures
    def _build_figures(self) -> None:
        font = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=12)
        common = dict(template="plotly_white", font=font, hovermode="closest",
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left",
                                  x=0, font=dict(size=11), traceorder="normal"))
        self.fig_breakdown = go.FigureWidget(
            data=[go.Bar(name=c, x=[], y=[], marker_color=CATEGORY_COLORS[c],
                         marker_line_width=0, customdata=[],
                         hovertemplate=f"%{{customdata}}<br>{c}: %{{y:.2f}} MiB<extra></extra>")
                  for c in CATEGORIES],
            layout=go.Layout(
                **common, barmode="stack", height=380, width=470, bargap=0.35,
                title=dict(text="<b>Memory at the peak</b> · by category", x=0.01, y=0.97,
                           font=dict(size=14)),
                margin=dict(l=60, r=15, t=80, b=70),
                xaxis=dict(title=dict(text="run"), type="category", tickfont=dict(size=10)),
                yaxis=dict(title=dict(text="memory at the peak (MiB)"), rangemode="tozero")))
        self.fig_timeline = go.FigureWidget(
            data=[go.Scatter(name=c, x=[], y=[], mode="lines", stackgroup="live",
                             line=dict(width=0.6, color=CATEGORY_COLORS[c]),
                             fillcolor=CATEGORY_COLORS[c], customdata=[],
                             hovertemplate=f"event %{{x}} · %{{customdata}}<br>{c}: "
                                           f"%{{y:.2f}} MiB<extra></extra>")
                  for c in CATEGORIES],
            layout=go.Layout(
                **common, height=380, width=620,
                title=dict(text="<b>Live bytes through one training step</b>", x=0.01, y=0.97,
                           font=dict(size=14)),
                margin=dict(l=60, r=15, t=80, b=70),
                xaxis=dict(title=dict(text="allocation / free event in the step (events)"),
                           rangemode="tozero"),
                yaxis=dict(title=dict(text="live memory (MiB)"), rangemode="tozero")))
        curves = make_subplots(rows=1, cols=2, horizontal_spacing=0.09,
                               subplot_titles=("<b>training loss</b>", "<b>evaluation</b>"))
        self.fig_curves = go.FigureWidget(curves)
        self.fig_curves.update_layout(**common, height=330, width=1100,
                                      margin=dict(l=60, r=15, t=70, b=55))
        self.fig_curves.update_layout(legend=dict(y=1.12))
        self.fig_curves.update_xaxes(title_text="step")
        self.fig_curves.update_yaxes(title_text="loss", row=1, col=1)
        self.fig_curves.update_yaxes(title_text="metric", row=1, col=2, rangemode="tozero")
        self._curve_traces: Dict[Tuple[int, str], int] = {}   # (run index, series) -> trace

    def _ensure_curve_traces(self, run: _Run) -> None:
        """Add the loss / metric traces of a run (outside batch_update: adding traces)."""
        series = ["loss"] + list(TASK_METRICS[run.config.task])
        new = []
        for s in series:
            if (run.index, s) in self._curve_traces:
                continue
            first = s == "loss"
            if first:
                tr = go.Scatter(x=[], y=[], mode="lines", name=f"{run.name} loss",
                                legendgroup=run.name, line=dict(color=run.color, width=2),
                                hovertemplate=f"{run.name} step %{{x}}<br>loss %{{y:.3f}}"
                                              "<extra></extra>")
                loc = dict(row=1, col=1)
            else:
                label, dash, _ = METRIC_STYLE[s]
                tr = go.Scatter(x=[], y=[], mode="lines+markers", name=f"{run.name} {label}",
                                legendgroup=run.name,
                                line=dict(color=run.color, width=2, dash=dash),
                                marker=dict(size=6, symbol="circle" if dash == "solid"
                                            else "diamond"),
                                hovertemplate=f"{run.name} step %{{x}}<br>{label} %{{y:.3f}}"
                                              "<extra></extra>")
                loc = dict(row=1, col=2)
            new.append((s, tr, loc))
        for s, tr, loc in new:
            self.fig_curves.add_trace(tr, **loc)
            self._curve_traces[(run.index, s)] = len(self.fig_curves.data) - 1

    def _build_layout(self) -> None:
        header = W.HTML(
            "<div style='display:flex;align-items:baseline;gap:10px'>"
            "<span style='font-size:17px;font-weight:600'>memlab · MemoryLab</span>"
            "<span style='color:#666;font-size:12px'>train a real model, watch where the "
            "memory goes</span>"
            "<span style='margin-left:auto;font-size:12px'>" + " ".join(
                f"<span style='color:{CATEGORY_COLORS[c]}'>■</span>&nbsp;{c}"
                for c in CATEGORIES) + "</span></div>")
        row = dict(align_items="center", flex_flow="row wrap", grid_gap="4px 14px")
        size_row = W.HBox([self.w_task, self.w_model, self.w_steps], layout=W.Layout(**row))
        slider_row = W.HBox([self.w_batch, self.w_depth, self.w_width], layout=W.Layout(**row))
        strat_row = W.HBox([self.w_memory, self.w_optimizer, self.w_loss],
                           layout=W.Layout(**row))
        budget_row = W.HBox([self.w_budget_on, self.w_budget, self.w_budget_unit,
                             self.w_estimate_btn, self.w_estimate], layout=W.Layout(**row))
        run_row = W.HBox([self.w_run, self.w_stop, self.w_clear, self.w_progress,
                          self.w_status], layout=W.Layout(**row))
        controls = W.VBox([size_row, slider_row, strat_row, self.w_hint, budget_row, run_row],
                          layout=W.Layout(border="1px solid #e0e0e0", padding="8px 10px",
                                          grid_gap="6px"))
        figs = W.HBox([self.fig_breakdown, self.fig_timeline],
                      layout=W.Layout(flex_flow="row wrap", grid_gap="8px"))
        self.table = W.HTML()
        self.widget = W.VBox([header, controls, figs, self.fig_curves, self.table, self.w_error],
                             layout=W.Layout(grid_gap="8px", width="100%"))
        # CSS classes: stable handles for styling and for browser tests
        for w, name in ((self.widget, "memlab-lab"), (self.w_batch, "memlab-batch"),
                        (self.w_depth, "memlab-depth"), (self.w_run, "memlab-run"),
                        (self.w_stop, "memlab-stop"), (self.w_status, "memlab-status"),
                        (self.fig_breakdown, "memlab-breakdown"),
                        (self.fig_timeline, "memlab-timeline"),
                        (self.fig_curves, "memlab-curves"), (self.table, "memlab-table")):
            w.add_class(name)

    # ------------------------------------------------------------------ drawing
    def _draw(self, force: bool = False) -> None:
        """Redraw figures from the runs; at most MAX_REDRAWS_PER_S unless forced."""
        with self._lock:
            now = time.perf_counter()
            if not force and now - self._last_draw < 1.0 / MAX_REDRAWS_PER_S:
                return
            self._last_draw = now
            runs = list(self._runs)
            for run in runs:
                self._ensure_curve_traces(run)
            self._draw_breakdown(runs)
            self._draw_timeline(runs)
            self._draw_curves(runs)
            self._draw_table(runs)
            self._draw_status(runs)

    def _draw_breakdown(self, runs: List[_Run]) -> None:
        xs, labels, cols = [], [], {c: [] for c in CATEGORIES}
        notes = []
        for run in runs:
            rec = run.peak_record
            if rec is None:
                continue
            x = f"{run.name}<br>{_short_label(run.config)}"
            xs.append(x)
            labels.append(f"{run.name} {run.config.label}")
            for c in CATEGORIES:
                cols[c].append(_mib(rec.breakdown.get(c, 0)))
            notes.append(dict(x=len(xs) - 1, y=_mib(rec.peak), text=f"{_mib(rec.peak):.2f}",
                              showarrow=False, yanchor="bottom", font=dict(size=11)))
        with self.fig_breakdown.batch_update():
            for tr in self.fig_breakdown.data:
                tr.x = xs
                tr.y = cols[tr.name]
                tr.customdata = labels
            self.fig_breakdown.layout.annotations = notes
            self.fig_breakdown.layout.bargap = _bargap(len(xs))
            self._budget_shapes(self.fig_breakdown)

    def _budget_shapes(self, fig) -> None:
        """Replace the dashed budget line of ``fig`` (call inside batch_update). A budget more
        than ``FAR_LIMIT`` times the tallest stack would flatten the bars or areas under it: it
        is named at the end of the title instead of drawn."""
        shapes = [sh for sh in fig.layout.shapes if sh.name != "budget"]
        title = (fig.layout.title.text or "").split(_BUDGET_NOTE)[0]
        budget = self._budget_bytes()
        stacks = [sum(v) for v in zip(*(tr.y or [] for tr in fig.data))]
        tallest = max(stacks, default=0.0)
        if budget is not None and tallest > 0 and _mib(budget) > FAR_LIMIT * tallest:
            title += f"{_BUDGET_NOTE}{_mib(budget):.4g} MiB, off the scale</span>"
        elif budget is not None:
            shapes.append(dict(type="line", xref="paper", x0=0, x1=1, yref="y",
                               y0=_mib(budget), y1=_mib(budget), name="budget",
                               line=dict(color="#c62828", width=1.5, dash="dash")))
        fig.layout.shapes = shapes
        fig.layout.title.text = title

    def _draw_budget_lines(self) -> None:
        with self._lock:
            for fig in (self.fig_breakdown, self.fig_timeline):
                with fig.batch_update():
                    self._budget_shapes(fig)
            with self.fig_timeline.batch_update():
                self._timeline_range()

    def _timeline_range(self) -> None:
        """The timeline's y range from its stacks and the budget line (inside batch_update)."""
        ys = {tr.name: list(tr.y or []) for tr in self.fig_timeline.data}
        drawn = [sh.y0 for sh in self.fig_timeline.layout.shapes if sh.name == "budget"]
        self.fig_timeline.layout.yaxis.range = _timeline_top(ys, max(drawn, default=None))

    def _draw_timeline(self, runs: List[_Run]) -> None:
        run = next((r for r in reversed(runs) if r.last_metered is not None), None)
        fig = self.fig_timeline
        with fig.batch_update():
            if run is None:
                for tr in fig.data:
                    tr.x, tr.y, tr.customdata = [], [], []
                fig.layout.shapes = []
                fig.layout.annotations = []
                fig.layout.yaxis.range = None
                fig.layout.title.text = "<b>Live bytes through one training step</b>"
                self._budget_shapes(fig)
                return
            rec = run.last_metered
            ys, shapes, notes = _timeline_parts(rec.timeline)
            for tr in fig.data:
                tr.x = ys["index"]
                tr.y = ys[tr.name]
                tr.customdata = ys["op"]
            fig.layout.shapes = shapes
            fig.layout.annotations = notes
            fig.layout.title.text = (f"<b>Live bytes through one training step</b> · "
                                     f"{run.name}, step {rec.step}")
            self._budget_shapes(fig)
            self._timeline_range()

    def _draw_curves(self, runs: List[_Run]) -> None:
        fig = self.fig_curves
        with fig.batch_update():
            for run in runs:
                recs = [r for r in run.records if r.step > 0 and math.isfinite(r.loss)]
                tr = fig.data[self._curve_traces[(run.index, "loss")]]
                tr.x = [r.step for r in recs]
                tr.y = [r.loss for r in recs]
                evals = [r for r in run.records if r.metrics]
                for s in TASK_METRICS[run.config.task]:
                    tr = fig.data[self._curve_traces[(run.index, s)]]
                    pts = [(r.step, r.metrics[s]) for r in evals if s in r.metrics]
                    tr.x = [p[0] for p in pts]
                    tr.y = [p[1] for p in pts]
            tasks = {r.config.task for r in runs} or {self.w_task.value}
            names = []
            for t in TASKS:
                if t in tasks:
                    for m in TASK_METRICS[t]:
                        label, _, up = METRIC_STYLE[m]
                        names.append(f"{label} {'↑' if up else '↓'}")
            fig.layout.yaxis2.title.text = ", ".join(names)
            last = max((r.steps_done for r in runs), default=0)
            for ax in (fig.layout.xaxis, fig.layout.xaxis2):   # whole steps on short runs
                ax.dtick = 1 if 0 < last <= 12 else None

    def _draw_table(self, runs: List[_Run]) -> None:
        if not runs:
            self.table.value = ("<div style='color:#777;font-size:12px;padding:4px'>No runs "
                                "yet: pick a configuration and press <b>Run</b>.</div>")
            return
        head = ["", "run", "configuration", "status", "steps", "peak", "step time",
                "final loss", "final metric"]
        th = "".join(f"<th style='text-align:left;padding:3px 10px;border-bottom:1px solid "
                     f"#ccc'>{h}</th>" for h in head)
        rows = []
        for run in runs:
            rec = run.peak_record
            peak = format_bytes(rec.peak) if rec is not None else "–"
            st = run.step_seconds
            loss = next((r.loss for r in reversed(run.records)
                         if r.step > 0 and math.isfinite(r.loss)), None)
            status = run.status
            color = {"error": "#c62828", "over budget": "#c62828", "stopped": "#e67300",
                     "running": "#1565c0", "done": "#2e7d32"}.get(status, "#555")
            cells = [f"<span style='color:{run.color};font-size:16px'>●</span>", run.name,
                     f"<code>{html.escape(run.config.label)}</code>",
                     f"<span style='color:{color}'>{html.escape(status)}</span>",
                     f"{run.steps_done}/{run.config.steps}", peak,
                     f"{st * 1000:.0f} ms" if st is not None else "–",
                     f"{loss:.3f}" if loss is not None else "–",
                     _fmt_metric(run.final_metrics, run.config.task)]
            rows.append("<tr>" + "".join(f"<td style='padding:2px 10px'>{c}</td>" for c in cells)
                        + "</tr>")
        self.table.value = (f"<table style='border-collapse:collapse;font-size:12px'>"
                            f"<thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>")

    def _draw_status(self, runs: List[_Run]) -> None:
        running = self._experiment is not None
        self.w_run.disabled = running
        self.w_stop.disabled = not running
        self.w_clear.disabled = running
        if not runs:
            self.w_status.value = "<span style='color:#666'>ready</span>"
            self.w_progress.value = 0
            return
        run = runs[-1]
        self.w_progress.max = max(1, run.config.steps)
        self.w_progress.value = min(run.steps_done, run.config.steps)
        self.w_progress.bar_style = {"done": "success", "stopped": "warning",
                                     "error": "danger", "over budget": "danger"}.get(
            run.status, "info")
        last = next((r for r in reversed(run.records) if r.step > 0), None)
        bits = [f"<b>{run.name}</b> {html.escape(run.status)}",
                f"step {run.steps_done}/{run.config.steps}"]
        if last is not None and math.isfinite(last.loss):
            bits.append(f"loss {last.loss:.3f}")
        rec = run.peak_record
        if rec is not None:
            bits.append(f"peak {format_bytes(rec.peak)}")
        if run.step_seconds is not None:
            bits.append(f"{run.step_seconds * 1000:.0f} ms/step")
        if run.final_metrics:
            bits.append(_fmt_metric(run.final_metrics, run.config.task))
        text = " · ".join(bits)
        if run.error is not None:
            msg = html.escape(f"{type(run.error).__name__}: {run.error}")
            text += f"<br><span style='color:#c62828'>{msg}</span>"
        self.w_status.value = f"<span style='font-size:12px'>{text}</span>"

    # ------------------------------------------------------------------ running
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def records(self) -> List[Record]:
        """Records of the latest run."""
        return self._runs[-1].records if self._runs else []

    def _safe(self, fn, *args):
        """Run a button callback; show (not lose) any error."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - shown to the user
            self._show_error(e)
            return None

    def _show_error(self, exc: BaseException) -> None:
        self.last_error = exc
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.w_error.outputs = ()
        self.w_error.append_stderr(text)
        self.w_status.value = (f"<span style='color:#c62828;font-size:12px'><b>error</b>: "
                               f"{html.escape(type(exc).__name__)}: {html.escape(str(exc))}"
                               f"</span>")

    def _start(self, **overrides: Any) -> _Run:
        if self.running:
            raise RuntimeError("a run is in progress: press Stop (or lab.stop()) first")
        self.refresh_strategies()
        if overrides:
            self.set(**overrides)
        cfg = self.config
        self.w_error.outputs = ()
        self.last_error = None
        cfg.validate()
        if cfg.budget is not None:
            self._estimate_ui(cfg)
        exp = Experiment(cfg)
        run = _Run(index=(self._runs[-1].index + 1) if self._runs else 1, config=cfg)
        with self._lock:
            self._runs.append(run)
            self.runs.append((cfg, run.records))
            self._ensure_curve_traces(run)
        self._experiment = exp
        self._thread = threading.Thread(target=self._worker, args=(exp, run),
                                        name=f"memlab-run-{run.index}", daemon=True)
        run.status = "running"
        self._thread.start()
        self._draw(force=True)
        return run

    def _worker(self, exp: Experiment, run: _Run) -> None:
        try:
            for rec in exp.run():
                run.records.append(rec)
                self._draw()
            run.status = "stopped" if run.steps_done < run.config.steps else "done"
        except MemoryBudgetExceeded as e:
            run.status, run.error = "over budget", e
            self.last_error = e
        except BaseException as e:  # noqa: BLE001 - shown in the widget, re-raised by run()
            run.status, run.error = "error", e
            self._show_error(e)
        finally:
            run.ended = time.perf_counter()
            self._experiment = None
            try:
                self._draw(force=True)
            except Exception as e:  # noqa: BLE001
                self._show_error(e)
            # buttons: the thread is still alive here, so set them explicitly
            self.w_run.disabled = False
            self.w_stop.disabled = True
            self.w_clear.disabled = False

    def run(self, block: bool = True, **overrides: Any) -> List[Record]:
        """Train the configuration the controls describe (after applying ``overrides``).

        ``block=True`` waits for the end (Ctrl+C / interrupt stops the run cleanly) and returns
        the records; an error other than ``MemoryBudgetExceeded`` is re-raised after it is shown.
        ``block=False`` returns at once with the (growing) record list of the new run.
        """
        run = self._start(**overrides)
        if not block:
            return run.records
        try:
            self.wait()
        except KeyboardInterrupt:
            self.stop()
            self.wait()
        if run.error is not None and not isinstance(run.error, MemoryBudgetExceeded):
            raise run.error
        return run.records

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the current run to end; True when it has ended."""
        t = self._thread
        if t is None:
            return True
        deadline = None if timeout is None else time.perf_counter() + timeout
        while t.is_alive():
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                return False
            t.join(0.1 if left is None else min(0.1, left))
        return True

    def stop(self) -> None:
        """Stop the current run after its current step (no-op when idle)."""
        exp = self._experiment
        if exp is not None:
            exp.stop()
            if self._runs:
                self._runs[-1].stop_requested_at = time.perf_counter()
            self.w_status.value = "<span style='font-size:12px'>stopping after this step…</span>"

    def clear(self) -> None:
        """Forget all runs and empty the figures."""
        if self.running:
            raise RuntimeError("a run is in progress: stop it before clearing")
        with self._lock:
            self._runs.clear()
            self.runs.clear()
            self.fig_curves.data = ()
            self._curve_traces.clear()
            self.w_error.outputs = ()
            self.last_error = None
        self._draw(force=True)

    # ------------------------------------------------------------------ display
    def show(self) -> None:
        """Display the dashboard in the notebook."""
        from IPython.display import display
        self.refresh_strategies()
        display(self.widget)

    def _ipython_display_(self) -> None:
        self.show()

    def __repr__(self) -> str:
        return f"MemoryLab(config={self.config!r}, runs={len(self.runs)})"


# ============================================================================ notebook helpers
def _random_batch(cfg: Config, batch_size: int, frames: int, num_classes: Optional[int] = None):
    """A batch of the shapes ``cfg`` trains on, filled with noise (memory does not care)."""
    import torch
    feats = torch.randn(batch_size, frames, 80, device=cfg.device)          # (B, T, F)
    if cfg.task == "speaker":
        labels = torch.randint(0, num_classes or cfg.num_speakers, (batch_size,),
                               device=cfg.device)                           # (B,)
        return (feats, labels)
    U = max(2, frames // 25)
    targets = torch.randint(1, cfg.vocab_size, (batch_size, U), device=cfg.device)  # (B, U)
    return (feats, torch.full((batch_size,), frames, dtype=torch.long, device=cfg.device),
            targets, torch.full((batch_size,), U, dtype=torch.long, device=cfg.device))


def run_summary(name: str, records: List[Record], category: Optional[str] = None) -> str:
    """One line for a finished run: its peak (metered steps), ``category``'s bytes at that peak,
    the final loss and the metrics of the last evaluation (first -> last when it evaluated more
    than once), e.g. for printing the runs of ``MemoryLab.run(block=True)`` side by side."""
    if not records:
        raise ValueError(f"records of run {name!r} is empty: the run did not take a step")
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    parts = [f"{name:17s}"]
    metered = [r for r in records if r.metered]
    if metered:
        peak = max(metered, key=lambda r: r.peak)
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


def measure_step(config: Config, frames: Optional[int] = None, steps: int = 2,
                 num_classes: Optional[int] = None):
    """Train ``steps`` steps of ``config``'s model on random input; meter the last one.

    Returns the ``MemoryMeter`` (``peak``, ``breakdown()``, ``timeline``...). With ``steps=2``
    the optimizer state already exists when the metered step starts: the steady state of
    training. ``frames`` defaults to ``config.seconds * 100`` (10 ms frames).
    """
    import torch
    from memlab.lab import build_model, build_optimizer
    from memlab.memory import MemoryMeter

    if not isinstance(config, Config):
        raise TypeError(f"config must be a memlab.lab.Config, got {type(config).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    cfg = config.validate()
    T = frames or int(round(cfg.seconds * 100))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes=num_classes).to(cfg.device)
    opt = build_optimizer(cfg, model)
    batch = _random_batch(cfg, cfg.batch_size, T, num_classes)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(*batch)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        opt.step()

    for _ in range(steps - 1):
        step()
    with MemoryMeter(cfg.device, model=model, optimizer=opt, inputs=batch,
                     budget=cfg.budget) as meter:
        step()
    return meter


def sweep(config: Config, name: str, values, *, frames: Optional[int] = None,
          fake: bool = False, num_classes: Optional[int] = None) -> List[Dict[str, Any]]:
    """Memory of one training step while one Config field takes each of ``values``.

    ``fake=False`` measures real tensors with ``measure_step`` (steady state, step 2);
    ``fake=True`` uses ``memlab.lab.estimate_config`` (fake tensors: any size, no memory).
    One row per value: ``{name: value, "label", "peak", <category>: bytes...}``.
    """
    if name not in Config.__dataclass_fields__:
        raise ValueError(f"name must be a Config field, got {name!r}")
    rows = []
    for v in values:
        cfg = config.replace(**{name: v})
        if fake:
            est = estimate_config(cfg, frames=frames, steps=2, num_classes=num_classes)
            peak, bd = est.peak, est.breakdown()
        else:
            m = measure_step(cfg, frames=frames, num_classes=num_classes)
            peak, bd = m.peak, m.breakdown()
        label = "x".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
        rows.append({name: v, "label": label, "peak": peak, **bd})
    return rows


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
                      margin=dict(l=60, r=20, t=80, b=60), bargap=_bargap(len(rows)))
    tallest = max((sum(r.get(c, 0) for c in CATEGORIES) / scale for r in rows), default=0.0)
    if limit is not None and tallest > 0 and limit > FAR_LIMIT * tallest:
        fig.update_layout(title_subtitle=dict(
            text=f"{limit_label or 'limit'}: {limit:g} {unit}, {limit / tallest:.0f}× the "
                 "tallest bar (off this scale)", font=dict(color="#c62828", size=12)),
            margin_t=100)
    elif limit is not None:
        reference_line(fig, limit, limit_label, color="#c62828", dash="dash")
    return fig
