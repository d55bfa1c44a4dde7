"""The README's pictures from the benchmarks: PNGs + the JSON numbers they were drawn from.

    python tools/make_figures.py                 # run the benches (full sizes: minutes on a CPU)
    python tools/make_figures.py --fast          # tiny sizes (seconds)
    python tools/make_figures.py --from DIR      # draw from JSON already written (see below)

Writes into ``--out`` (default docs/images/), for each figure NAME:

* ``NAME.json`` -- {"figure", "command", "machine", "fast", "rows": [...]}: the benchmark rows
  the picture shows (the same rows ``memlab bench ... --out`` writes);
* ``NAME.png``  -- the plotly figure of ``memlab.plots`` rendered to a standalone HTML page and
  screenshotted with headless Chromium (Playwright on /usr/bin/chromium; no kaleido).

``--from DIR`` reads ``DIR/NAME.json`` (either that format or a bare list of rows, e.g. from
``memlab bench reversible --out DIR/activation_depth.json``) instead of running the bench.

``shape(NAME, rows)`` is what ``tests/test_see_it.py`` compares between the committed JSON and a
fresh fast-mode run: which series exist and which way they go, never timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIGURES = ("activation_depth", "optimizer_state", "transducer_batch", "full_size_saving",
           "loss_curves")
# (memory strategy, optimizer) of the full-size bars: baseline first, the combination last
FULL_SIZE_COMBOS = (("vanilla", "adam"), ("reversible-full", "adam"),
                    ("vanilla", "adam8bit"), ("reversible-full", "adam8bit"))


# ----------------------------------------------------------------------------- the benches
def activation_depth_rows(fast: bool) -> List[dict]:
    from memlab.bench.reversible import run
    return run(fast=fast, steps=1, threads=1)       # memory is the figure; one timed step


def optimizer_state_rows(fast: bool) -> List[dict]:
    from memlab.bench import optim
    return optim._memory_rows(optim._shapes(fast))  # the state_bytes_per_param rows of run()


def transducer_batch_rows(fast: bool) -> List[dict]:
    from memlab.bench.transducer import METHODS, run
    if fast:
        # groups of ~3 utterances (the 64 MiB default would hold the whole tiny batch)
        return run(fast=True, batch_sizes=(2, 4, 8, 16), seconds=(2.0,), vocab_sizes=(32,),
                   repeats=0, max_chunk_bytes=2 ** 18, methods=METHODS)
    return run(batch_sizes=(4, 8, 16, 32, 64), seconds=(4.0,), vocab_sizes=(512,), repeats=0,
               methods=METHODS)


def full_size_rows(fast: bool) -> List[dict]:
    """DF-ResNet233 at batch 128 x 200 frames, 5,994 speakers (fast: a tiny ResNet at batch
    16), on fake tensors: each (strategy, optimizer) of ``FULL_SIZE_COMBOS``."""
    from memlab.bench.reversible import PAPER_MODELS
    from memlab.lab import Config, estimate_config

    model = "tiny-ResNet" if fast else "DF-ResNet233"
    arch, blocks = PAPER_MODELS[model]
    batch, frames, classes, width = (16 if fast else 128), 200, 5994, (8 if fast else 32)
    rows = []
    for memory, opt in FULL_SIZE_COMBOS:
        cfg = Config(task="speaker", model=arch, blocks=blocks, width=width, embed_dim=256,
                     batch_size=batch, memory=memory, optimizer=opt)
        est = estimate_config(cfg, frames=frames, num_classes=classes, steps=2)
        rows.append({"label": f"{memory}<br>{opt}", "model": model, "strategy": memory,
                     "optimizer_name": opt, "batch_size": batch, "frames": frames,
                     "num_classes": classes, "width": width, "peak_bytes": int(est.peak),
                     "peak_phase": est.peak_phase,
                     **{k: int(v) for k, v in est.breakdown().items()}})
    for r in rows:
        r["saving"] = rows[0]["peak_bytes"] / r["peak_bytes"]
    return rows


def loss_curves_rows(fast: bool) -> List[dict]:
    """One row per optimizer of memlab.bench.curves.loss_curves (200 steps, seed 0, one thread:
    a few seconds, so fast mode runs the full curves too): its losses and its gaps to fp32's."""
    import torch
    from memlab.bench.curves import curve_gaps, loss_curves
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        curves = loss_curves(200, 0)
    finally:
        torch.set_num_threads(before)
    rows = []
    for name, losses in curves.items():
        worst, at, final = curve_gaps(losses, curves["adam"])
        rows.append({"optimizer": name, "max_gap": worst, "at_step": at, "final_gap": final,
                     "losses": losses})
    return rows


