"""Figures outside a running kernel: standalone offline HTML, PNG screenshots, cell snapshots.

    from memlab.plots import runs_figures, bench_figures, write_html, snapshot
    write_html(runs_figures(runs), "runs.html", title="memlab compare")   # runs: [(cfg, records)]
    write_html(bench_figures("reversible", rows), "bench.html")
    snapshot(lab)            # after lab.run(block=True): static copies of the dashboard's figures

The dashboard's figures (``memlab.ui.figures``: breakdown bars, timeline, loss / metric curves)
filled from finished runs, and one figure per benchmark (``memlab bench NAME --plot``, the
README's pictures in ``tools/make_figures.py``). ``write_html`` embeds plotly.js once in the file
(``include_plotlyjs=True``): it opens without a network and without a kernel. Imports plotly,
never ipywidgets.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import plotly.graph_objects as go

from memlab.memory import CATEGORIES
from memlab.ui import figures as F

MiB = 2 ** 20
GiB = 2 ** 30
# the seed paper's headline (Liu & Qian, arXiv 2412.01195): reversible + 8-bit, total memory
PAPER_SAVING = 16.2
# strategy -> (colour, dash) in the bench figures; the four memory strategies of the speaker nets
STRATEGY_STYLE = {"vanilla": ("#E45756", "solid"), "checkpoint": ("#F58518", "dash"),
                  "reversible": ("#4C78A8", "solid"), "reversible-full": ("#54A24B", "dot")}
METHOD_STYLE = {"batched": ("#E45756", "solid"), "samplewise": ("#4C78A8", "solid")}


# ----------------------------------------------------------------------------- runs (compare)
def runs_figures(runs: Sequence[Tuple[Any, Sequence[Any]]],
                 names: Optional[Sequence[str]] = None) -> List[go.Figure]:
    """The dashboard's three figures for finished runs ``[(config, records), ...]``: memory at
    the peak by category (one bar per run), the latest metered step's timeline, loss and metric
    curves. ``names``: the runs' names (default ``run 1``, ``run 2`` ... as the dashboard)."""
    from memlab.lab import peak_record

    runs = list(runs)
    names = list(names) if names is not None else [f"run {i + 1}" for i in range(len(runs))]
    if len(names) != len(runs):
        raise ValueError(f"names must have one entry per run ({len(runs)}), got {len(names)}")
    bars_fig = F.peak_bars_figure()
    bars = []
    for name, (cfg, recs) in zip(names, runs):
        rec = peak_record([r for r in recs if r.step > 0] or list(recs))
        if rec is not None:
            bars.append((f"{name}<br>{F.short_label(cfg)}", f"{name} {cfg.label}",
                         rec.breakdown, rec.peak))
    F.set_peak_bars(bars_fig, bars)
    bars_fig.update_layout(width=max(470, 150 * len(bars) + 120))

    tl_fig = F.live_timeline_figure()
    latest = None
    for name, (_cfg, recs) in zip(names, runs):
        for r in recs:
            if r.metered and r.timeline:
                latest = (name, r)
    F.set_timeline(tl_fig, latest[1].timeline if latest else None,
                   detail=f"{latest[0]}, step {latest[1].step}" if latest else "")

    curves = F.curves_figure()
    shown: List[str] = []
    last_step = 0
    for i, (name, (cfg, recs)) in enumerate(zip(names, runs)):
        metrics = F.curve_metrics(cfg.task)
        shown += [m for m in metrics if m not in shown]
        color = F.RUN_COLORS[i % len(F.RUN_COLORS)]
        for series, trace, col in F.curve_traces(name, color, metrics):
            if series == "loss":
                pts = [(r.step, r.loss) for r in recs if r.step > 0 and math.isfinite(r.loss)]
            else:
                pts = [(r.step, r.metrics[series]) for r in recs
                       if r.metrics and series in r.metrics]
            trace.x, trace.y = [p[0] for p in pts], [p[1] for p in pts]
            curves.add_trace(trace, row=1, col=col)
        last_step = max([last_step] + [r.step for r in recs])
    F.set_curve_axes(curves, shown, last_step)
    return [bars_fig, tl_fig, curves]


