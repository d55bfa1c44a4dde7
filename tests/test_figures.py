"""Every figure a learner sees is readable: axes fit what is drawn on them and say what they show.

Two halves:
* unit tests of ``figure_check`` on small figures, among them the broken pattern tutorial 03 had
  (``add_hline(annotation_text=...)`` on a log axis: the label for 80 GB went to 10^80), and of
  the figure builders in ``memlab.widgets`` (the dashboard's FigureWidgets after a run);
* ``test_tutorial_figures`` (marker ``notebook``): every plotly figure that the tutorials
  produce in fast mode, from the same headless executions as ``test_notebooks.py``.
"""

import math

import pytest

go = pytest.importorskip("plotly.graph_objects")

from figure_check import figure_problems, notebook_figures  # noqa: E402
from memlab.widgets import (MemoryLab, breakdown_figure, log_range,  # noqa: E402
                            reference_line, timeline_figure)
from test_notebooks import IDS, NOTEBOOKS, execute_notebook  # noqa: E402

# pytest-xdist (-n 2 --dist loadgroup): one execution of each tutorial, shared by three files
pytestmark = pytest.mark.xdist_group("notebooks")

GB = 1e9
TINY = dict(width=4, batch_size=2, steps=3, eval_every=3, measure_every=2, seconds=0.5)
# Tutorial 03's calculator at its start values: the batched and the sample-wise loss step
BARS_GB = [1.2349, 0.04766]


def calculator_before_the_fix():
    """The figure tutorial 03's calculator drew before: hlines with labels on a log axis."""
    fig = go.Figure(go.Bar(x=["batched", "sample-wise"], y=BARS_GB, width=0.5,
                           text=["1.15 GiB", "45.45 MiB"], textposition="outside"))
    for gb, name in ((80, "H100 (80 GB)"), (16, "16 GB GPU")):
        fig.add_hline(y=gb, line=dict(color="#999", dash="dot"), annotation_text=name,
                      annotation_position="top left")
    fig.update_layout(yaxis=dict(title="memory of the loss step (GB)", type="log"),
                      xaxis=dict(title="method"))
    return fig


def calculator_after_the_fix():
    fig = go.Figure(go.Bar(x=["batched", "sample-wise"], y=BARS_GB, width=0.5))
    fig.update_layout(yaxis=dict(title="memory of the loss step (GB, log scale)", type="log",
                                 range=log_range(BARS_GB + [80, 16], below=0.5, above=0.5)),
                      xaxis=dict(title="method"))
    reference_line(fig, 80, "H100 (80 GB)")
    reference_line(fig, 16, "16 GB GPU")
    return fig


def test_old_calculator_pattern_fails():
    problems = figure_problems(calculator_before_the_fix())
    text = "\n".join(problems)
    assert "drawn at 10^80" in text and "drawn at 10^16" in text      # the misplaced labels
    assert "decades beyond its data" in text                          # the axis up to 10^80
    assert text.count("flattened against the floor") == 2             # both bars


def test_fixed_calculator_passes():
    fig = calculator_after_the_fix()
    assert figure_problems(fig) == []
    # the labels sit at log10 of their lines, the lines at the data values
    ys = sorted(a.y for a in fig.layout.annotations)
    assert ys == pytest.approx([math.log10(16), math.log10(80)])
    assert sorted(s.y0 for s in fig.layout.shapes) == [16, 80]


def test_reference_line_on_linear_and_log_axes():
    lin = go.Figure(go.Scatter(x=[1, 2], y=[1, 5]))
    lin.update_layout(xaxis_title="x (units)", yaxis_title="y (units)")
    reference_line(lin, 6, "limit")
    assert lin.layout.annotations[0].y == 6 and figure_problems(lin) == []
    log = go.Figure(go.Scatter(x=[1, 2], y=[1, 500]))
    log.update_layout(xaxis_title="x (units)", yaxis=dict(title="y (units)", type="log"))
    reference_line(log, 1000, "limit", side="right")
    assert log.layout.annotations[0].y == pytest.approx(3.0)
    assert log.layout.annotations[0].xanchor == "right"
    assert figure_problems(log) == []
    with pytest.raises(ValueError, match="log axis"):
        reference_line(log, 0.0, "zero")
    with pytest.raises(ValueError, match="side"):
        reference_line(lin, 1, "x", side="top")
    with pytest.raises(ValueError, match="positive"):
        log_range([0, -1])


def test_shapes_on_a_log_axis_are_in_data_units():
    """A shape at y=80 on a log axis is at 80 (plotly.js converts it), so it passes."""
    fig = go.Figure(go.Scatter(x=[1, 2], y=[10, 50]))
    fig.update_layout(xaxis_title="x", yaxis=dict(title="y", type="log"))
    fig.add_shape(type="line", xref="x domain", x0=0, x1=1, y0=80, y1=80)
    assert figure_problems(fig) == []


