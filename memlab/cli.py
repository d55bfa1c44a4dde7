"""memlab command line: ``memlab compare | bench | lab | data``.

    memlab compare --task speaker --optimizer adam,adam8bit      # train side by side, print a table
    memlab bench optim --json                                    # a technique's measurements
    memlab lab                                                   # JupyterLab on the tutorials
    memlab data --task asr --out corpus/                         # write a synthetic corpus as wavs
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import secrets
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from memlab import registry
from memlab.memory import CATEGORIES, format_bytes


# ----------------------------------------------------------------------------- tables
def format_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """Plain-text table of dict rows (bytes columns ending in '_bytes' are humanised)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(k, v):
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.4g}"
        if isinstance(v, int) and (k.endswith("bytes") or k in CATEGORIES or k == "peak"):
            return format_bytes(v)
        return str(v)

    body = [[cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    out = [line, sep] + ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(out)


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr,
                    disable=not sys.stderr.isatty() and os.environ.get("MEMLAB_PROGRESS") != "1")
    except ImportError:  # pragma: no cover - tqdm is in the lab extra
        class _Null:
            def update(self, n=1): pass
            def set_postfix_str(self, s): pass
            def close(self): pass
        return _Null()


# ----------------------------------------------------------------------------- compare
def _split(value: Optional[str]) -> List[Optional[str]]:
    return [None] if value is None else [v.strip() for v in value.split(",") if v.strip()]


def run_compare(task: str, overrides: Dict[str, Any], memory=None, optimizer=None, loss=None,
                progress: bool = True) -> List[Dict[str, Any]]:
    """Train every combination of the given strategies; one summary row per run."""
    from memlab.lab import Config, Experiment

    combos = list(itertools.product(_split(memory), _split(optimizer), _split(loss)))
    rows = []
    for i, (mem, opt, los) in enumerate(combos):
        kw = dict(overrides)
        for k, v in (("memory", mem), ("optimizer", opt), ("loss", los)):
            if v is not None:
                kw[k] = v
        cfg = Config.for_task(task, eval_at_start=(i == 0), **kw).validate()
        exp = Experiment(cfg)
        bar = _progress(cfg.steps, f"[{i + 1}/{len(combos)}] {cfg.label}") if progress else None
        untrained = None
        for rec in exp.run():
            if rec.step == 0:
                untrained = rec.metrics
                continue
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {rec.loss:.3f}")
        if bar is not None:
            bar.close()
        recs = [r for r in exp.records if r.step > 0]
        metered = [r for r in recs if r.metered]
        # steady state: the highest peak, the latest step on ties (optimizer state exists by then)
        peak_rec = max(reversed(metered), key=lambda r: r.peak)
        plain = [r.seconds for r in recs if not r.metered and r.step > 1] or \
                [r.seconds for r in recs]
        final = recs[-1].metrics or {}
        row: Dict[str, Any] = {"run": cfg.label, "peak": peak_rec.peak}
        row.update(peak_rec.breakdown)
        row["step_s"] = statistics.median(plain)
        row["final_loss"] = recs[-1].loss
        for k, v in final.items():
            row[k] = v
        if untrained:
            for k, v in untrained.items():
                row[f"untrained_{k}"] = v
        row["config"] = {k: v for k, v in vars(cfg).items() if k != "optimizer_kwargs"}
        rows.append(row)
    return rows


def _cmd_compare(args) -> int:
    overrides: Dict[str, Any] = {}
    for name in ("steps", "batch_size", "depth", "width", "seed", "device", "model", "lr",
                 "eval_every"):
        v = getattr(args, name)
        if v is not None:
            overrides[name] = v
    try:
        rows = run_compare(args.task, overrides, args.memory, args.optimizer, args.loss,
                           progress=not args.json)
    except (ValueError, TypeError) as e:
        print(f"memlab compare: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    metric_cols = [c for c in ("accuracy", "eer", "min_dcf", "ter", "untrained_eer",
                               "untrained_ter") if c in rows[0]]
    cols = ["run", "peak", *CATEGORIES, "step_s", "final_loss", *metric_cols]
    print(format_table(rows, cols))
    if args.task == "speaker":
        print("\neer: equal error rate on unseen speakers (chance = 0.5); accuracy: held-out "
              "utterances of training speakers; bytes at the peak of a metered step")
    else:
        print("\nter: token error rate with greedy decoding (untrained_ter: before training)")
    return 0


# ----------------------------------------------------------------------------- bench
def _cmd_bench(args) -> int:
    import importlib
    from memlab.bench import BENCHMARKS
    if args.name not in BENCHMARKS:
        print(f"memlab bench: error: name must be one of {BENCHMARKS}, got {args.name!r}",
              file=sys.stderr)
        return 2
    mod = importlib.import_module(f"memlab.bench.{args.name}")
    fast = args.fast or os.environ.get("MEMLAB_FAST", "") not in ("", "0")
    kwargs = {}
    if args.preset:
        kwargs["preset"] = args.preset
    rows = mod.run(fast=fast, **kwargs)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print((mod.__doc__ or "").strip().splitlines()[0])
        print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------- lab
def notebooks_source() -> Path:
    """Where the bundled tutorials live (source checkout or installed package)."""
    from importlib import resources
    return Path(str(resources.files("memlab.notebooks")))