def write_compare_html(path, runs: Sequence[Tuple[Any, Sequence[Any]]],
                       rows: Sequence[Dict[str, Any]], task: str) -> Path:
    """``memlab compare --plot``: the runs' figures and the printed table in one offline page.
    Runs trained by ``--nproc`` ranks keep no records here: their bars come from ``rows``."""
    from memlab import tasks
    from memlab.report import format_table

    names = [f"run {i + 1}" for i in range(len(rows))]   # as the dashboard; the table: labels
    if len(runs) == len(rows):
        figs = runs_figures(runs, names)
    else:                             # bars only, from the summary rows
        figs = [F.peak_bars_figure()]
        F.set_peak_bars(figs[0], [(n, n, {c: r.get(c, 0) for c in CATEGORIES}, r["peak"])
                                  for n, r in zip(names, rows)])
    t = tasks.get(task)
    rows = [dict(r, run=f"{i + 1}: {r['run']}") for i, r in enumerate(rows)]
    cols = ["run", "peak", *CATEGORIES, "step_s", "final_loss",
            *[c for c in (*t.metrics, f"untrained_{t.headline}") if rows and c in rows[0]]]
    return write_html(figs, path, title=f"memlab compare --task {task}",
                      text=format_table(list(rows), cols) + "\n\n" + t.note)


def snapshot(lab, display: bool = True) -> List[go.Figure]:
    """Static copies of a ``MemoryLab``'s figures (plain ``go.Figure``s, no widget), displayed
    in the cell output when ``display``: an executed notebook then shows the dashboard's bars,
    timeline and curves where widgets do not render (nbconvert HTML, GitHub). Call it after
    ``lab.run(block=True)``. With the plotly renderer ``"notebook"`` (tools/build_tutorials.py
    sets it) each output carries its figure as text/html with plotly.js."""
    figs = []
    for attr in ("fig_breakdown", "fig_timeline", "fig_curves"):
        fw = getattr(lab, attr, None)
        if fw is not None:
            figs.append(go.Figure(fw.to_dict()))
    if not figs:                      # not a dashboard: rebuild from its runs
        figs = runs_figures(getattr(lab, "runs", []))
    if display:
        from IPython.display import display as _display
        for f in figs:
            _display(f)
    return figs


# ----------------------------------------------------------------------------- bench figures
def _layout(fig: go.Figure, title: str, subtitle: str = "", height: int = 460,
            width: int = 860) -> go.Figure:
    fig.update_layout(template="plotly_white", font=F.FONT, height=height, width=width,
                      title=dict(text=f"<b>{title}</b>", x=0.01, y=0.96,
                                 subtitle=dict(text=subtitle, font=dict(size=12, color="#555"))),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0),
                      margin=dict(l=70, r=30, t=100, b=60))
    return fig


def activation_depth_figure(rows: Sequence[Dict[str, Any]]) -> go.Figure:
    """``memlab.bench.reversible.run`` rows: activation memory at the peak against depth, one
    line per strategy (vanilla grows with depth, reversible stays flat)."""
    fig = go.Figure()
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    for s in strategies:
        pts = sorted((r["depth"], r["activation_bytes"] / MiB) for r in rows
                     if r["strategy"] == s)
        color, dash = STRATEGY_STYLE.get(s, ("#777", "solid"))
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=s,
                        mode="lines+markers", line=dict(color=color, dash=dash, width=2.5),
                        marker=dict(size=8),
                        hovertemplate=f"{s}<br>depth %{{x}}<br>%{{y:.3g}} MiB<extra></extra>")
    r0 = rows[0] if rows else {}
    sub = (f"{r0.get('model', 'resnet')}, width {r0.get('width')}, batch {r0.get('batch_size')}"
           f" x {r0.get('frames')} frames x {r0.get('feat_dim')} fbank, one training step")
    _layout(fig, "Activation memory against depth", sub)
    fig.update_xaxes(title_text="blocks in the third stage (depth)", type="log",
                     tickvals=sorted({r["depth"] for r in rows}))
    fig.update_yaxes(title_text="activations at the peak (MiB)", rangemode="tozero")
    return fig


