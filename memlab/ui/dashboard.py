"""MemoryLab: a JupyterLab dashboard that trains a real model and shows where the memory goes.

    from memlab.widgets import MemoryLab       # or: from memlab.ui import MemoryLab
    lab = MemoryLab(task="speaker", batch_size=16)
    lab.show()                       # controls + live plotly figures
    records = lab.run(block=True)    # the same run from code (headless too); figures update
    lab = MemoryLab(scenario="deep-speaker")    # a preset of memlab.scenarios
    lab.run(); lab.run(memory="reversible")     # the table: "4.8x less than vanilla"
    lab.plan("11GiB")                # memlab.planner: which techniques make it fit

What it shows (one colour per memory category in every figure, ``memlab.ui.figures``):

* ``fig_breakdown`` -- stacked bars: bytes by category at each run's peak (MiB), runs side by side
* ``fig_timeline``  -- stacked areas: live bytes through the latest metered step, event by event,
  with the forward / backward / optimizer phases shaded
* ``fig_curves``    -- training loss and the task's metrics per step
* ``table``         -- one row per run: configuration, peak, step time, final metric, and
  under a scenario the ratio of its baseline run's peak to this run's ("4.8x less than vanilla")

Scenarios (``memlab.scenarios``): the picker sets every control to the scenario's
configuration; under it, a line gives ``scenarios.headline`` for the current choices, the
saving at the scenario's full-size twin (estimated on fake tensors in the background: tens of
seconds at paper scale, cached per choices). The planner box runs ``memlab.planner.plan`` on the
current configuration in the background and shows ``format_plan``'s table.

The technique controls are generated: one dropdown per registered kind
(``memlab.techniques.kinds()``), listing ``techniques.names(kind, task)`` and hidden when no
technique of the kind applies to the task. A kind or technique registered later appears on the
next ``refresh_strategies()`` / Run, without a change to this file.

Training runs in a background thread (ipywidgets 8 sends widget updates from any thread), figure
updates are throttled to ``MAX_REDRAWS_PER_S`` and batched with ``FigureWidget.batch_update``.
The full-size and planner estimates run in background threads too, one at a time and never beside
a run (``_job_lock``): two meters at once would share the global optimizer-step hooks (and the
CPU, so a run's step times would be wrong); a run started meanwhile says "waiting".
Stop sets ``Experiment.stop()``; the step loop checks it after every step. An error in a run is
shown in the dashboard (status line + traceback); ``run(block=True)`` also re-raises it, except
``MemoryBudgetExceeded``, which is an outcome, not a bug: the run is marked "over budget".

References: ipywidgets 8 user guide ("Asynchronous widgets", "Output widgets"); plotly
FigureWidget (``batch_update``, plotly >= 6 renders it through anywidget).
"""

from __future__ import annotations

import html
import math
import statistics
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import ipywidgets as W
import plotly.graph_objects as go

from memlab import planner, tasks
from memlab.lab import Config, Experiment, Record, estimate_config, peak_record
from memlab.memory import CATEGORIES, Estimate, MemoryBudgetExceeded, format_bytes
from memlab.report import format_metrics, last_loss, last_metrics
from memlab.ui import figures as F
from memlab.ui.controls import Controls
from memlab.ui.figures import CATEGORY_COLORS, RUN_COLORS
from memlab.ui.scenario_panel import (FULL_SIZE_WAIT, ScenarioPanel, baseline_spec,  # noqa: F401
                                      format_ratio, versus_baseline)

MAX_REDRAWS_PER_S = 10
_STATUS_COLORS = {"error": "#c62828", "over budget": "#c62828", "stopped": "#e67300",
                  "running": "#1565c0", "done": "#2e7d32", "waiting": "#777"}


