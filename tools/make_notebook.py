"""Build tutorial notebooks from Python sources in the "percent" format (no outputs).

    python tools/make_notebook.py                      # tools/notebooks/*.py -> notebooks/*.ipynb
    python tools/make_notebook.py --check              # exit 1 if a notebook is out of date
    python tools/make_notebook.py tools/notebooks/00_where_memory_goes.py

Source format: cells start with a ``# %%`` line; ``# %% [markdown]`` starts a markdown cell whose
lines are comments (``# `` is stripped); ``# %% tags=["parameters"]`` tags a code cell. Text
before the first marker is ignored (a module docstring for the file itself).

Why a source file: reviews see plain diffs and the committed notebook has no outputs and no
execution counts by construction.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import List

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "tools" / "notebooks"
DEST = ROOT / "notebooks"
_MARK = re.compile(r"^# %%(?P<rest>.*)$")


def parse(text: str) -> List[nbformat.NotebookNode]:
    cells, kind, meta, lines = [], None, {}, []

    def flush():
        if kind is None:
            return
        body = list(lines)
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        if kind == "markdown":
            body = [re.sub(r"^# ?", "", ln) for ln in body]
            cells.append(nbformat.v4.new_markdown_cell("\n".join(body)))
        else:
            cell = nbformat.v4.new_code_cell("\n".join(body))
            if meta.get("tags"):
                cell.metadata["tags"] = meta["tags"]
            cells.append(cell)

    for line in text.splitlines():
        m = _MARK.match(line)
        if m:
            flush()
            rest = m.group("rest").strip()
            kind = "markdown" if rest.startswith("[markdown]") else "code"
            meta, lines = {}, []
            t = re.search(r"tags\s*=\s*(\[.*?\])", rest)
            if t:
                meta["tags"] = json.loads(t.group(1))
            continue
        if kind is not None:
            lines.append(line)
    flush()
    return cells


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = parse(src.read_text())
    for i, cell in enumerate(nb.cells):   # stable ids: diffs stay small between rebuilds
        cell["id"] = f"{src.stem[:40]}-{i:02d}".replace("_", "-")
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                       "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(nb)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


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
        text = render(build(src))
        if args.check:
            if not out.exists() or out.read_text() != text:
                stale.append(out)
            continue
        out.write_text(text)
        print(f"wrote {out.relative_to(ROOT)} ({len(build(src).cells)} cells)")
    if stale:
        print("out of date (run python tools/make_notebook.py): "
              + ", ".join(str(s.relative_to(ROOT)) for s in stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