def state_bytes_figure(rows: Sequence[Dict[str, Any]]) -> go.Figure:
    """``memlab.bench.optim`` ``state_bytes_per_param`` rows: bytes of optimizer state per
    parameter, fp32 beside 8-bit."""
    rows = [r for r in rows if r.get("measure") == "state_bytes_per_param"]
    fig = go.Figure()
    xs = [r["subject"] for r in rows]
    ys = [r["value"] for r in rows]
    colors = ["#54A24B" if "8bit" in x else "#9D9D9D" for x in xs]
    fig.add_bar(x=xs, y=ys, marker_color=colors, text=[f"{y:.2f} B" for y in ys],
                textposition="outside", hovertemplate="%{x}: %{y:.3f} B/param<extra></extra>")
    for r in rows:
        if "8bit" in r["subject"] and r.get("ratio") is not None:
            fig.add_annotation(x=r["subject"], y=r["value"], yshift=26, showarrow=False,
                               text=f"{1 - r['ratio']:.0%} less than {r['reference']}",
                               font=dict(size=11, color="#2e7d32"))
    _layout(fig, "Optimizer state per parameter",
            "bytes in optimizer.state / parameter elements after one step "
            "(tensors >= 4096 elements)", width=760)
    fig.update_xaxes(title_text="optimizer", type="category")
    fig.update_yaxes(title_text="state bytes per parameter",
                     range=[0, 1.3 * max(ys, default=1)])
    fig.update_layout(showlegend=False)
    return fig


CURVE_STYLE = {"adam": ("#333333", "solid"), "adam8bit": ("#54A24B", "dot"),
               "adam4bit": ("#4C78A8", "solid"), "adam4bit nearest": ("#E45756", "dash")}


def loss_curves_figure(curves: Dict[str, Sequence[float]], reference: str = "adam",
                       tolerance: float = 0.05) -> go.Figure:
    """:func:`memlab.bench.curves.loss_curves`: the loss of each optimizer at each step (top)
    and its relative gap to ``reference``'s curve in percent (bottom, the band of
    ``tolerance`` shaded)."""
    from plotly.subplots import make_subplots
    if reference not in curves:
        raise ValueError(f"reference {reference!r} is not among the curves {sorted(curves)}")
    ref = list(curves[reference])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        row_heights=[0.6, 0.4])
    for name, ys in curves.items():
        color, dash = CURVE_STYLE.get(name, ("#777777", "solid"))
        steps = list(range(1, len(ys) + 1))
        fig.add_scatter(x=steps, y=list(ys), name=name, mode="lines", legendgroup=name,
                        line=dict(color=color, dash=dash), row=1, col=1,
                        hovertemplate=f"{name}<br>step %{{x}}: loss %{{y:.4f}}<extra></extra>")
        if name != reference:
            gap = [100 * (a - b) / b for a, b in zip(ys, ref)]
            fig.add_scatter(x=steps, y=gap, name=name, mode="lines", legendgroup=name,
                            showlegend=False, line=dict(color=color, dash=dash), row=2, col=1,
                            hovertemplate=f"{name}<br>step %{{x}}: %{{y:+.1f}}% vs "
                                          f"{reference}<extra></extra>")
    fig.add_hrect(y0=-100 * tolerance, y1=100 * tolerance, fillcolor="#54A24B", opacity=0.12,
                  line_width=0, row=2, col=1)
    note = ("; adam4bit: dithered rounding (its default), adam4bit nearest: the paper's"
            if "adam4bit nearest" in curves else "")
    _layout(fig, f"Loss curves against {reference} (fp32)",
            f"the same MLP and initialization, full-batch steps; shaded: within "
            f"{tolerance:.0%} of {reference}{note}", height=620)
    fig.update_yaxes(title_text="loss (mean squared error)", type="log", row=1, col=1)
    fig.update_yaxes(title_text=f"gap to {reference} (%)", row=2, col=1)
    fig.update_xaxes(title_text="optimizer step", row=1, col=1)
    fig.update_xaxes(title_text="optimizer step", row=2, col=1)
    return fig


def transducer_batch_figure(rows: Sequence[Dict[str, Any]]) -> go.Figure:
    """``memlab.bench.transducer.run`` rows: peak of one loss step against batch size, batched
    against sample-wise (one audio length and vocabulary: the first row's)."""
    r0 = rows[0] if rows else {}
    rows = [r for r in rows if r.get("seconds") == r0.get("seconds")
            and r.get("vocab_size") == r0.get("vocab_size")]
    fig = go.Figure()
    for m in list(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((r["batch_size"], r["peak_bytes"] / MiB) for r in rows if r["method"] == m)
        color, dash = METHOD_STYLE.get(m, ("#777", "solid"))
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=m,
                        mode="lines+markers", line=dict(color=color, dash=dash, width=2.5),
                        marker=dict(size=8),
                        hovertemplate=f"{m}<br>B=%{{x}}<br>%{{y:.3g}} MiB<extra></extra>")
    sub = (f"{r0.get('seconds')} s audio (T={r0.get('T')}, U={r0.get('U')}), "
           f"vocabulary {r0.get('vocab_size')}, joiner + loss + backward, {r0.get('device')}")
    _layout(fig, "Transducer loss step: peak against batch size", sub)
    fig.update_xaxes(title_text="batch size", type="log",
                     tickvals=sorted({r["batch_size"] for r in rows}))
    fig.update_yaxes(title_text="peak memory (MiB)", type="log")
    return fig