def _cmd_lab(args) -> int:
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        print('memlab lab needs JupyterLab: pip install "memlab[lab]"', file=sys.stderr)
        return 2
    src = notebooks_source()
    dest = Path(args.dir).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for nb in sorted(src.glob("*.ipynb")):
        target = dest / nb.name
        if target.exists() and not args.overwrite:
            continue
        shutil.copyfile(nb, target)
        copied.append(nb.name)
    print(f"memlab lab: tutorials in {dest}" + (f" (copied {len(copied)})" if copied else
                                                 " (kept your copies; --overwrite to refresh)"))
    token = secrets.token_hex(24)
    url = f"http://127.0.0.1:{args.port}/lab/tree/00_where_memory_goes.ipynb?token={token}"
    # `python -m jupyterlab` is the server itself (not a launcher), so Ctrl+C stops it
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={dest}",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={args.port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}"]
    if args.no_browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers often run as root; Jupyter refuses otherwise
    print(f"memlab lab: open this address in your browser (Ctrl+C stops the server):\n  {url}",
          flush=True)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


# ----------------------------------------------------------------------------- data
def _cmd_data(args) -> int:
    from memlab.data import SpeakerCorpus, TokenCorpus
    from memlab.data.manifest import write_corpus
    if args.task == "speaker":
        ds = SpeakerCorpus(args.num_speakers, args.utts, seconds=args.seconds, seed=args.seed)
    else:
        ds = TokenCorpus(args.utts * args.num_speakers, vocab_size=args.vocab_size, seed=args.seed)
    path = write_corpus(ds, args.out)
    print(f"memlab data: wrote {len(ds)} utterances and {path}")
    return 0


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    mem = ", ".join(registry.names("memory"))
    opt = ", ".join(registry.names("optimizer"))
    los = ", ".join(registry.names("loss"))
    p = argparse.ArgumentParser(
        prog="memlab",
        description="memlab: a hands-on lab for memory-efficient training of speech models.",
        epilog="Start with:  memlab compare --task speaker   (a minute or two on a laptop CPU)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "compare", help="train configurations side by side and print memory, time and accuracy",
        description="Train a small real model once per strategy combination (comma-separated "
                    "lists are crossed) and print a table: peak memory and its breakdown "
                    "(parameters, gradients, optimizer state, activations, other), median step "
                    "time, and the final metric (speaker: EER on unseen speakers; asr: token "
                    "error rate).",
        epilog="example: memlab compare --task speaker --memory vanilla,reversible "
               "--optimizer adam,adam8bit")
    c.add_argument("--task", choices=("speaker", "asr"), default="speaker",
                   help="speaker verification (ResNet) or transducer ASR (default: speaker)")
    c.add_argument("--memory", help=f"activation strategies, comma-separated: {mem}")
    c.add_argument("--optimizer", help=f"optimizers, comma-separated: {opt}")
    c.add_argument("--loss", help=f"transducer losses (asr), comma-separated: {los}")
    c.add_argument("--model", help="speaker: resnet | dfresnet")
    c.add_argument("--steps", type=int, help="training steps per run")
    c.add_argument("--batch-size", dest="batch_size", type=int, help="utterances per step")
    c.add_argument("--depth", type=int, help="blocks per stage (speaker) / encoder layers (asr)")
    c.add_argument("--width", type=int, help="base channels (speaker) / model dim (asr)")
    c.add_argument("--lr", type=float, help="learning rate (default: the optimizer's own)")
    c.add_argument("--eval-every", dest="eval_every", type=int, help="steps between evaluations")
    c.add_argument("--seed", type=int)
    c.add_argument("--device", help="cpu (default) or cuda")
    c.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    c.set_defaults(func=_cmd_compare)

    b = sub.add_parser("bench", help="measure one technique side by side (table or JSON)",
                       description="Benchmarks: reversible (activation peak and step time vs "
                                   "depth), optim (state bytes/param, step time, quantization "
                                   "error), transducer (batched vs sample-wise loss), lowrank "
                                   "(personalization study).")
    b.add_argument("name", help="reversible | optim | transducer | lowrank")
    b.add_argument("--fast", action="store_true", help="tiny sizes (also MEMLAB_FAST=1)")
    b.add_argument("--preset", help="a named workload (transducer: paper)")
    b.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    b.add_argument("--out", help="also write the JSON rows to this file")
    b.set_defaults(func=_cmd_bench)

    l = sub.add_parser("lab", help="start JupyterLab on the tutorials (localhost, token on)",
                       description="Copy the bundled tutorials into --dir (your copies are kept) "
                                   "and start JupyterLab on 127.0.0.1 with a fresh token.")
    l.add_argument("--dir", default="memlab-notebooks", help="working folder (default: "
                   "./memlab-notebooks)")
    l.add_argument("--port", type=int, default=8888)
    l.add_argument("--no-browser", action="store_true", help="do not open a browser")
    l.add_argument("--overwrite", action="store_true", help="refresh tutorials in --dir")
    l.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    l.set_defaults(func=_cmd_lab)

    d = sub.add_parser("data", help="write a synthetic corpus as 16 kHz wavs + a manifest",
                       description="Write a synthetic corpus (deterministic from --seed) as wav "
                                   "files and a JSON-lines manifest that the data_scripts' "
                                   "format shares.")
    d.add_argument("--task", choices=("speaker", "asr"), default="speaker")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--num-speakers", dest="num_speakers", type=int, default=10)
    d.add_argument("--utts", type=int, default=10, help="utterances per speaker")
    d.add_argument("--seconds", type=float, default=2.0)
    d.add_argument("--vocab-size", dest="vocab_size", type=int, default=12)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_data)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
