"""The dashboard's scenario panel: the ratio of a scenario's baseline run to each run, the
full-size line and the planner box, estimated in background threads that take turns with the
runs (``MemoryLab`` mixes ``ScenarioPanel`` in; see memlab/ui/dashboard.py's docstring)."""

from __future__ import annotations

import html
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from memlab import fast_mode, planner, scenarios
from memlab import techniques as tech
from memlab.lab import Config
from memlab.memory import format_bytes
from memlab.ui.controls import _error_html

FULL_SIZE_WAIT = "estimating at full size..."
_AFTER_RUN = " (after the current run)"
# Config fields that must agree for two runs' peaks to be a technique's ratio
_SIZE_FIELDS = ("task", "model", "blocks", "depth", "width", "embed_dim", "batch_size",
                "seconds", "vocab_size", "num_speakers", "adapt_speaker", "init_from", "device")


def format_ratio(baseline_peak: int, peak: int, label: str) -> str:
    """``baseline_peak / peak`` as the dashboard says it: "4.8x less than vanilla" (two decimals
    below 2x; "1.3x more than vanilla" when the run needs more)."""
    r = baseline_peak / peak
    times = r if r >= 1 else 1 / r
    text = f"{times:.1f}x" if times >= 2 else f"{times:.2f}x"
    return f"{text} {'less' if r >= 1 else 'more'} than {label}"


def _is_baseline(cfg: Config, s: scenarios.Scenario) -> bool:
    return all(cfg.choice(k) == v for k, v in s.baseline.items())


def _sizes(cfg: Config) -> Tuple[Any, ...]:
    return tuple(getattr(cfg, f) for f in _SIZE_FIELDS)


def baseline_spec(s: scenarios.Scenario, cfg: Optional[Config] = None) -> Dict[str, str]:
    """The baseline choices worth naming: the kinds the scenario compares, and those where
    ``cfg`` differs from the baseline (all of them when that leaves none)."""
    spec = {k: v for k, v in s.baseline.items()
            if len(s.comparison.get(k, ())) > 1 or (cfg is not None and cfg.choice(k) != v)}
    return spec or dict(s.baseline)


def versus_baseline(run: Any, runs: List[Any]) -> Optional[str]:
    """How ``run``'s peak (a dashboard ``_Run``) compares with its scenario's baseline run among ``runs``: the ratio of
    the baseline's measured peak to this run's, or what to run first (None: no scenario)."""
    if run.scenario is None:
        return None
    s = scenarios.get(run.scenario)
    if _is_baseline(run.config, s):
        return "baseline"
    spec = baseline_spec(s, run.config)
    same = [r for r in runs if r.scenario == run.scenario and _is_baseline(r.config, s)]
    base = [r for r in same if _sizes(r.config) == _sizes(run.config)]
    measured = [r for r in base if r.peak_record is not None]
    what = ", ".join(f"{k}={v}" for k, v in spec.items())
    if not base:
        where = " at these sizes" if same else ""
        return f"run the baseline ({what}){where} to compare"
    if not measured:
        return "waiting for the baseline's peak"
    if run.peak_record is None:
        return "measuring..." if run.status in ("running", "waiting", "starting") else "-"
    return format_ratio(measured[-1].peak_record.peak, run.peak_record.peak,
                        " + ".join(spec.values()))


def _pre(text: str) -> str:
    """Monospace text (the planner's table) as HTML."""
    return (f"<pre style='font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px;"
            f"margin:2px 0;line-height:1.35'>{html.escape(text)}</pre>")


def _full_size_html(line: str) -> str:
    return f"<span style='font-size:12px;color:#333'>{html.escape(line)}</span>"