def full_size_figure(rows: Sequence[Dict[str, Any]], paper: float = PAPER_SAVING) -> go.Figure:
    """Rows of ``tools/make_figures.full_size_rows`` (``label``, breakdown by category, peak):
    stacked bars on fake tensors, the combined saving (first row over the last) against the
    seed paper's ``paper``x."""
    rows = list(rows)
    fig = F.breakdown_figure(rows, x="label", unit="GiB", height=480, width=860)
    if len(rows) >= 2:
        saving = rows[0]["peak_bytes"] / rows[-1]["peak_bytes"]
        base = rows[0]["label"].replace("<br>", " / ")
        fig.add_annotation(x=len(rows) - 1, y=rows[-1]["peak_bytes"] / GiB, yshift=44,
                           showarrow=False, font=dict(size=13, color="#2e7d32"),
                           text=f"<b>{saving:.1f}x</b> less than<br>{base} "
                                f"(paper: {paper:g}x)")
    r0 = rows[0] if rows else {}
    _layout(fig, f"{r0.get('model', '')}: memory of one training step",
            f"batch {r0.get('batch_size')} x {r0.get('frames')} frames, "
            f"{r0.get('num_classes')} speakers, estimated on fake tensors (memlab.lab."
            "estimate_config)", height=480)
    fig.update_layout(legend=dict(y=1.0))
    fig.update_xaxes(title_text="memory strategy / optimizer")
    return fig


def table_figure(rows: Sequence[Dict[str, Any]], title: str = "") -> go.Figure:
    """Any rows as a plotly table (benches without a dedicated figure)."""
    rows = list(rows)
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    fig = go.Figure(go.Table(header=dict(values=[f"<b>{c}</b>" for c in cols]),
                             cells=dict(values=[[cell(r.get(c)) for r in rows] for c in cols])))
    return _layout(fig, title or "rows", height=max(300, 40 + 28 * len(rows)),
                   width=max(860, 110 * len(cols)))


def bench_figures(name: str, rows: Sequence[Dict[str, Any]]) -> List[go.Figure]:
    """A sensible plot of ``memlab bench NAME``'s rows (and the rows as a table)."""
    rows = list(rows)
    figs: List[go.Figure] = []
    if name == "reversible" and rows and "depth" in rows[0]:
        figs.append(activation_depth_figure(rows))
        if all(r.get("time_ratio") is not None for r in rows):
            t = go.Figure()
            for s in list(dict.fromkeys(r["strategy"] for r in rows)):
                pts = sorted((r["depth"], r["time_ratio"]) for r in rows if r["strategy"] == s)
                color, dash = STRATEGY_STYLE.get(s, ("#777", "solid"))
                t.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=s,
                              mode="lines+markers", line=dict(color=color, dash=dash))
            _layout(t, "Step time relative to vanilla", "process CPU time, same depth")
            t.update_xaxes(title_text="depth", type="log")
            t.update_yaxes(title_text="time / vanilla")
            figs.append(t)
    elif name == "optim" and any(r.get("measure") == "state_bytes_per_param" for r in rows):
        figs.append(state_bytes_figure(rows))
        times = [r for r in rows if r.get("measure") == "step_time" and r.get("ratio")]
        if times:
            t = go.Figure(go.Bar(x=[f"{r['subject']}<br>{r.get('device', '')} "
                                    f"{r.get('params', '')}" for r in times],
                                 y=[r["ratio"] for r in times], marker_color="#4C78A8"))
            _layout(t, "Optimizer step time relative to torch's fused fp32 step", "")
            t.update_yaxes(title_text="time / torch fused")
            figs.append(t)
        gaps = [r for r in rows if r.get("measure") == "curve_gap"]
        if gaps:
            g = go.Figure(go.Bar(x=[f"{r['subject']}<br>seed {r['seed']}" for r in gaps],
                                 y=[100 * r["value"] for r in gaps], marker_color="#4C78A8"))
            g.add_hline(y=5, line_dash="dash", annotation_text="5%")
            _layout(g, "Worst step's loss gap to fp32 Adam",
                    "memlab.bench.curves: the tests' MLP, full-batch steps")
            g.update_xaxes(title_text="optimizer, initialization seed")
            g.update_yaxes(title_text="max |loss - loss_fp32| / loss_fp32 (%)")
            figs.append(g)
    elif name == "transducer" and rows and "method" in rows[0] and "batch_size" in rows[0]:
        figs.append(transducer_batch_figure(rows))
    figs.append(table_figure(rows, f"memlab bench {name}"))
    return figs