RUNNERS: Dict[str, Callable[[bool], List[dict]]] = {
    "activation_depth": activation_depth_rows, "optimizer_state": optimizer_state_rows,
    "transducer_batch": transducer_batch_rows, "full_size_saving": full_size_rows,
    "loss_curves": loss_curves_rows}


def figure(name: str, rows: List[dict]):
    from memlab import plots
    return {"activation_depth": plots.activation_depth_figure,
            "optimizer_state": plots.state_bytes_figure,
            "transducer_batch": plots.transducer_batch_figure,
            "full_size_saving": plots.full_size_figure,
            "loss_curves": lambda rs: plots.loss_curves_figure(
                {r["optimizer"]: r["losses"] for r in rs})}[name](rows)


# ----------------------------------------------------------------------------- shape
def _rising(ys) -> bool:
    return all(b > a for a, b in zip(ys, ys[1:]))


def _flat(ys, tol: float = 0.15) -> bool:
    return min(ys) > 0 and max(ys) / min(ys) <= 1 + tol


def shape(name: str, rows: List[dict]) -> Dict[str, Any]:
    """What a figure says, independent of sizes and timings."""
    if name == "activation_depth":
        by: Dict[str, list] = {}
        for r in sorted(rows, key=lambda r: r["depth"]):
            by.setdefault(r["strategy"], []).append(r["activation_bytes"])
        deepest = {s: v[-1] for s, v in by.items()}
        return {"strategies": sorted(by), "vanilla_grows": _rising(by.get("vanilla", [])),
                "reversible_flat": _flat(by.get("reversible", [0])),
                "reversible_full_flat": _flat(by.get("reversible-full", [0])),
                "reversible_below_vanilla_at_depth": deepest.get("reversible", 1) <
                deepest.get("vanilla", 0)}
    if name == "optimizer_state":
        v = {r["subject"]: r["value"] for r in rows if r.get("measure") == "state_bytes_per_param"}
        return {"subjects": sorted(v),
                "8bit_at_most_30pct": all(v[s] <= 0.3 * v[s.replace("8bit", "")]
                                          for s in v if "8bit" in s),
                "adam_twice_sgd": v.get("adam", 0) > 1.5 * v.get("sgd", 1)}
    if name == "transducer_batch":
        by = {}
        for r in sorted(rows, key=lambda r: r["batch_size"]):
            by.setdefault(r["method"], []).append(r["peak_bytes"])
        return {"methods": sorted(by), "batched_grows": _rising(by.get("batched", [])),
                "samplewise_below_batched_at_largest":
                    by.get("samplewise", [1])[-1] < by.get("batched", [0])[-1]}
    if name == "full_size_saving":
        return {"combos": [[r["strategy"], r["optimizer_name"]] for r in rows],
                "combined_is_smallest": rows[-1]["peak_bytes"] == min(r["peak_bytes"]
                                                                      for r in rows),
                "combined_saves": rows[0]["peak_bytes"] > rows[-1]["peak_bytes"]}
    if name == "loss_curves":
        gap = {r["optimizer"]: r["max_gap"] for r in rows}
        return {"optimizers": sorted(gap),
                "within_5pct": sorted(k for k, g in gap.items() if g < 0.05),
                "nearest_trails_dither": gap.get("adam4bit nearest", 0) > 5 * gap.get(
                    "adam4bit", 1)}
    raise ValueError(f"name must be one of {FIGURES}, got {name!r}")


# ----------------------------------------------------------------------------- main
def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {"rows": data}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="tiny sizes (also MEMLAB_FAST=1)")
    p.add_argument("--from", dest="src", help="read DIR/NAME.json instead of running benches")
    p.add_argument("--out", default=str(ROOT / "docs" / "images"))
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(FIGURES)}")
    p.add_argument("--no-png", action="store_true", help="JSON only (no Chromium needed)")
    a = p.parse_args(argv)
    from memlab import fast_mode
    fast = a.fast or fast_mode()
    names = [n.strip() for n in a.only.split(",")] if a.only else list(FIGURES)
    for n in names:
        if n not in FIGURES:
            p.error(f"--only must name figures of {FIGURES}, got {n!r}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        t0 = time.perf_counter()
        if a.src:
            data = _load(Path(a.src) / f"{name}.json")
        else:
            data = {"figure": name, "fast": fast,
                    "command": "python tools/make_figures.py" + (" --fast" if fast else ""),
                    "machine": machine(), "rows": RUNNERS[name](fast)}
        data["shape"] = shape(name, data["rows"])
        (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        if not a.no_png:
            from memlab.plots import write_png
            write_png(figure(name, data["rows"]), out / f"{name}.png")
        print(f"{name}: {out / name}.json/.png ({time.perf_counter() - t0:.0f} s) "
              f"{data['shape']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
