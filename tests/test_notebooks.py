"""Every tutorial notebook runs headless in fast mode, and is committed without outputs.

Parametrized over ``notebooks/*.ipynb``, so a notebook added later is covered automatically. Each
notebook is executed once per session (``execute_notebook``); test_figures.py checks the figures
of the same execution.
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# pytest-xdist (-n 2 --dist loadgroup): one execution of each tutorial, shared by three files
pytestmark = pytest.mark.xdist_group("notebooks")

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Per notebook, fast mode, 2 CPU cores. Alone each tutorial runs in 15-35 s. Inside the full
# suite a notebook has been seen at 134-263 s: nbclient waited a whole cell timeout for the
# kernel_info reply after the kernel started, both processes idle (py-spy). The reply now has
# KERNEL_INFO_TIMEOUT_S; a cell waiting longer than CELL_TIMEOUT_S fails with its index, and a
# slow run names its slowest cells (nbclient's timing).
TIMEOUT_S = 300
CELL_TIMEOUT_S = 150
KERNEL_INFO_TIMEOUT_S = 20
IDS = [p.stem for p in NOTEBOOKS]


class Executed:
    """One headless fast-mode execution of a notebook: the executed copy, the state of its
    widgets as nbclient recorded it (Output widgets hold their outputs there), the wall time,
    and the error if a cell raised."""

    def __init__(self, nb, widget_state, elapsed, error):
        self.nb, self.widget_state, self.elapsed, self.error = nb, widget_state, elapsed, error


_EXECUTED = {}


def _build_tutorials():
    import importlib.util
    if "build_tutorials" not in sys.modules:
        spec = importlib.util.spec_from_file_location("build_tutorials",
                                                      ROOT / "tools" / "build_tutorials.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["build_tutorials"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["build_tutorials"]


def execute_notebook(path: Path) -> Executed:
    """Run ``path`` once per test session (the run test and the figure check share it).

    A last cell is appended to the executed copy only: it displays every plotly FigureWidget
    alive in the kernel (the dashboard's figures), whose state nbclient sees only as deltas.
    """
    if path in _EXECUTED:
        return _EXECUTED[path]
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from figure_check import DUMP_FIGURE_WIDGETS

    # The kernel inherits this environment: tiny sizes, and one intra-op thread so tiny models
    # do not lose their time to OpenMP spin-waits on a busy 2-core machine.
    env = {"MEMLAB_FAST": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [
               p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as cwd:
        for k, v in env.items():
            mp.setenv(k, v)
        t0 = time.perf_counter()
        for attempt in range(2):
            # the copy tools/build_tutorials.py executes (renderer cell, dashboard snapshots),
            # with each figure's JSON kept beside its offline HTML: test_see_it exports this run
            nb = _build_tutorials().prepare(nbformat.read(path, as_version=4),
                                            renderer="plotly_mimetype+notebook")
            nb.cells.append(nbformat.v4.new_code_cell(DUMP_FIGURE_WIDGETS))
            # ``timeout`` is what nbclient waits for the kernel_info reply after the kernel
            # starts (its cells get CELL_TIMEOUT_S from timeout_func): that reply is sometimes
            # lost (papermill#711, nbclient#272), which stalled a notebook for a whole cell
            # timeout with both processes idle; then the run is started again, once
            client = nbclient.NotebookClient(
                nb, timeout=KERNEL_INFO_TIMEOUT_S, timeout_func=lambda cell: CELL_TIMEOUT_S,
                kernel_name="python3", allow_errors=False,
                resources={"metadata": {"path": cwd}})   # cwd: files a notebook writes go here
            error = None
            try:
                client.execute()
            except Exception as exc:   # CellExecutionError, a timeout, a dead kernel
                error = exc
            if error is None or client.code_cells_executed > 0:
                break                  # a cell ran: its error (if any) is the notebook's
        elapsed = time.perf_counter() - t0
    _EXECUTED[path] = Executed(nb, client.widget_state, elapsed, error)
    return _EXECUTED[path]


def slowest_cells(nb, n: int = 3) -> str:
    """The ``n`` longest cells of an executed notebook (nbclient's timing metadata), as
    "cell 12 (first line): 3.4 s" -- what a slow run in CI is diagnosed from."""
    from datetime import datetime
    times = []
    for i, c in enumerate(nb.cells):
        ex = c.get("metadata", {}).get("execution", {})
        t0, t1 = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if c.cell_type == "code" and t0 and t1:
            dt = (datetime.fromisoformat(t1.replace("Z", "+00:00"))
                  - datetime.fromisoformat(t0.replace("Z", "+00:00"))).total_seconds()
            first = c.source.strip().splitlines()[0][:40] if c.source.strip() else ""
            times.append((dt, i, first))
    times.sort(reverse=True)
    return "; ".join(f"cell {i} ({first!r}): {dt:.1f} s" for dt, i, first in times[:n])


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_in_fast_mode(path):
    run = execute_notebook(path)
    if run.error is not None:
        raise run.error
    assert run.elapsed < TIMEOUT_S, \
        f"{path.name} took {run.elapsed:.0f} s in fast mode (limit {TIMEOUT_S}); slowest " \
        f"cells: {slowest_cells(run.nb)}"
    errors = [o for c in run.nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    print(f"{path.name}: {run.elapsed:.1f} s; slowest cells: {slowest_cells(run.nb)}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_committed_clean(path):
    """No outputs, no execution counts, no saved widget state; a tagged parameters cell."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them"
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state in metadata"
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    assert "MEMLAB_FAST" in params[0].source
    # fast mode has one reader, memlab.fast_mode()
    assert "fast_mode()" in params[0].source, f"{path.name}: read fast mode with fast_mode()"
    readers = [c.id for c in nb.cells if c.cell_type == "code"
               and re.search(r"environ(\.get)?\(?\[?[\"']MEMLAB_FAST", c.source)]
    assert not readers, f"{path.name}: cells {readers} read MEMLAB_FAST; use memlab.fast_mode()"


def test_there_are_notebooks():
    assert any(p.name.startswith("00_") for p in NOTEBOOKS)


def test_generated_notebooks_are_current():
    """Notebooks built by tools/make_notebook.py (jupytext) match their sources."""
    pytest.importorskip("jupytext")
    tool = ROOT / "tools" / "make_notebook.py"
    if not tool.exists():
        pytest.skip("no tools/make_notebook.py")
    r = subprocess.run([sys.executable, str(tool), "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_lost_kernel_info_reply_costs_seconds_and_a_restart(monkeypatch):
    """nbclient waits ``timeout`` for the kernel_info reply after the kernel starts (cell None)
    and ``timeout_func(cell)`` per cell. A lost reply once stalled a tutorial for the whole cell
    timeout: the harness gives that wait KERNEL_INFO_TIMEOUT_S, and starts the run again when it
    failed before any cell ran (no kernel here: the client is a stand-in)."""
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    seen = []

    class StandIn(nbclient.NotebookClient):
        def execute(self, **kw):
            cell = self.nb.cells[0]
            seen.append((self._get_timeout(None), self._get_timeout(cell)))
            self.code_cells_executed = 0
            if len(seen) == 1:                       # the first start: no reply, no cell ran
                raise AssertionError("kernel_info reply lost")
            self.code_cells_executed = len(self.nb.cells)
            return self.nb

    monkeypatch.setattr(nbclient, "NotebookClient", StandIn)
    path = NOTEBOOKS[0]
    monkeypatch.delitem(_EXECUTED, path, raising=False)
    run = execute_notebook(path)
    _EXECUTED.pop(path, None)                     # the real execution stays for the other tests
    assert run.error is None
    assert seen == [(KERNEL_INFO_TIMEOUT_S, CELL_TIMEOUT_S)] * 2
    assert KERNEL_INFO_TIMEOUT_S < CELL_TIMEOUT_S / 5
