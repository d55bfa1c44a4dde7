"""The dashboard's control panel: scenario, sizes, one dropdown per technique kind, budget,
planner box, run buttons.

``Controls(task, overrides, on_change, scenario=None)`` owns the base configuration
(``Config.for_task`` with the overrides, or ``memlab.scenarios.config`` of the picked scenario)
and the widgets; ``config`` is the ``Config`` they describe, ``set(**values)`` sets them from
code. The technique dropdowns are generated from the registry: one per
``memlab.techniques.kinds()`` entry, listing ``techniques.names(kind, task)``, hidden when no
technique of the kind applies to the task, so a kind registered later gets its dropdown on the
next ``refresh()``. ``on_change()`` is called after every change a user (or ``set``) makes.

The scenario picker lists ``memlab.scenarios.names()`` after a "(none)" entry (the task's own
defaults). Picking one sets the task and every control to ``scenarios.config(name, **the current
technique choices)``; changing a technique afterwards rebuilds the base from the scenario again
(a scenario may tune e.g. the learning rate per optimizer), and switching to another task leaves
the scenario.
"""

from __future__ import annotations

import html
from typing import Any, Callable, Dict, Optional

import ipywidgets as W

from memlab import scenarios, tasks
from memlab import techniques as tech
from memlab.lab import FIELD_KINDS, Config
from memlab.ui.figures import MiB

# how a kind's dropdown is labelled (a kind not named here: its own name)
KIND_LABELS = {"memory": "activations"}
TASK_TIPS = {"speaker": "speaker verification (ResNet / DF-ResNet, AAM-softmax)",
             "asr": "transducer ASR (RNN-T loss)"}
# Config fields with a control of their own (every kind has one too)
_SIZES = ("task", "model", "batch_size", "depth", "width", "steps", "budget")
NO_SCENARIO = "(none)"          # the picker's entry for "no scenario": the task's defaults
PLAN_FIT = "11GiB"              # the planner box's start value


def scenario_name(value: Any) -> Optional[str]:
    """The scenario a picker value / ``scenario=`` argument names (None: no scenario)."""
    if value is None or value == NO_SCENARIO:
        return None
    if not isinstance(value, str) or value not in scenarios.names():
        raise ValueError(f"scenario must be None, {NO_SCENARIO!r} or one of "
                         f"{scenarios.names()}, got {value!r}")
    return value


def with_choices(cfg: Config, choices: Dict[str, str]) -> Config:
    """``cfg`` with the technique ``choices`` (kind -> name) that apply to its task."""
    named, values = dict(cfg.techniques), {}
    for kind, name in choices.items():
        if name is None or name not in tech.names(kind, cfg.task):
            continue
        if kind in FIELD_KINDS:
            values[kind] = name
        else:
            named[kind] = name
    return cfg.replace(techniques=named, **values)


def _kind_keywords(choices: Dict[str, str]) -> Dict[str, str]:
    """kind -> name as ``scenarios.config`` keywords (a kind's dashes become underscores)."""
    return {kind.replace("-", "_"): name for kind, name in choices.items()}


