"""What a learner sees: a plotly figure's axes fit what is drawn on them, and every axis says what.

``figure_problems(fig)`` takes a figure (``go.Figure``/``FigureWidget`` or its JSON dict) and
returns a list of sentences, empty when the figure passes:

* every axis that carries something has a title;
* every trace point, shape and annotation lies inside the range the axis ends up with (the
  explicit ``range``, or the autorange computed here the way plotly does: the hull of the data,
  the shapes and the annotations on that axis, plus 0 for ``rangemode="tozero"``);
* no axis spans more than ``max_extra_decades`` (3) decades beyond its data: on a log axis a
  range end more than 3 units of log10 past the data; on a linear axis an end more than 10^3
  times the data's scale away;
* bars on a log axis (drawn up from the axis floor) are each at least ``min_bar_share`` of the
  axis tall, so none is flattened against the floor; on a linear axis the tallest bar reaches
  at least ``MIN_TALLEST_BAR`` of the axis (a far reference line does not flatten them);
* an annotation on a log axis that labels a horizontal line is placed at log10 of the line's
  value, not at the value itself (``add_hline(annotation_text=...)`` gets this wrong);
* a legend does not sit inside the plotting area, and no explicit font is below 9 px.

Units, as plotly.js uses them (this is what trips ``add_hline`` on a log axis): on a log axis the
range and **annotation** positions are in log10 units, while **shape** coordinates are data
values (plotly.js converts them with ``d2r``). On a category axis positions are category indices.

``notebook_figures(nb, widget_state)`` lists the figures in an executed notebook: plotly outputs
of cells, those inside Output widgets (``ipywidgets.interact``), and FigureWidgets dumped by
``DUMP_FIGURE_WIDGETS`` (a cell the test runner appends: a FigureWidget's state reaches nbclient
only as deltas, so the kernel is asked for the figures it holds).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

PLOTLY_MIME = "application/vnd.plotly.v1+json"
FIGURE_WIDGET_META = "memlab_figure_widget"
MAX_EXTRA_DECADES = 3.0
MIN_BAR_SHARE = 0.04
MIN_TALLEST_BAR = 0.2
MIN_FONT_PX = 9

# Appended to a notebook by the test runner: every FigureWidget alive in the kernel, as a plotly
# output tagged with its CSS classes (the dashboard's "memlab-breakdown", ...).
DUMP_FIGURE_WIDGETS = f"""\
import gc as _gc, json as _json
import plotly.graph_objects as _go
from IPython.display import display as _display
for _fw in [_o for _o in _gc.get_objects() if isinstance(_o, _go.FigureWidget)]:
    _display({{{PLOTLY_MIME!r}: _json.loads(_fw.to_json())}}, raw=True,
             metadata={{{FIGURE_WIDGET_META!r}: " ".join(_fw._dom_classes) or "FigureWidget"}})
