"""Build the tutorial notebooks from their jupytext sources (percent format, no outputs).

    python tools/make_notebook.py                      # tools/notebooks/*.py -> notebooks/*.ipynb
    python tools/make_notebook.py --check              # exit 1 if a notebook is out of date
    python tools/make_notebook.py tools/notebooks/00_where_memory_goes.py

The sources are jupytext percent files (``# %%`` code cells, ``# %% [markdown]`` text cells,
``# %% tags=["parameters"]``; the YAML header holds the kernelspec), so jupytext does the
conversion. This wrapper adds what jupytext leaves to the caller: stable cell ids
(``<notebook>-<nn>``, so a rebuild does not churn the .ipynb files), no jupytext metadata in the
notebook (it is not paired: the .py is the source, the .ipynb is built), and ``--check``.

Why a source file: reviews see plain diffs, and the committed notebook has no outputs and no
execution counts by construction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "tools" / "notebooks"
DEST = ROOT / "notebooks"


def build(src: Path) -> nbformat.NotebookNode:
    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata.pop("jupytext", None)
    for i, cell in enumerate(nb.cells):   # stable ids: diffs stay small between rebuilds
        cell["id"] = f"{src.stem[:40]}-{i:02d}".replace("_", "-")
    nbformat.validate(nb)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return jupytext.writes(nb, fmt="ipynb") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="*", type=Path, help="percent-format .py files "
                   "(default: tools/notebooks/*.py)")
    p.add_argument("--check", action="store_true", help="only check that notebooks are current")
    args = p.parse_args(argv)
    sources = args.sources or sorted(SRC.glob("*.py"))
    stale = []
    for src in sources:
        out = DEST / f"{src.stem}.ipynb"
        nb = build(src)
        text = render(nb)
        if args.check:
            if not out.exists() or out.read_text() != text:
                stale.append(out)
            continue
        out.write_text(text)
        print(f"wrote {out.relative_to(ROOT)} ({len(nb.cells)} cells)")
    if stale:
        print("out of date (run python tools/make_notebook.py): "
              + ", ".join(str(s.relative_to(ROOT)) for s in stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