# ----------------------------------------------------------------------------- writers
def to_html(figures: Iterable[go.Figure], title: str = "memlab", text: str = "") -> str:
    """One standalone page: the figures, plotly.js embedded once (no script is fetched), and
    ``text`` (e.g. the CLI's table) in a <pre> below them."""
    parts = []
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0),
                                 config={"displaylogo": False}))
    body = "\n".join(f"<div class='figure'>{p}</div>" for p in parts)
    pre = f"<pre>{html.escape(text)}</pre>" if text else ""
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>body{{font-family:Inter,Segoe UI,"
            "Helvetica,Arial,sans-serif;margin:16px}} .figure{{margin-bottom:12px}} "
            "pre{{font-size:12px}}</style></head><body>"
            f"<h2>{html.escape(title)}</h2>\n{body}\n{pre}\n</body></html>\n")


def write_html(figures: Iterable[go.Figure], path, title: str = "memlab",
               text: str = "") -> Path:
    """Write ``to_html`` to ``path`` (atomically: a partial file never replaces a good one)."""
    path = Path(path)
    page = to_html(list(figures), title, text)
    fd, tmp = tempfile.mkstemp(prefix=".memlab-", suffix=".html", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


CHROMIUM = "/usr/bin/chromium"


def write_png(fig: go.Figure, path, width: Optional[int] = None, height: Optional[int] = None,
              scale: float = 1.0, chromium: str = CHROMIUM) -> Path:
    """Screenshot ``fig`` with headless Chromium (Playwright driving /usr/bin/chromium, no
    browser download; the plot element only, no mode bar). No kaleido needed."""
    from playwright.sync_api import sync_playwright

    width = int(width or fig.layout.width or 860)
    height = int(height or fig.layout.height or 460)
    fig = go.Figure(fig).update_layout(width=width, height=height)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="memlab-png-") as d:
        page_path = Path(d) / "figure.html"
        page_path.write_text(fig.to_html(full_html=True, include_plotlyjs=True,
                                         config={"displayModeBar": False,
                                                 "staticPlot": True}))
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium,
                                         args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": width + 40, "height": height + 40},
                                        device_scale_factor=scale)
                page.route("**/*", lambda route: route.continue_()
                           if route.request.url.startswith("file:") else route.abort())
                page.goto(page_path.as_uri())
                page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
                page.locator(".js-plotly-plot").first.screenshot(path=str(path))
            finally:
                browser.close()
    return path


def tradeoff_figure(rows: Sequence[Dict[str, Any]], title: str = "What each choice saves and "
                    "costs", subtitle: str = "") -> go.Figure:
    """``memlab.alternatives.compare`` rows as points: step time / the baseline's (x) against
    the saving, baseline peak / peak (y), both measured live; refused rows are left out."""
    rows = [r for r in rows if r.get("saving") is not None and r.get("time") is not None]
    fig = go.Figure()
    fig.add_scatter(x=[r["time"] for r in rows], y=[r["saving"] for r in rows],
                    mode="markers+text", text=[r["run"].replace(" + ", "<br>+ ") for r in rows],
                    textposition="top center", textfont=dict(size=10),
                    marker=dict(size=11, color="#4C78A8"), showlegend=False,
                    customdata=[r["peak"] / MiB for r in rows],
                    hovertemplate="%{text}<br>step time %{x:.2f}x<br>saving %{y:.2f}x"
                                  "<br>peak %{customdata:.3g} MiB<extra></extra>")
    _layout(fig, title, subtitle, height=520)
    xs = [r["time"] for r in rows] or [1.0]
    ys = [r["saving"] for r in rows] or [1.0]
    fig.update_xaxes(title_text="step time / the baseline's (x, measured live; lower is "
                     "faster)", range=[0.9 * min(min(xs), 1.0) - 0.05, 1.1 * max(xs) + 0.1])
    fig.update_yaxes(title_text="saving: baseline peak / peak (x, higher saves more)",
                     range=[0, 1.25 * max(ys) + 0.2])
    return fig
