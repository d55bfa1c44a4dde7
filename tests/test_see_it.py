"""What can be seen without a kernel: the README's figures, ``--plot`` pages, built tutorials.

* docs/images/NAME.json (the numbers of NAME.png) says what a fresh fast-mode benchmark says:
  the same series, the same directions (vanilla grows with depth, reversible flat, ...), never
  timings or sizes;
* ``memlab compare --plot`` / ``memlab bench NAME --plot`` write one standalone page: the
  figures' JSON and plotly.js inline, no <script src=http(s)>;
* ``memlab lab --app``: the Voila command keeps the token off the command line;
* ``notebook``: tools/build_tutorials.py --fast builds tutorial 00 (the dashboard's tutorial;
  one notebook keeps CI time low) into HTML with its plotly figures and the dashboard snapshot.
"""

import copy
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest

# pytest-xdist (-n 2 --dist loadgroup): one execution of each tutorial, shared by three files
pytestmark = pytest.mark.xdist_group("notebooks")

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
EXTERNAL_SRC = re.compile(r"<script[^>]*\ssrc=[\"']?(https?:)?//", re.I)


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


def _offline_page(text: str, figures: int) -> None:
    assert not EXTERNAL_SRC.search(text), EXTERNAL_SRC.search(text).group(0)
    assert text.count("class=\"plotly-graph-div\"") == figures
    assert text.count("plotly.js v") == 1                 # plotly.js embedded once


make_figures = _tool("make_figures")


@pytest.mark.parametrize("name", make_figures.FIGURES)
def test_readme_figure_matches_fresh_fast_bench(name, one_thread):
    data = json.loads((IMAGES / f"{name}.json").read_text())
    png = IMAGES / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 150_000
    assert data["command"].startswith("python tools/make_figures.py") and data["machine"]
    committed = make_figures.shape(name, data["rows"])
    assert committed == data["shape"]                    # the JSON is what the figure shows
    fresh = make_figures.shape(name, make_figures.RUNNERS[name](True))
    assert fresh == committed
    assert all(v for v in committed.values() if isinstance(v, bool)), committed


def test_bench_figures_draw_from_rows():
    from memlab import plots
    rows = json.loads((IMAGES / "activation_depth.json").read_text())["rows"]
    fig = plots.activation_depth_figure(rows)
    assert sorted(t.name for t in fig.data) == sorted({r["strategy"] for r in rows})
    full = json.loads((IMAGES / "full_size_saving.json").read_text())["rows"]
    fig = plots.full_size_figure(full)
    assert any("paper: 16.2x" in (a.text or "") for a in fig.layout.annotations)


def test_loss_curves_figure_from_the_committed_rows():
    from memlab import plots
    rows = json.loads((IMAGES / "loss_curves.json").read_text())["rows"]
    fig = plots.loss_curves_figure({r["optimizer"]: r["losses"] for r in rows})
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert names == ["adam", "adam8bit", "adam4bit", "adam4bit nearest"]
    assert len(fig.data) == 7                     # 4 curves + 3 gaps (none for the reference)
    assert fig.layout.yaxis.title.text.startswith("loss") and "%" in fig.layout.yaxis2.title.text
    assert fig.layout.xaxis2.title.text == "optimizer step"
    with pytest.raises(ValueError, match="reference"):
        plots.loss_curves_figure({"adam4bit": [1.0]})


def test_compare_plot_offline(tmp_path, capsys):
    from memlab import cli
    out = tmp_path / "out.html"
    assert cli.main(["compare", "--task", "speaker", "--steps", "5", "--plot", str(out)]) == 0
    text = out.read_text()
    _offline_page(text, 3)
    assert "Memory at the peak" in text and "Live bytes through one training step" in text
    assert "training loss" in text and '"type":"bar"' in text.replace(" ", "")
    assert f"wrote {out}" in capsys.readouterr().err