"""

_AXIS_KEY = re.compile(r"^([xy])axis(\d*)$")
_SUPPORTED = {"scatter", "scattergl", "bar", "heatmap"}


def _as_dict(fig: Any) -> Dict[str, Any]:
    if isinstance(fig, dict):
        return fig
    if hasattr(fig, "to_json"):
        return json.loads(fig.to_json())
    raise TypeError(f"fig must be a plotly figure or its JSON dict, got {type(fig).__name__}")


def _axis_id(key: str) -> str:
    """'xaxis2' -> 'x2', 'yaxis' -> 'y'."""
    m = _AXIS_KEY.match(key)
    return m.group(1) + m.group(2)


def _axis_key(axis_id: str) -> str:
    return f"{axis_id[0]}axis{axis_id[1:]}"


def _text(title: Any) -> str:
    if isinstance(title, dict):
        title = title.get("text")
    return str(title or "").strip()


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _values(arr: Any) -> List[Any]:
    if arr is None:
        return []
    if isinstance(arr, dict) and "bdata" in arr:      # plotly >= 6 typed arrays in JSON
        import base64

        import numpy as np
        data = np.frombuffer(base64.b64decode(arr["bdata"]), dtype=np.dtype(arr["dtype"]))
        if "shape" in arr:
            shape = arr["shape"]
            shape = [int(s) for s in shape.split(",")] if isinstance(shape, str) else shape
            data = data.reshape(shape)
        return data.tolist()
    return list(arr)


class _Axis:
    def __init__(self, axis_id: str, spec: Dict[str, Any]):
        self.id = axis_id
        self.spec = spec
        self.type = spec.get("type") or "-"
        self.categories: List[str] = []
        self.data: List[float] = []         # trace positions, in range units
        self.extras: List[Tuple[str, float]] = []   # (what, position) of shapes / annotations
        self.bar_tops: List[Tuple[str, float]] = []  # (name, data value) of bars along this axis
        self.used = False

    @property
    def log(self) -> bool:
        return self.type == "log"

    def category(self, v: Any, number_is_index: bool) -> Optional[float]:
        """Index of a category; trace values are categories (numbers too, as text, added in
        first-seen order like plotly's categoryorder='trace'), while a shape or annotation
        given a number means that index (plotly.js ``r2c``)."""
        if v is None:
            return None
        if number_is_index and _num(v) is not None and not isinstance(v, str):
            return float(v)
        s = str(v)
        if s not in self.categories:
            self.categories.append(s)
        return float(self.categories.index(s))

    def data_pos(self, v: Any, trace: bool = True) -> Optional[float]:
        """A trace or shape coordinate (data units) -> range units."""
        if self.type == "category":
            return self.category(v, number_is_index=not trace)
        f = _num(v)
        if f is None:
            return None
        if self.log:
            return math.log10(f) if f > 0 else None
        return f

    def annotation_pos(self, v: Any) -> Optional[float]:
        """An annotation coordinate: already in range units (log10 on a log axis)."""
        if self.type == "category":
            return self.category(v, number_is_index=True)
        return _num(v)

    def explicit_range(self) -> Optional[Tuple[float, float]]:
        r = self.spec.get("range")
        auto = self.spec.get("autorange")
        if not r or len(r) != 2 or auto in (True, "reversed") or \
                any(_num(x) is None for x in r):
            return None
        lo, hi = float(r[0]), float(r[1])
        return (min(lo, hi), max(lo, hi))

    def final_range(self) -> Optional[Tuple[float, float]]:
        explicit = self.explicit_range()
        if explicit:
            return explicit
        pts = self.data + [p for _, p in self.extras]
        if self.type == "category" and self.categories:
            pts += [-0.5, len(self.categories) - 0.5]
        if not pts:
            return None
        lo, hi = min(pts), max(pts)
        if not self.log and self.spec.get("rangemode") in ("tozero", "nonnegative"):
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            if self.spec.get("rangemode") == "nonnegative":
                lo = max(lo, 0.0)
        return lo, hi


def _infer_types(layout: Dict[str, Any], traces: List[Dict[str, Any]],
                 axes: Dict[str, _Axis]) -> None:
    """Axis type '-' (auto): category when the first trace on it has non-numeric values."""
    for ax in axes.values():
        if ax.type != "-":
            continue
        ax.type = "linear"
        for tr in traces:
            if tr.get(f"{ax.id[0]}axis", ax.id[0]) != ax.id:
                continue
            vals = _values(tr.get(ax.id[0]))
            if vals and any(_num(v) is None for v in vals if v is not None):
                ax.type = "category"
            if vals:
                break


def _stack_key(tr: Dict[str, Any]) -> Tuple[str, str]:
    return tr.get("xaxis", "x"), tr.get("yaxis", "y")


def figure_problems(fig: Any, *, max_extra_decades: float = MAX_EXTRA_DECADES,
                    min_bar_share: float = MIN_BAR_SHARE) -> List[str]:
    """Problems a learner would see in ``fig`` (empty list: none found)."""
    fig = _as_dict(fig)
    layout = fig.get("layout") or {}
    traces = [t for t in (fig.get("data") or []) if t.get("visible", True) is True]
    problems: List[str] = []

    axes: Dict[str, _Axis] = {}

    def axis(axis_id: str) -> Optional[_Axis]:
        if not re.fullmatch(r"[xy]\d*", axis_id or ""):
            return None                      # 'paper', 'x domain', ...
        if axis_id == "x1" or axis_id == "y1":
            axis_id = axis_id[0]
        if axis_id not in axes:
            axes[axis_id] = _Axis(axis_id, layout.get(_axis_key(axis_id)) or {})
        return axes[axis_id]

    for key in layout:
        if _AXIS_KEY.match(key):
            axis(_axis_id(key))
    for tr in traces:
        axis(tr.get("xaxis", "x")), axis(tr.get("yaxis", "y"))
    _infer_types(layout, traces, axes)

    # --- traces
    stacks: Dict[Tuple[Any, ...], Dict[Any, float]] = {}
    barmode = layout.get("barmode", "group")
    for tr in traces:
        kind = tr.get("type", "scatter")
        ax_x, ax_y = axis(tr.get("xaxis", "x")), axis(tr.get("yaxis", "y"))
        if kind not in _SUPPORTED:
            problems.append(f"trace type {kind!r} is not checked by figure_check; add it there")
            continue
        xs, ys = _values(tr.get("x")), _values(tr.get("y"))
        name = tr.get("name") or kind
        if kind == "heatmap":
            z = _values(tr.get("z"))
            if not z:
                continue
            ncols = len(z[0]) if isinstance(z[0], list) else len(z)
            xs = xs or list(range(ncols))
            ys = ys or list(range(len(z)))
            for ax, vals in ((ax_x, xs), (ax_y, ys)):
                ax.used = True
                pos = [p for p in (ax.data_pos(v) for v in vals) if p is not None]
                if pos:
                    step = (max(pos) - min(pos)) / max(len(pos) - 1, 1) if len(pos) > 1 else 1
                    ax.data += [min(pos) - step / 2, max(pos) + step / 2]
            continue
        horizontal = kind == "bar" and tr.get("orientation") == "h"
        cat_ax, val_ax = (ax_y, ax_x) if horizontal else (ax_x, ax_y)
        cats, vals = (ys, xs) if horizontal else (xs, ys)
        if not vals:
            continue
        if not cats:
            cats = list(range(len(vals)))
        cat_ax.used = val_ax.used = True
        stacked = (kind == "bar" and barmode in ("stack", "relative")) or \
            (kind != "bar" and tr.get("stackgroup"))
        skey = (kind == "bar", tr.get("stackgroup"), *_stack_key(tr))
        for c, v in zip(cats, vals):
            cp = cat_ax.data_pos(c)
            f = _num(v)
            if cp is None or f is None:
                continue
            if stacked:
                base = stacks.setdefault(skey, {}).get(cp, 0.0)
                top = base + f
                stacks[skey][cp] = top
            else:
                top = f
            if kind == "bar":
                w = 0.4 if cat_ax.type == "category" else 0.0
                cat_ax.data += [cp - w, cp + w]
                if cat_ax.type == "category":
                    cat_ax.data += [-0.5, len(cat_ax.categories) - 0.5]
                val_ax.bar_tops.append((f"{name} at {c}", top))
                if not val_ax.log:
                    val_ax.data.append(0.0)   # bars start at 0
            else:
                cat_ax.data.append(cp)
            p = val_ax.data_pos(top)
            if p is not None:
                val_ax.data.append(p)
            if (kind != "bar" and str(tr.get("fill", "")).startswith("tozero")) and \
                    not val_ax.log:
                val_ax.data.append(0.0)

    # --- shapes (data units) and annotations (range units) on data axes
    hlines: Dict[str, List[float]] = {}         # y axis -> data values of horizontal lines
    for i, sh in enumerate(layout.get("shapes") or []):
        label = sh.get("name") or f"shape {i}"
        if sh.get("type") == "line" and _num(sh.get("y0")) is not None and \
                sh.get("y0") == sh.get("y1"):
            hlines.setdefault(sh.get("yref", "y"), []).append(float(sh["y0"]))
        for letter in "xy":
            ax = axis(sh.get(f"{letter}ref", letter))
            if ax is None:
                continue
            ax.used = True
            for end in ("0", "1"):
                v = sh.get(f"{letter}{end}")
                p = ax.data_pos(v, trace=False) if v is not None else None
                if p is not None:
                    ax.extras.append((f"{label} ({letter}{end}={v})", p))
    for i, an in enumerate(layout.get("annotations") or []):
        label = f"annotation {_text(an.get('text'))!r}"
        for letter in "xy":
            ax = axis(an.get(f"{letter}ref", letter))
            if ax is None or an.get(letter) is None:
                continue
            ax.used = True
            p = ax.annotation_pos(an.get(letter))
            if p is not None:
                ax.extras.append((f"{label} ({letter}={an.get(letter)})", p))
            if letter == "y" and ax.log and p is not None and any(
                    v > 0 and p == v and abs(math.log10(v) - v) > 1e-3
                    for v in hlines.get(an.get("yref", "y"), [])):
                problems.append(
                    f"{_axis_key(ax.id)} (log): {label} at y={p:g} is drawn at 10^{p:g}, not "
                    f"next to its line at {p:g} (annotation y is log10 on a log axis; "
                    "fig.add_hline(annotation_text=...) makes this mistake)")

    # --- per axis
    for ax in sorted(axes.values(), key=lambda a: a.id):
        if not ax.used or ax.spec.get("visible") is False:
            continue
        where = _axis_key(ax.id)
        if not _text(ax.spec.get("title")):
            problems.append(f"{where} has no title")
        rng = ax.final_range()
        if rng is None:
            continue
        lo, hi = rng
        unit = "log10 units" if ax.log else "units"
        tol = 1e-6 * max(hi - lo, 1e-12)
        outside = [(w, p) for w, p in [("data", p) for p in ax.data] + ax.extras
                   if p < lo - tol or p > hi + tol]
        for w, p in outside[:3]:
            problems.append(f"{where}: {w} at {p:.4g} ({unit}) lies outside the axis range "
                            f"[{lo:.4g}, {hi:.4g}]")
        if ax.data and ax.type != "category":
            dlo, dhi = min(ax.data), max(ax.data)
            if ax.log:
                extra = max(hi - dhi, dlo - lo)
                if extra > max_extra_decades:
                    problems.append(
                        f"{where} (log) spans [{lo:.3g}, {hi:.3g}] in log10 units, "
                        f"{extra:.1f} decades beyond its data [{dlo:.3g}, {dhi:.3g}]")
            else:
                scale = max(dhi - dlo, abs(dlo), abs(dhi))
                extra = max(hi - dhi, dlo - lo)
                if scale > 0 and extra > 10 ** max_extra_decades * scale:
                    problems.append(
                        f"{where} spans [{lo:.4g}, {hi:.4g}], more than "
                        f"{max_extra_decades:g} decades beyond its data [{dlo:.4g}, {dhi:.4g}]")
        if not ax.log and hi > lo and ax.bar_tops:
            tallest = max(top for _, top in ax.bar_tops)
            share = (tallest - lo) / (hi - lo)
            if share < MIN_TALLEST_BAR:
                problems.append(f"{where}: the tallest bar ({tallest:.3g}) reaches {share:.0%} "
                                "of the axis: the bars are flattened")
        if ax.log and hi > lo:
            for name, top in ax.bar_tops:
                share = ((math.log10(top) if top > 0 else -math.inf) - lo) / (hi - lo)
                if share < min_bar_share:
                    problems.append(f"{where} (log): bar {name} ({top:.3g}) is {share:.1%} of "
                                    f"the axis tall, flattened against the floor")

    # --- legend and fonts
    shown = [t for t in traces if t.get("showlegend", True) is not False]
    if (layout.get("showlegend") is True or len(shown) > 1) and \
            layout.get("showlegend") is not False:
        lg = layout.get("legend") or {}
        x, y = _num(lg.get("x")), _num(lg.get("y"))
        if x is not None and y is not None and 0 <= x <= 1 and 0 <= y <= 1 and \
                not (y == 1 and lg.get("yanchor") == "bottom") and \
                not (x == 1 and lg.get("xanchor") == "left"):
            problems.append(f"the legend sits inside the plotting area (x={x}, y={y}): "
                            "it can hide data")
    for path, size in _font_sizes(layout):
        if size < MIN_FONT_PX:
            problems.append(f"{path}: font size {size:g} px is too small to read")
    return problems


def _font_sizes(node: Any, path: str = "layout") -> Iterable[Tuple[str, float]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("font", "tickfont") and isinstance(v, dict) and _num(v.get("size")):
                yield f"{path}.{k}", float(v["size"])
            if k != "template":
                yield from _font_sizes(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _font_sizes(v, f"{path}[{i}]")


def _title(fig: Dict[str, Any]) -> str:
    return re.sub(r"<[^>]+>", "", _text((fig.get("layout") or {}).get("title")))[:70]


def notebook_figures(nb: Any, widget_state: Optional[Dict[str, Dict[str, Any]]] = None
                     ) -> List[Tuple[str, Dict[str, Any]]]:
    """``[(where, figure dict), ...]`` for every plotly figure in an executed notebook."""
    found: List[Tuple[str, Dict[str, Any]]] = []
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []) or []:
            fig = (out.get("data") or {}).get(PLOTLY_MIME)
            if fig:
                widget = (out.get("metadata") or {}).get(FIGURE_WIDGET_META)
                where = f"FigureWidget {widget}" if widget else f"cell {i}"
                found.append((f"{where}: {_title(fig)!r}", fig))
    for model_id, state in (widget_state or {}).items():
        for out in state.get("outputs", []) or []:
            fig = (out.get("data") or {}).get(PLOTLY_MIME)
            if fig:
                found.append((f"Output widget {model_id[:8]}: {_title(fig)!r}", fig))
    return found