class ScenarioPanel:
    """MemoryLab's background estimates (full size, planner). Needs ``self.controls``,
    ``self.config``, ``self.running``, ``self._lock``, ``self._job_lock``, ``self._jobs``,
    ``self._full_size_lines``, ``self._full_size_pending`` and the ``w_full_size``, ``w_fit``
    and ``w_plan`` widgets."""

    # ------------------------------------------------------------------ background estimates
    def _background(self, name: str, fn) -> threading.Thread:
        """Run ``fn`` in a daemon thread, one job at a time and never beside a run."""
        def work():
            with self._job_lock:
                fn()
        t = threading.Thread(target=work, name=f"memlab-{name}", daemon=True)
        with self._lock:
            self._jobs = [j for j in self._jobs if j.is_alive()] + [t]
        t.start()
        return t

    def wait_estimates(self, timeout: Optional[float] = None) -> bool:
        """Wait for the background estimates (full size, planner); True when all have ended."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            with self._lock:
                alive = [j for j in self._jobs if j.is_alive()]
            if not alive:
                return True
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                return False
            alive[0].join(0.1 if left is None else min(0.1, left))

    def _full_size_key(self) -> Optional[Tuple[Any, ...]]:
        """(scenario, the choices its full-size twin depends on, fast mode); None: none."""
        name = self.controls.scenario
        if name is None:
            return None
        s, cfg = scenarios.get(name), self.config
        choices = {k: cfg.choice(k) for k in tech.kinds() if tech.applies(k, cfg.task) and (
            k in s.comparison or k in s.baseline or cfg.choice(k) != tech.default(k))}
        return name, tuple(sorted(choices.items())), fast_mode()

    def _update_full_size(self) -> None:
        """The scenario's ``headline`` at full size for the current choices: from the cache,
        else estimated in the background, "estimating at full size..." meanwhile."""
        key = self._full_size_key()
        self.full_size_line = self._full_size_lines.get(key) if key else None
        if key is None:
            self.w_full_size.value = ""
        elif self.full_size_line is not None:
            self.w_full_size.value = _full_size_html(self.full_size_line)
        else:
            self.w_full_size.value = (f"<span style='font-size:12px;color:#777'>"
                                      f"{FULL_SIZE_WAIT}{_AFTER_RUN if self.running else ''}"
                                      f"</span>")
            if key not in self._full_size_pending:
                self._full_size_pending.add(key)
                self._background("full-size", lambda: self._full_size_job(key))

    def _full_size_job(self, key: Tuple[Any, ...]) -> None:
        line, error = None, None
        try:
            if key != self._full_size_key():
                return                             # the choices moved on: not needed now
            name, choices, fast = key
            line = scenarios.headline(name, dict(choices), fast)
            self._full_size_lines[key] = line
        except Exception as e:  # noqa: BLE001 - shown in place of the line
            error = e
        finally:
            self._full_size_pending.discard(key)
        if key == self._full_size_key():
            self.full_size_line = line
            self.w_full_size.value = (_full_size_html(line) if error is None else
                                      _error_html("could not estimate at full size", error))

    # ------------------------------------------------------------------ planner
    def plan(self, fit: Any = None, block: bool = True) -> Optional[planner.Plan]:
        """Which registered techniques make the current configuration fit into ``fit`` (a size
        such as "11GiB"; default: the box's text): ``memlab.planner.plan`` on fake tensors, in
        the background; ``format_plan``'s text appears in the box (and ``plan_text``).

        A bad size raises ``planner.parse_size``'s ValueError, shown in the box as one line.
        ``block=True`` waits and returns the ``Plan`` (None when planning failed, shown).
        """
        text = self.w_fit.value if fit is None else fit
        try:
            budget = planner.parse_size(text)
        except ValueError as e:
            self.last_plan, self.plan_text = None, None
            self.w_plan.value = (f"<span style='font-size:12px;color:#c62828'>"
                                 f"{html.escape(' '.join(str(e).split()))}</span>")
            raise
        cfg = self.config.replace(budget=None)
        self.last_plan, self.plan_text = None, None
        self.w_plan.value = (f"<span style='font-size:12px;color:#777'>planning a fit into "
                             f"{html.escape(format_bytes(budget))}..."
                             f"{_AFTER_RUN if self.running else ''}</span>")
        job = self._background("plan", lambda: self._plan_job(cfg, budget))
        if block:
            job.join()
            return self.last_plan
        return None

    def _plan_ui(self) -> None:
        """The plan button: a bad size is shown in the box (by ``plan``), never raised."""
        try:
            self.plan(block=False)
        except ValueError:
            pass
        except Exception as e:  # noqa: BLE001 - shown to the user
            self.w_plan.value = _error_html("could not plan", e)

    def _plan_job(self, cfg: Config, budget: int) -> None:
        def progress(text: str) -> None:
            self.w_plan.value = (f"<span style='font-size:12px;color:#777'>planning: "
                                 f"{html.escape(text)}...</span>")
        try:
            result = planner.plan(cfg, budget, progress=progress)
            text = planner.format_plan(result)
        except Exception as e:  # noqa: BLE001 - shown in the box
            self.w_plan.value = _error_html("could not plan", e)
            return
        self.last_plan, self.plan_text = result, text
        self.w_plan.value = _pre(text)