def test_plot_unwritable_is_one_line(tmp_path, capsys):
    from memlab import cli
    assert cli.main(["bench", "transducer", "--fast", "--plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plot must name a file" in err


def test_bench_plot_offline(tmp_path):
    from memlab import cli
    out = tmp_path / "bench.html"
    assert cli.main(["bench", "transducer", "--fast", "--plot", str(out)]) == 0
    text = out.read_text()
    _offline_page(text, 2)                                # the figure and the rows' table
    assert "Transducer loss step" in text


def test_snapshot_copies_dashboard_figures():
    from memlab import plots
    lab = SimpleNamespace(fig_breakdown=go.FigureWidget(go.Bar(x=[1], y=[2])),
                          fig_timeline=go.Figure(), fig_curves=go.Figure())
    figs = plots.snapshot(lab, display=False)
    assert len(figs) == 3 and all(type(f) is go.Figure for f in figs)
    assert list(figs[0].data[0].y) == [2]


def test_app_token_off_command_line(tmp_path):
    from memlab.cli import app_launch
    cmd, env, cwd = app_launch(8899, "secret-token-123", tmp_path)
    assert "secret-token-123" not in " ".join(cmd)
    assert "--Voila.ip=127.0.0.1" in cmd
    cfg = tmp_path / "voila.json"
    assert json.loads(cfg.read_text()) == {"Voila": {"token": "secret-token-123"}}
    assert cfg.stat().st_mode & 0o077 == 0 and cwd == tmp_path
    assert "JUPYTER_TOKEN" not in env


def test_build_tutorials_prepares_a_copy():
    import nbformat
    build = _tool("build_tutorials")
    path = ROOT / "notebooks" / "00_where_memory_goes.ipynb"
    nb = nbformat.read(path, as_version=4)
    before = path.read_text()
    copy = build.prepare(nb)
    assert 'pio.renderers.default = "notebook"' in copy.cells[0].source
    assert any("snapshot(lab)" in c.source for c in copy.cells)
    assert len(copy.cells) > len(nb.cells) and path.read_text() == before
    nbformat.validate(copy)


@pytest.mark.notebook
@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")),
                         ids=lambda p: p.stem)
def test_built_tutorial_html_offline(path):
    """Every tutorial, executed as tools/build_tutorials.py executes it (the notebook tests'
    own run, shared), exported to offline HTML: its figures inline, plotly.js once, nothing
    fetched, and the dashboard's snapshot where a tutorial runs the dashboard."""
    pytest.importorskip("nbconvert")
    from test_notebooks import execute_notebook
    run = execute_notebook(path)
    if run.error is not None:
        pytest.fail(f"{path.name} failed to execute: {run.error}")
    build = _tool("build_tutorials")
    nb = copy.deepcopy(run.nb)
    build.offline(nb)
    text, _ = build.exporter().from_notebook_node(nb)
    assert not EXTERNAL_SRC.search(text), EXTERNAL_SRC.search(text).group(0)
    assert text.count("plotly.js v") == 1
    assert text.count("class=\"plotly-graph-div\"") >= 1
    if any(build.RUN_BLOCK.search(c.source) for c in run.nb.cells if c.cell_type == "code"):
        assert "Memory at the peak" in text                  # the dashboard's snapshot

@pytest.mark.parametrize("how", ["argument", "environment", "off"])
def test_blocking_run_leaves_a_snapshot_when_asked(how, monkeypatch, one_thread):
    """MemoryLab.run(block=True, snapshot=True) (or MEMLAB_SNAPSHOT=1) leaves static copies of
    the dashboard's figures in the cell output; off by default in a live JupyterLab."""
    from memlab import plots
    from memlab.widgets import MemoryLab
    shown = []
    monkeypatch.setattr(plots, "snapshot", lambda lab, display=True: shown.append(lab))
    monkeypatch.delenv("MEMLAB_SNAPSHOT", raising=False)
    if how == "environment":
        monkeypatch.setenv("MEMLAB_SNAPSHOT", "1")
    lab = MemoryLab(task="speaker")
    lab.run(block=True, steps=2, **({"snapshot": True} if how == "argument" else {}))
    assert shown == ([] if how == "off" else [lab])