def test_checks_catch_each_problem():
    def scatter(**layout):
        fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[1, 2, 3], name="a"))
        fig.add_scatter(x=[1, 2], y=[2, 1], name="b")
        fig.update_layout(xaxis_title="x (s)", yaxis_title="y (MiB)")
        fig.update_layout(**layout)
        return fig

    assert figure_problems(scatter()) == []
    assert figure_problems(scatter(yaxis_title="")) == ["yaxis has no title"]
    clipped = figure_problems(scatter(yaxis_range=[0, 2]))
    assert clipped and all("outside the axis range" in p for p in clipped)
    far = scatter()
    far.add_annotation(x=2, y=1e5, text="far away", showarrow=False)
    assert any("decades beyond its data" in p for p in figure_problems(far))
    logfar = scatter(yaxis_type="log", yaxis_range=[-6, 1])
    assert any("decades beyond its data" in p for p in figure_problems(logfar))
    inside = figure_problems(scatter(legend=dict(x=0.5, y=0.5)))
    assert any("legend sits inside" in p for p in inside)
    tiny = scatter()
    tiny.add_annotation(x=2, y=2, text="small", font=dict(size=6))
    assert any("too small to read" in p for p in figure_problems(tiny))
    flat = go.Figure(go.Bar(x=["a", "b"], y=[0.1, 0.12]))
    flat.update_layout(xaxis_title="run", yaxis_title="memory (GB)")
    flat.add_shape(type="line", xref="x domain", x0=0, x1=1, y0=11, y1=11)
    assert any("bars are flattened" in p for p in figure_problems(flat))
    odd = go.Figure(go.Pie(values=[1, 2]))
    assert any("not checked" in p for p in figure_problems(odd))


def test_category_and_heatmap_positions():
    fig = go.Figure(go.Bar(x=["1", "2", "4"], y=[3, 4, 5]))
    fig.update_layout(xaxis=dict(title="group", type="category"), yaxis_title="MiB")
    fig.add_annotation(x=2, y=5, text="by index", showarrow=False)      # index 2: "4"
    assert figure_problems(fig) == []
    fig.add_annotation(x=5, y=5, text="no such bar", showarrow=False)
    assert figure_problems(fig) == []                # autorange widens to it: still inside
    fig.update_layout(xaxis_range=[-0.5, 2.5])
    assert any("no such bar" in p for p in figure_problems(fig))
    heat = go.Figure(go.Heatmap(z=[[1, 2, 3], [4, 5, 6]], x=[0, 1, 2], y=[0, 1]))
    heat.update_layout(xaxis_title="t", yaxis_title="u", xaxis_range=[-0.5, 2.5],
                       yaxis_range=[-0.5, 1.5])
    assert figure_problems(heat) == []


def test_figure_builders_pass():
    rows = [dict(label=f"B{b}", activations=b * 2 ** 20, parameters=2 ** 20) for b in (2, 4)]
    assert figure_problems(breakdown_figure(rows, xaxis_title="batch")) == []
    near = breakdown_figure(rows, unit="MiB", xaxis_title="batch", limit=8, limit_label="GPU")
    assert figure_problems(near) == [] and near.layout.shapes
    # a limit far above tiny (fast-mode) bars is named, not drawn: the bars stay readable
    far = breakdown_figure(rows, unit="GB", xaxis_title="batch", limit=11, limit_label="GPU")
    assert figure_problems(far) == [] and not far.layout.shapes
    assert "GPU" in far.layout.title.subtitle.text
    tl = {"index": list(range(1, 7)), "op": ["op"] * 6,
          "phase": ["forward"] * 3 + ["backward"] * 2 + ["optimizer"],
          "parameters": [2 ** 20] * 6, "gradients": [0, 0, 0, 2 ** 20, 2 ** 20, 2 ** 20],
          "optimizer": [0] * 6, "activations": [0, 2 ** 21, 2 ** 22, 2 ** 21, 0, 0],
          "other": [0] * 6}
    fig = timeline_figure(tl)
    assert figure_problems(fig) == []
    assert fig.layout.yaxis.range[1] > 5.0       # room above the 5 MiB peak for phase labels


def test_dashboard_figures_pass(one_thread):
    lab = MemoryLab(task="speaker", **TINY)
    for fig in (lab.fig_breakdown, lab.fig_timeline, lab.fig_curves):   # before any run
        assert figure_problems(fig) == []
    lab.run(block=True)
    lab.w_batch.value = 4
    lab.w_budget_on.value = True
    lab.run(block=True)
    for fig in (lab.fig_breakdown, lab.fig_timeline, lab.fig_curves):
        assert figure_problems(fig) == [], fig.layout.title.text
    # the default 64 MiB budget is far above these tiny runs: named in the title, not drawn
    assert "budget 64 MiB" in lab.fig_breakdown.layout.title.text
    assert not [sh for sh in lab.fig_breakdown.layout.shapes if sh.name == "budget"]
    tallest = max(sum(v) for v in zip(*(tr.y for tr in lab.fig_breakdown.data)))
    lab.w_budget.value = round(2 * tallest, 2)       # a budget near the bars: a line
    for fig in (lab.fig_breakdown, lab.fig_timeline):
        assert [sh for sh in fig.layout.shapes if sh.name == "budget"]
        assert "budget" not in fig.layout.title.text
        assert figure_problems(fig) == [], fig.layout.title.text


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_tutorial_figures(path):
    run = execute_notebook(path)
    if run.error is not None:
        pytest.fail(f"{path.name} did not run, so its figures cannot be checked: {run.error}")
    figures = notebook_figures(run.nb, run.widget_state)
    assert figures, f"{path.name}: no plotly figure found in the outputs"
    report = [f"{where}: {p}" for where, fig in figures for p in figure_problems(fig)]
    assert not report, f"{path.name}:\n" + "\n".join(report)
