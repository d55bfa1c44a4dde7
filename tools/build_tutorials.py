"""Execute the tutorials and export them as offline HTML: figures drawn, no kernel, no network.

    python tools/build_tutorials.py --fast                 # every notebook, tiny sizes
    python tools/build_tutorials.py --only 00,03 --fast    # a subset (names or number prefixes)
    # -> build/tutorials/<name>.html

A copy of each notebooks/*.ipynb is executed (nbclient, the python3 kernel, MEMLAB_FAST=1 with
--fast or when it is set), the committed notebook is never changed. Two cells are added to the
copy only:

* first, ``pio.renderers.default = "notebook"``: every plotly figure's output then carries
  text/html, with plotly.js embedded once (in the first figure's cell), so the HTML draws and
  zooms without a kernel or a CDN;
* after each cell that calls ``<name>.run(block=True ...)`` on a dashboard,
  ``memlab.plots.snapshot(<name>)``: static copies of its bars, timeline and curves, which
  widgets (the live dashboard) cannot show in exported HTML.

The export (nbconvert HTMLExporter, lab template) leaves out what it would fetch: require.js,
MathJax (formulas stay as TeX), mermaid and the widget manager; widget outputs show their text.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "tutorials"
TIMEOUT_S = 900
RENDERER_CELL = ('import plotly.io as pio  # added by tools/build_tutorials.py: figures as\n'
                 'pio.renderers.default = "notebook"  # text/html with plotly.js, offline')
RUN_BLOCK = re.compile(r"^\s*(?:\w+\s*=\s*)?(?:\w+\[[^\]]*\]\s*=\s*)?(\w+)\.run\(\s*block\s*=\s*True",
                       re.M)
CDN_SCRIPT = re.compile(r'<script[^>]*\ssrc="https?://[^"]*"[^>]*>\s*</script>', re.I)
# the lab template without the scripts it would load from a CDN
OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
"""


def prepare(nb, renderer: str = "notebook"):
    """The copy to execute: the renderer cell first, a snapshot after each blocking run.
    ``renderer``: plotly's (the test suite passes "plotly_mimetype+notebook" so the figure check
    still finds each figure's JSON beside the offline HTML)."""
    import nbformat

    nb = copy.deepcopy(nb)
    cells = [nbformat.v4.new_code_cell(RENDERER_CELL.replace('"notebook"', f'"{renderer}"'))]
    for cell in nb.cells:
        cells.append(cell)
        if cell.cell_type != "code":
            continue
        names = list(dict.fromkeys(RUN_BLOCK.findall(cell.source)))
        for name in names:
            cells.append(nbformat.v4.new_code_cell(
                "from memlab.plots import snapshot  # added by tools/build_tutorials.py\n"
                f"if hasattr({name}, 'fig_breakdown'):\n    snapshot({name});"))
    nb.cells = cells
    return nb


def offline(nb) -> None:
    """Drop the MathJax <script src=cdn> plotly's notebook renderer puts in every figure's
    output (plotly.js itself is inline)."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "text/html" in data:
                html = data["text/html"]
                html = "".join(html) if isinstance(html, list) else html
                data["text/html"] = CDN_SCRIPT.sub("", html)


def exporter():
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    return HTMLExporter(extra_loaders=[DictLoader({"memlab_offline.html.j2": OFFLINE_TEMPLATE})],
                        template_file="memlab_offline.html.j2")


def build(path: Path, out: Path, fast: bool, timeout: int = TIMEOUT_S) -> Path:
    """Execute ``path`` (a copy) and write ``out/<stem>.html``; raises on a failing cell."""
    import nbclient
    import nbformat

    nb = prepare(nbformat.read(path, as_version=4))
    env = {"MEMLAB_FAST": "1"} if fast else {}
    env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    pythonpath = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    old = {k: os.environ.get(k) for k in (*env, "PYTHONPATH")}
    os.environ.update(env, PYTHONPATH=pythonpath)   # the kernel inherits this environment
    try:
        with tempfile.TemporaryDirectory(prefix="memlab-tutorial-") as cwd:
            nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    allow_errors=False, store_widget_state=False,
                                    resources={"metadata": {"path": cwd}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    offline(nb)
    body, _ = exporter().from_notebook_node(nb)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{path.stem}.html"
    target.write_text(body, encoding="utf-8")
    return target


def select(only: Optional[str]) -> List[Path]:
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if not only:
        return nbs
    keys = [k.strip() for k in only.split(",") if k.strip()]
    picked = [nb for nb in nbs if any(nb.stem == k or nb.name == k or nb.stem.startswith(k)
                                      for k in keys)]
    missing = [k for k in keys if not any(nb.stem.startswith(k) or nb.name == k
                                          for nb in picked)]
    if missing:
        raise SystemExit(f"build_tutorials: --only must name notebooks of "
                         f"{[nb.stem for nb in nbs]}, got {missing}")
    return picked


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="tiny sizes (also MEMLAB_FAST=1)")
    p.add_argument("--only", help="comma-separated notebook names or prefixes (e.g. 00,03)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per cell")
    a = p.parse_args(argv)
    fast = a.fast or os.environ.get("MEMLAB_FAST", "") not in ("", "0")
    for nb in select(a.only):
        t0 = time.perf_counter()
        target = build(nb, Path(a.out), fast, a.timeout)
        print(f"{nb.name} -> {target} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