@dataclass
class _Run:
    """Bookkeeping for one run (``MemoryLab.runs`` holds ``(config, records)`` pairs)."""
    index: int
    config: Config
    records: List[Record] = field(default_factory=list)
    status: str = "starting"      # waiting | running | done | stopped | over budget | error
    scenario: Optional[str] = None    # the scenario picked when it started
    error: Optional[BaseException] = None
    started: float = field(default_factory=time.perf_counter)
    ended: Optional[float] = None
    stop_requested_at: Optional[float] = None

    color = property(lambda self: RUN_COLORS[(self.index - 1) % len(RUN_COLORS)])
    name = property(lambda self: f"#{self.index}")
    peak_record = property(lambda self: peak_record(self.records))
    steps_done = property(lambda self: max((r.step for r in self.records), default=0))
    metrics = property(lambda self: F.curve_metrics(self.config.task))

    @property
    def last_metered(self) -> Optional[Record]:
        return next((r for r in reversed(self.records) if r.metered and r.timeline), None)

    @property
    def step_seconds(self) -> Optional[float]:
        """Median wall time of un-metered steps (step 1 is warm-up); metered ones if none."""
        plain = [r.seconds for r in self.records if r.step > 1 and not r.metered]
        vals = plain or [r.seconds for r in self.records if r.step > 0]
        return statistics.median(vals) if vals else None

    def status_html(self, versus: Optional[str] = None) -> str:
        bits = [f"<b>{self.name}</b> {html.escape(self.status)}",
                f"step {self.steps_done}/{self.config.steps}"]
        loss, rec, st = last_loss(self.records), self.peak_record, self.step_seconds
        if loss is not None:
            bits.append(f"loss {loss:.3f}")
        if rec is not None:
            bits.append(f"peak {format_bytes(rec.peak)}")
        if st is not None:
            bits.append(f"{st * 1000:.0f} ms/step")
        if last_metrics(self.records):
            bits.append(format_metrics(last_metrics(self.records), self.metrics))
        if versus:
            bits.append(f"<b>{html.escape(versus)}</b>")
        text = " · ".join(bits)
        if self.error is not None:
            msg = html.escape(f"{type(self.error).__name__}: {self.error}")
            text += f"<br><span style='color:#c62828'>{msg}</span>"
        return f"<span style='font-size:12px'>{text}</span>"

    def row_html(self, versus: Optional[str] = None) -> str:
        rec, st, loss = self.peak_record, self.step_seconds, last_loss(self.records)
        cells = [f"<span style='color:{self.color};font-size:16px'>●</span>", self.name,
                 f"<code>{html.escape(self.config.label)}</code>",
                 f"<span style='color:{_STATUS_COLORS.get(self.status, '#555')}'>"
                 f"{html.escape(self.status)}</span>",
                 f"{self.steps_done}/{self.config.steps}",
                 format_bytes(rec.peak) if rec is not None else "–",
                 f"{st * 1000:.0f} ms" if st is not None else "–",
                 f"{loss:.3f}" if loss is not None else "–",
                 format_metrics(last_metrics(self.records), self.metrics)]
        if versus is not None:
            cells.append(html.escape(versus))
        return "<tr>" + "".join(f"<td style='padding:2px 10px'>{c}</td>" for c in cells) + \
            "</tr>"


def _runs_table(runs: List[_Run]) -> str:
    if not runs:
        return ("<div style='color:#777;font-size:12px;padding:4px'>No runs yet: pick a "
                "configuration and press <b>Run</b>.</div>")
    head = ["", "run", "configuration", "status", "steps", "peak", "step time", "final loss",
            "final metric"]
    scenario = any(r.scenario is not None for r in runs)
    if scenario:
        head.append("vs the scenario's baseline")
    th = "".join(f"<th style='text-align:left;padding:3px 10px;border-bottom:1px solid #ccc'>"
                 f"{h}</th>" for h in head)
    rows = "".join(r.row_html((versus_baseline(r, runs) or "-") if scenario else None)
                   for r in runs)
    return (f"<table style='border-collapse:collapse;font-size:12px'><thead><tr>{th}</tr>"
            f"</thead><tbody>{rows}</tbody></table>")