class Controls:
    """The widgets a learner turns; ``config`` is what they describe."""

    def __init__(self, task: Optional[str], overrides: Dict[str, Any],
                 on_change: Callable[[], None], scenario: Optional[str] = None):
        name = scenario_name(scenario)   # ValueError naming the scenarios
        if task is not None:
            tasks.get(task)              # ValueError naming the tasks
        unknown = set(overrides) - set(Config.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown Config field(s) {sorted(unknown)}; expected names from "
                            f"memlab.lab.Config")
        self.scenario: Optional[str] = None
        # scenario -> the Config fields given with it (constructor, set): kept while it is picked
        self._scenario_over: Dict[str, Dict[str, Any]] = {}
        if name is not None:
            s = scenarios.get(name)
            if task is not None and task != s.task:
                raise ValueError(f"task={task!r} contradicts scenario={name!r}, a {s.task} "
                                 f"scenario")
            task = s.task
            rest = dict(overrides)
            picks = dict(rest.pop("techniques", None) or {})
            picks.update({k: rest.pop(k) for k in FIELD_KINDS if k in rest})
            self._scenario_over[name] = rest
            self.base = scenarios.config(name, **_kind_keywords(picks), **rest)
            self.scenario = name
        else:
            task = task or "speaker"
            self.base = Config.for_task(task, **overrides).validate()
        self._overrides, self._task_of_overrides = dict(overrides), task
        self.on_change = on_change
        self._syncing = False          # True while controls are set from code
        self.kind_controls: Dict[str, W.Dropdown] = {}
        self._build(self.base)

        def row(*ws):
            return W.HBox(list(ws), layout=W.Layout(align_items="center", flex_flow="row wrap",
                                                    grid_gap="4px 14px"))
        self.panel = W.VBox([self.w_scenario, self.w_scenario_info, self.w_full_size,
                             row(self.w_task, self.w_model, self.w_steps),
                             row(self.w_batch, self.w_depth, self.w_width), self.w_kinds,
                             self.w_hint, row(self.w_budget_on, self.w_budget,
                                              self.w_budget_unit, self.w_estimate_btn,
                                              self.w_estimate),
                             row(self.w_fit, self.w_plan_btn), self.w_plan,
                             row(self.w_run, self.w_stop, self.w_clear, self.w_progress,
                                 self.w_status)],
                            layout=W.Layout(border="1px solid #e0e0e0", padding="8px 10px",
                                            grid_gap="6px"))
        for w, name in ((self.w_batch, "memlab-batch"), (self.w_depth, "memlab-depth"),
                        (self.w_run, "memlab-run"), (self.w_stop, "memlab-stop"),
                        (self.w_status, "memlab-status"), (self.w_scenario, "memlab-scenario"),
                        (self.w_full_size, "memlab-full-size"), (self.w_fit, "memlab-fit"),
                        (self.w_plan_btn, "memlab-plan-button"), (self.w_plan, "memlab-plan")):
            w.add_class(name)
        self._fill_strategies(self.base)
        self._describe_scenario()

    def __getattr__(self, name: str):
        # w_memory, w_optimizer, w_loss, w_<any kind>: the generated dropdowns
        for kind, w in self.__dict__.get("kind_controls", {}).items():
            if name == "w_" + kind.replace("-", "_"):
                return w
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _build(self, cfg: Config) -> None:
        style = {"description_width": "initial"}
        self.w_scenario = W.Dropdown(options=[NO_SCENARIO, *scenarios.names()],
                                     value=self.scenario or NO_SCENARIO, description="scenario",
                                     style=style, layout=W.Layout(width="260px"),
                                     tooltip="a preset sized so that a technique's regime is "
                                     "reached (memlab.scenarios)")
        self.w_scenario_info = W.HTML(layout=W.Layout(margin="0 0 0 8px"))
        self.w_full_size = W.HTML(layout=W.Layout(margin="0 0 0 8px"))
        self.w_scenario.observe(self._on_scenario, names="value")
        names = tasks.names()
        self.w_task = W.ToggleButtons(options=list(names), value=cfg.task, description="task",
                                      style=dict(style, button_width="76px"),
                                      tooltips=[TASK_TIPS.get(t, t) for t in names])
        self.w_model = W.Dropdown(options=list(tasks.get(cfg.task).models),
                                  value=cfg.model_name, description="model", style=style,
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
        self.w_hint = W.HTML(layout=W.Layout(margin="0 0 0 8px"))
        self.w_kinds = W.HBox(layout=W.Layout(align_items="center", flex_flow="row wrap",
                                              grid_gap="4px 14px"))
        self.w_budget_on = W.Checkbox(value=cfg.budget is not None, description="fit into",
                                      indent=False, layout=W.Layout(width="80px"))
        self.w_budget = W.BoundedFloatText(value=round(cfg.budget / MiB, 2) if cfg.budget
                                           else 64.0, min=0.01, max=1e9, step=1,
                                           layout=W.Layout(width="90px"))
        self.w_budget_unit = W.Dropdown(options=["MiB", "GiB"], value="MiB",
                                        layout=W.Layout(width="72px"))
        self.w_estimate_btn = W.Button(description="Estimate", icon="calculator",
                                       tooltip="measure one step of this configuration on fake "
                                       "tensors (no memory, no data) and compare with the budget",
                                       layout=W.Layout(width="100px"))
        self.w_estimate = W.HTML(layout=W.Layout(margin="0 0 0 8px"))
        self.w_fit = W.Text(value=PLAN_FIT, description="plan to fit into", style=style,
                            placeholder="11GiB", layout=W.Layout(width="220px"),
                            tooltip="a memory size: 11GB (10^9 B), 11GiB, 512MiB")
        self.w_plan_btn = W.Button(description="plan", icon="list",
                                   tooltip="which registered techniques make this configuration "
                                   "fit (memlab.planner, estimated on fake tensors)",
                                   layout=W.Layout(width="90px"))
        self.w_plan = W.HTML(layout=W.Layout(max_height="320px", overflow="auto"))
        button = dict(layout=W.Layout(width="90px"))
        self.w_run = W.Button(description="Run", icon="play", button_style="success",
                              tooltip="train this configuration (in the background)", **button)
        self.w_stop = W.Button(description="Stop", icon="stop", button_style="danger",
                               disabled=True, tooltip="stop after the current step", **button)
        self.w_clear = W.Button(description="Clear", icon="trash", tooltip="forget all runs",
                                **button)
        self.w_progress = W.IntProgress(value=0, min=0, max=1, bar_style="info",
                                        layout=W.Layout(width="160px"))
        self.w_status = W.HTML(layout=W.Layout(margin="0 0 0 8px"))
        self.w_error = W.Output(layout=W.Layout(max_height="240px", overflow="auto"))

        self.w_task.observe(self._on_task, names="value")
        for w in (self.w_model, self.w_batch, self.w_depth, self.w_width, self.w_steps,
                  self.w_budget_on, self.w_budget, self.w_budget_unit):
            w.observe(self._on_control, names="value")

    def _kind_control(self, kind: str) -> W.Dropdown:
        """The dropdown of ``kind``, made (and laid out) the first time the kind is seen."""
        if kind not in self.kind_controls:
            # each widget its own Layout: hiding one must not hide the others
            w = W.Dropdown(description=KIND_LABELS.get(kind, kind),
                           style={"description_width": "initial"},
                           layout=W.Layout(width="230px"))
            w.add_class(f"memlab-kind-{kind}")
            w.observe(self._on_kind, names="value")
            self.kind_controls[kind] = w
            self.w_kinds.children = tuple(self.kind_controls.values())
        return self.kind_controls[kind]

    def _fill_strategies(self, cfg: Config) -> None:
        """(Re)read the registry: one dropdown per kind lists every technique for the task."""
        self._syncing = True
        try:
            for kind in tech.kinds():
                w, names = self._kind_control(kind), list(tech.names(kind, cfg.task))
                current = cfg.choice(kind)
                w.options = names
                w.value = current if current in names else (names[0] if names else None)
                w.disabled = len(names) <= 1
                w.layout.display = "none" if not names else None   # e.g. no loss for speaker
            for kind in set(self.kind_controls) - set(tech.kinds()):   # kind unregistered
                self.kind_controls[kind].layout.display = "none"
                self.kind_controls[kind].options = []
        finally:
            self._syncing = False
        self._describe_choices()

    def _chosen(self) -> Dict[str, str]:
        """kind -> the name its (visible) dropdown shows."""
        return {k: w.value for k, w in self.kind_controls.items()
                if w.value is not None and k in tech.kinds()}

    def _describe_choices(self) -> None:
        """Tooltips, and one hint line per kind with a choice: what the selected one does."""
        rows = []
        for kind, w in self.kind_controls.items():
            entry = (tech.get(kind, w.value) if w.value is not None and
                     w.value in tech.names(kind) else None)
            w.tooltip = entry.description if entry else f"no {kind} technique applies"
            if entry is not None and not w.disabled:
                rows.append(f"<b>{html.escape(w.value)}</b>: {html.escape(entry.description)}")
        self.w_hint.value = ("<div style='font-size:12px;color:#555;line-height:1.45'>"
                             + "<br>".join(rows) + "</div>")

    def refresh(self) -> None:
        """Pick up kinds and techniques registered since the panel was built."""
        self._fill_strategies(self.config)

    def _task_base(self, task: str) -> Config:
        """The base Config of ``task`` without a scenario: the constructor's task gets all its
        overrides back, another task those without a control (a batch size chosen for one task
        is not one for the other)."""
        general = {k: v for k, v in self._overrides.items()
                   if k not in _SIZES and k not in tech.kinds()}
        keep = {self._task_of_overrides: dict(self._overrides)}.get(task, general)
        return Config.for_task(task, **keep)

    def _show(self, cfg: Config) -> None:
        """Set every control from ``cfg`` (no on_change: the caller calls it once)."""
        self._syncing = True
        try:
            self.w_task.value = cfg.task
            self.w_model.options = list(tasks.get(cfg.task).models)
            self.w_model.value = cfg.model_name
            for w, v in ((self.w_batch, cfg.batch_size), (self.w_depth, cfg.depth),
                         (self.w_width, cfg.width)):
                w.max = max(w.max, int(v))
                w.value = v
            self.w_depth.disabled = cfg.blocks is not None
            self.w_depth.tooltip = (f"fixed by blocks={tuple(cfg.blocks)}" if cfg.blocks
                                    else "blocks per stage (speaker) / encoder layers (asr)")
            self.w_steps.value = cfg.steps
        finally:
            self._syncing = False
        self._fill_strategies(cfg)

    def _on_task(self, change) -> None:
        if self._syncing:
            return
        if self.scenario is not None and scenarios.get(self.scenario).task != change["new"]:
            self._set_scenario_widget(None)           # another task: the scenario is left
        self.base = self._task_base(change["new"])
        self._show(self.base)
        self._on_control(None)

    # ------------------------------------------------------------------ scenarios
    def _scenario_config(self, name: str) -> Config:
        """``scenarios.config(name, **the current technique choices)`` (with the Config fields
        given for this scenario in the constructor or ``set``)."""
        task = scenarios.get(name).task
        chosen = {k: v for k, v in self._chosen().items() if v in tech.names(k, task)}
        return scenarios.config(name, **_kind_keywords(chosen),
                                **self._scenario_over.get(name, {}))

    def _set_scenario_widget(self, name: Optional[str]) -> None:
        self.scenario = name
        self._syncing = True
        try:
            self.w_scenario.value = name or NO_SCENARIO
        finally:
            self._syncing = False
        self._describe_scenario()

    def _pick(self, name: Optional[str]) -> None:
        """Make ``name`` (None: no scenario) the scenario the controls describe."""
        if name is None:
            if self.scenario is None:
                return
            chosen = self._chosen()
            self._set_scenario_widget(None)
            self.base = self._task_base(self.w_task.value)
            self._show(with_choices(self.base, chosen))
            return
        cfg = self._scenario_config(name)      # before the widget: a failure changes nothing
        for other in set(self._scenario_over) - {name}:
            self._scenario_over.pop(other)     # fields given with another scenario: theirs
        self._set_scenario_widget(name)
        self.base = cfg
        self._show(cfg)

    def _on_scenario(self, change) -> None:
        if self._syncing:
            return
        try:
            self._pick(scenario_name(change["new"]))
        except (ValueError, TypeError) as e:     # shown under the picker, never lost
            self._set_scenario_widget(self.scenario)
            self.w_scenario_info.value = _error_html(f"could not pick {change['new']}", e)
            return
        self._on_control(None)

    def _describe_scenario(self) -> None:
        """The picked scenario's title, description and what the paper reports."""
        if self.scenario is None:
            self.w_scenario_info.value = ("<span style='font-size:12px;color:#777'>no scenario: "
                                          "the task's defaults</span>")
            self.w_full_size.value = ""
            return
        s = scenarios.get(self.scenario)
        paper = (f"<br><span style='color:#777'>the paper: {html.escape(s.paper)}</span>"
                 if s.paper else "")
        self.w_scenario_info.value = (
            f"<div style='font-size:12px;color:#555;line-height:1.45'><b>{html.escape(s.title)}"
            f"</b><br>{html.escape(s.description)}{paper}</div>")

    def _on_kind(self, change) -> None:
        """A technique changed: under a scenario, rebuild its base for the new choices."""
        if self._syncing:
            return
        if self.scenario is not None:
            try:
                self.base = self._scenario_config(self.scenario)
            except (ValueError, TypeError) as e:   # e.g. a combination the scenario refuses
                self.w_scenario_info.value = _error_html("this choice", e)
        self._on_control(change)

    def _on_control(self, change) -> None:
        if self._syncing:
            return
        self._describe_choices()
        self.on_change()

    def budget_bytes(self) -> Optional[int]:
        if not self.w_budget_on.value:
            return None
        scale = MiB if self.w_budget_unit.value == "MiB" else 2 ** 30
        return max(1, int(self.w_budget.value * scale))

    @property
    def config(self) -> Config:
        """The configuration the controls describe (changing a control changes it)."""
        values: Dict[str, Any] = dict(
            task=self.w_task.value, model=self.w_model.value,
            batch_size=int(self.w_batch.value), depth=int(self.w_depth.value),
            width=int(self.w_width.value), steps=int(self.w_steps.value),
            budget=self.budget_bytes())
        named = dict(self.base.techniques)
        for kind, name in self._chosen().items():
            if kind in Config.__dataclass_fields__:      # memory, optimizer, loss
                values[kind] = name
            else:
                named[kind] = name
        return self.base.replace(techniques=named, **values)

    def set(self, **values: Any) -> "Controls":
        """Set controls from code: ``lab.set(batch_size=64, optimizer="adam8bit")``.

        Any kind is a keyword (``lab.set(precision="bf16")``). ``budget`` takes bytes (or None
        to switch the budget off); fields without a control change the base configuration.
        ``scenario`` (a name of ``memlab.scenarios.names()``, or None) is picked first, so
        ``lab.set(scenario="deep-speaker", memory="reversible")`` sets the scenario's sizes,
        then the technique.
        """
        values = dict(values)
        if "scenario" in values:
            name = scenario_name(values.pop("scenario"))   # ValueError naming the scenarios
            task = values.get("task")
            if name is not None and task is not None and task != scenarios.get(name).task:
                raise ValueError(f"task={task!r} contradicts scenario={name!r}, a "
                                 f"{scenarios.get(name).task} scenario")
            self._pick(name)
        if "task" in values and values["task"] != self.w_task.value:
            tasks.get(values["task"])           # ValueError naming the tasks
            self.w_task.value = values["task"]
        self.refresh()
        mapping = {"model": self.w_model, "batch_size": self.w_batch, "depth": self.w_depth,
                   "width": self.w_width, "steps": self.w_steps, **self.kind_controls}
        rest = {}
        self._syncing = True          # one estimate / redraw at the end, not one per control
        try:
            for k, v in values.items():
                if k == "task":
                    continue
                if k == "budget":
                    self._set_budget(v)
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
        if self.scenario is not None:
            self._scenario_over.setdefault(self.scenario, {}).update(rest)
            if set(values) & set(self.kind_controls):   # the scenario's base for these choices
                self.base = self._scenario_config(self.scenario)
            elif rest:
                self.base = self.base.replace(**rest)
        elif rest:
            self.base = self.base.replace(**rest)
            self._overrides.update(rest)
        self._on_control(None)
        return self

    def _set_budget(self, v) -> None:
        if v is None:
            self.w_budget_on.value = False
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"budget must be a positive number of bytes or None, got {v!r}")
        unit = "GiB" if v >= 2 ** 30 else "MiB"
        self.w_budget_unit.value = unit
        self.w_budget.value = round(v / 2 ** 30, 3) if unit == "GiB" else round(v / MiB, 2)
        self.w_budget_on.value = True


def _error_html(what: str, exc: BaseException) -> str:
    """One red line: ``what``: the exception's type and its message on one line."""
    msg = " ".join(str(exc).split())[:300]
    return (f"<span style='font-size:12px;color:#c62828'>{html.escape(what)}: "
            f"{html.escape(type(exc).__name__)}: {html.escape(msg)}</span>")