def _estimate_html(est: Estimate, budget: Optional[int]) -> str:
    bd = est.breakdown()
    parts = " · ".join(f"<span style='color:{CATEGORY_COLORS[c]}'>■</span> {c} "
                       f"{format_bytes(bd[c])}" for c in CATEGORIES if bd.get(c))
    if budget is None:
        verdict = ""
    elif est.peak <= budget:
        verdict = (f"<b style='color:#2e7d32'>✔ fits</b> into {format_bytes(budget)} "
                   f"({100 * est.peak / budget:.0f}%) — ")
    else:
        verdict = (f"<b style='color:#c62828'>✘ would not fit</b> into {format_bytes(budget)} "
                   f"(needs {est.peak / budget:.1f}×) — ")
    return (f"<span style='font-size:12px'>{verdict}estimated peak <b>{format_bytes(est.peak)}"
            f"</b> in {est.peak_phase} <span style='color:#666'>({parts})</span></span>")


class MemoryLab(ScenarioPanel):
    """Controls + live figures for ``memlab.lab.Experiment`` runs.

    Args:
        task: a registered task ("speaker", "asr"); default: the scenario's, else "speaker".
        scenario: a name of ``memlab.scenarios.names()`` to start from (None: the task's
            defaults); the picker changes it, so does ``set(scenario=...)``.
        **config_overrides: any ``memlab.lab.Config`` field; those with a control (batch_size,
            depth, width, steps, model, budget and one per technique kind: memory, optimizer,
            loss, ...) set its start value, the rest (seconds, eval_every, lr, ...) apply to
            every run.

    Attributes:
        widget: the dashboard (an ``ipywidgets.VBox``); ``show()`` displays it.
        config: the ``Config`` the controls describe now (read-only view).
        runs: ``[(config, records), ...]``, one pair per run, records growing live.
        kind_controls: ``{kind: Dropdown}``, also reachable as ``w_<kind>`` (``w_optimizer``).
        fig_breakdown, fig_timeline, fig_curves: the plotly ``FigureWidget``s.
        last_error: the exception that ended the latest run, or None.
        full_size_line: the scenario's ``headline`` for the current choices once estimated.
        last_plan, plan_text: the planner's latest ``Plan`` and its ``format_plan`` text.
    """

    def __init__(self, task: Optional[str] = None, scenario: Optional[str] = None,
                 **config_overrides: Any):
        self.runs: List[Tuple[Config, List[Record]]] = []
        self._runs: List[_Run] = []
        self._experiment: Optional[Experiment] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.RLock()
        self._last_draw = 0.0
        self.last_error: Optional[BaseException] = None
        self.last_estimate: Optional[Estimate] = None
        self._estimate_cache: Optional[Tuple[Config, Estimate]] = None
        self._job_lock = threading.Lock()      # one estimate or run at a time
        self._jobs: List[threading.Thread] = []
        self._full_size_lines: Dict[Tuple[Any, ...], str] = {}   # key -> headline
        self._full_size_pending: set = set()
        self.full_size_line: Optional[str] = None
        self.last_plan: Optional[planner.Plan] = None
        self.plan_text: Optional[str] = None
        self.controls = Controls(task, config_overrides, on_change=self._on_change,
                                 scenario=scenario)
        self.kind_controls = self.controls.kind_controls
        self.w_run.on_click(lambda _b: self._safe(self._start))
        self.w_stop.on_click(lambda _b: self.stop())
        self.w_clear.on_click(lambda _b: self._safe(self.clear))
        self.w_estimate_btn.on_click(lambda _b: self._estimate_ui())
        self.w_plan_btn.on_click(lambda _b: self._plan_ui())
        self.fig_breakdown = go.FigureWidget(F.peak_bars_figure())
        self.fig_timeline = go.FigureWidget(F.live_timeline_figure())
        self.fig_curves = go.FigureWidget(F.curves_figure())
        self._curve_traces: Dict[Tuple[int, str], int] = {}   # (run index, series) -> trace
        self._build_layout()
        self._draw(force=True)
        self._update_full_size()

    def __getattr__(self, name: str):
        # the widgets of the control panel: w_batch, w_run, ..., w_<kind> (w_optimizer)
        controls = self.__dict__.get("controls")
        if name.startswith("w_") and controls is not None:
            return getattr(controls, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ controls
    @property
    def config(self) -> Config:
        """The configuration the controls describe (changing a control changes it)."""
        return self.controls.config

    @property
    def scenario(self) -> Optional[str]:
        """The picked scenario's name (None: none)."""
        return self.controls.scenario

    def set(self, **values: Any) -> "MemoryLab":
        """Set controls from code: ``lab.set(batch_size=64, optimizer="adam8bit")``; any kind
        is a keyword. ``budget`` takes bytes (None: off); other Config fields change the base
        configuration. ``scenario`` picks a scenario first (None: none)."""
        self.controls.set(**values)
        return self

    def refresh_strategies(self) -> None:
        """Pick up kinds and techniques registered since the dashboard was built."""
        self.controls.refresh()

    def _on_change(self) -> None:
        if self.w_budget_on.value and not self.running:
            self._estimate_ui()
        elif not self.w_budget_on.value:
            self.w_estimate.value = ""
        self._draw_budget_lines()
        self._update_full_size()

    def _budget_bytes(self) -> Optional[int]:
        return self.controls.budget_bytes()

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
        self.w_estimate.value = _estimate_html(est, cfg.budget)
        fits = None if cfg.budget is None else est.peak <= cfg.budget
        return {"estimate": est, "peak": est.peak, "budget": cfg.budget, "fits": fits}

    # ------------------------------------------------------------------ layout, drawing
    def _build_layout(self) -> None:
        header = W.HTML(
            "<div style='display:flex;align-items:baseline;gap:10px'>"
            "<span style='font-size:17px;font-weight:600'>memlab · MemoryLab</span>"
            "<span style='color:#666;font-size:12px'>train a real model, watch where the "
            "memory goes</span><span style='margin-left:auto;font-size:12px'>" + " ".join(
                f"<span style='color:{CATEGORY_COLORS[c]}'>■</span>&nbsp;{c}"
                for c in CATEGORIES) + "</span></div>")

        figs = W.HBox([self.fig_breakdown, self.fig_timeline],
                      layout=W.Layout(flex_flow="row wrap", grid_gap="8px"))
        self.table = W.HTML()
        self.widget = W.VBox([header, self.controls.panel, figs, self.fig_curves, self.table,
                              self.w_error], layout=W.Layout(grid_gap="8px", width="100%"))
        # CSS classes: stable handles for styling and for browser tests
        for w, name in ((self.widget, "memlab-lab"), (self.fig_breakdown, "memlab-breakdown"),
                        (self.fig_timeline, "memlab-timeline"),
                        (self.fig_curves, "memlab-curves"), (self.table, "memlab-table")):
            w.add_class(name)

    def _ensure_curve_traces(self, run: _Run) -> None:
        """Add the loss / metric traces of a run (outside batch_update: adding traces)."""
        for series, trace, col in F.curve_traces(run.name, run.color, run.metrics):
            if (run.index, series) not in self._curve_traces:
                self.fig_curves.add_trace(trace, row=1, col=col)
                self._curve_traces[(run.index, series)] = len(self.fig_curves.data) - 1

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
            bars = [(f"{r.name}<br>{F.short_label(r.config)}", f"{r.name} {r.config.label}",
                     r.peak_record.breakdown, r.peak_record.peak)
                    for r in runs if r.peak_record is not None]
            with self.fig_breakdown.batch_update():
                F.set_peak_bars(self.fig_breakdown, bars)
                F.set_budget(self.fig_breakdown, self._budget_bytes())
            self._draw_timeline(runs)
            self._draw_curves(runs)
            self.table.value = _runs_table(runs)
            self._draw_status(runs)

    def _draw_budget_lines(self) -> None:
        with self._lock:
            with self.fig_breakdown.batch_update():
                F.set_budget(self.fig_breakdown, self._budget_bytes())
            self._draw_timeline_budget()

    def _draw_timeline_budget(self) -> None:
        with self.fig_timeline.batch_update():
            drawn = F.set_budget(self.fig_timeline, self._budget_bytes())
            F.fit_timeline_range(self.fig_timeline, drawn)

    def _draw_timeline(self, runs: List[_Run]) -> None:
        run = next((r for r in reversed(runs) if r.last_metered is not None), None)
        rec = run.last_metered if run is not None else None
        with self.fig_timeline.batch_update():
            F.set_timeline(self.fig_timeline, rec.timeline if rec else None,
                           detail=f"{run.name}, step {rec.step}" if rec else "")
        self._draw_timeline_budget()

    def _draw_curves(self, runs: List[_Run]) -> None:
        fig = self.fig_curves
        with fig.batch_update():
            for run in runs:
                recs = [r for r in run.records if r.step > 0 and math.isfinite(r.loss)]
                tr = fig.data[self._curve_traces[(run.index, "loss")]]
                tr.x, tr.y = [r.step for r in recs], [r.loss for r in recs]
                for m in run.metrics:
                    pts = [(r.step, r.metrics[m]) for r in run.records if r.metrics
                           and m in r.metrics]
                    tr = fig.data[self._curve_traces[(run.index, m)]]
                    tr.x, tr.y = [p[0] for p in pts], [p[1] for p in pts]
            shown = {r.config.task for r in runs} or {self.w_task.value}
            metrics = [m for t in tasks.names() if t in shown for m in F.curve_metrics(t)]
            F.set_curve_axes(fig, metrics, max((r.steps_done for r in runs), default=0))

    def _draw_status(self, runs: List[_Run]) -> None:
        running = self._experiment is not None
        self.w_run.disabled, self.w_stop.disabled, self.w_clear.disabled = \
            running, not running, running
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
        self.w_status.value = run.status_html(versus_baseline(run, runs))

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
        cfg = self.config.validate()
        self.w_error.outputs = ()
        self.last_error = None
        if cfg.budget is not None:
            self._estimate_ui(cfg)
        exp = Experiment(cfg)
        run = _Run(index=(self._runs[-1].index + 1) if self._runs else 1, config=cfg,
                   scenario=self.controls.scenario)
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
        locked = False
        try:
            locked = self._job_lock.acquire(blocking=False)
            if not locked:                 # a full-size or planner estimate is running
                run.status = "waiting"
                self._draw(force=True)
                self._job_lock.acquire()
                locked, run.status = True, "running"
            for rec in ([] if exp.stopped else exp.run()):    # stopped while waiting: none
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
            if locked:
                self._job_lock.release()
            run.ended = time.perf_counter()
            self._experiment = None
            try:
                self._draw(force=True)
            except Exception as e:  # noqa: BLE001
                self._show_error(e)
            # buttons: the thread is still alive here, so set them explicitly
            self.w_run.disabled, self.w_stop.disabled, self.w_clear.disabled = False, True, False

    def run(self, block: bool = True, snapshot: Optional[bool] = None,
            **overrides: Any) -> List[Record]:
        """Train the configuration the controls describe (after applying ``overrides``).

        ``block=True`` waits for the end (Ctrl+C / interrupt stops the run cleanly) and returns
        the records; an error other than ``MemoryBudgetExceeded`` is re-raised after it is shown.
        ``block=False`` returns at once with the (growing) record list of the new run.
        ``snapshot``: after a blocking run, also leave static copies of the figures in the cell
        output (``memlab.plots.snapshot``), for exports and renderers without widgets (nbconvert
        HTML, GitHub); default: when ``MEMLAB_SNAPSHOT=1`` (``tools/build_tutorials.py``) —
        off in a live JupyterLab, where the live figures are right above.
        """
        run = self._start(**overrides)
        if not block:
            return run.records
        try:
            self.wait()
        except KeyboardInterrupt:
            self.stop()
            self.wait()
        if snapshot is None:
            snapshot = os.environ.get("MEMLAB_SNAPSHOT", "") not in ("", "0")
        if snapshot:
            from memlab.plots import snapshot as _snapshot
            _snapshot(self)
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
