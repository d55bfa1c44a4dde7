"""memlab command line: ``memlab compare | plan | bench | lab | data`` (``lab``: memlab.labserver).

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
import statistics
import subprocess  # noqa: F401  (tests patch memlab.cli.subprocess.call)
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from memlab import fast_mode, tasks
from memlab import techniques as tech
from memlab.memory import CATEGORIES, format_bytes
from memlab.report import format_table  # noqa: F401  (re-exported: memlab.cli.format_table)


# ----------------------------------------------------------------------------- tables
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
def _split(value: Optional[str], name: str = "value") -> List[Optional[str]]:
    """None -> [None] (the config's default); "a,b" -> ["a", "b"]; "" or "," is a mistake."""
    if value is None:
        return [None]
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"{name} must name at least one choice (comma-separated), got {value!r}")
    return items


def _train_set_size(cfg) -> int:
    """Utterances in the training set Experiment builds (it clamps larger batches to this)."""
    return tasks.get(cfg.task).train_set_size(cfg)


def _kind_option(kind: str) -> str:
    """The argparse dest of ``--<kind>``."""
    return "kind_" + kind.replace("-", "_")


def compare_configs(task: str, overrides: Dict[str, Any], memory=None, optimizer=None,
                    loss=None, choices: Optional[Dict[str, Optional[str]]] = None) -> list:
    """The validated Configs of every technique combination (raises ValueError/TypeError).

    ``choices``: kind -> comma-separated names (None: the config's default), for any registered
    kind; ``memory`` / ``optimizer`` / ``loss`` are the same for those three kinds. The lists
    are crossed over every kind, in ``memlab.techniques.kinds()`` order."""
    from memlab.lab import FIELD_KINDS, Config

    tasks.get(task)                             # ValueError naming the tasks
    given = dict(choices or {})
    for kind, v in (("memory", memory), ("optimizer", optimizer), ("loss", loss)):
        if v is not None:
            given[kind] = v
    kinds = tech.kinds()
    for kind, v in given.items():
        if kind not in kinds:
            raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
        if v is not None and not tech.applies(kind, task):
            owners = " or ".join(f"task={t!r}" for t in tasks.names() if tech.applies(kind, t))
            raise ValueError(f"{kind} applies to {owners or 'no task'} only (the {task} task has "
                             f"no {kind} technique), got {kind}={v!r}")
    combos = list(itertools.product(*(_split(given.get(k), k) for k in kinds)))
    cfgs = []
    for i, combo in enumerate(combos):
        kw = dict(overrides)
        named = dict(kw.pop("techniques", None) or {})
        for kind, v in zip(kinds, combo):
            if v is None:
                continue
            if kind in FIELD_KINDS:
                kw[kind] = v
            else:
                named[kind] = v
        if named:
            kw["techniques"] = named
        cfg = Config.for_task(task, eval_at_start=(i == 0), **kw).validate()
        n = _train_set_size(cfg)
        if cfg.batch_size > n:  # Experiment would silently train on batches of n instead
            raise ValueError(f"batch_size must be <= the training set ({n} utterances), got "
                             f"{cfg.batch_size}")
        cfgs.append(cfg)
    return cfgs


def _available_memory(device) -> Tuple[Optional[int], str]:
    """Bytes free for a new run on ``device`` and where the figure comes from (None: unknown)."""
    import torch
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free), "free on " + str(dev)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    try:  # other POSIX systems
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def _estimated_peak(cfg) -> Tuple[Optional[int], bool]:
    """(bytes, exact): estimate_config's steady-state peak; where the step cannot run on fake
    tensors (the transducer reads its lengths), the parameters, gradients and optimizer state
    alone, a lower bound (exact=False)."""
    from memlab.lab import build_model, build_optimizer, estimate_config
    from memlab.memory import estimate
    try:
        return estimate_config(cfg, steps=2).peak, True
    except NotImplementedError:
        pass

    def setup():
        model = build_model(cfg)
        return model, build_optimizer(cfg, model)

    def step(model, opt):
        import torch
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    try:
        return estimate(step, setup, steps=2, device=cfg.device).peak, False
    except NotImplementedError:
        return None, False


def check_memory(cfgs) -> None:
    """Raise ValueError when a run's estimated peak exceeds the memory available now."""
    import torch
    for cfg in cfgs:
        need, exact = _estimated_peak(cfg)
        have, where = _available_memory(cfg.device)
        if need is None or have is None:
            continue
        if cfg.parallel != "none" and torch.device(cfg.device).type == "cpu":
            need *= cfg.nproc            # a per-rank figure: the local ranks share the host
        if need > have:
            what = (f"an estimated {format_bytes(need)}" if exact else
                    f"at least {format_bytes(need)} (parameters, gradients and optimizer state "
                    f"alone)")
            raise ValueError(f"run {cfg.label!r} needs {what} but "
                             f"{format_bytes(have)} available ({where}); lower --width, --depth or "
                             f"--batch-size, or pass --force to run anyway")


def _run_one(cfg, index: int, total: int, progress: bool = True,
             keep: Optional[list] = None) -> Dict[str, Any]:
    """Train one Config; its summary row. ``keep``: a list to append ``(cfg, records)`` to
    (for ``--plot``)."""
    from memlab.lab import Experiment, peak_record

    from memlab import parallel
    if parallel.launches(cfg):            # --nproc N: N local ranks train it, rank 0's row
        return parallel.run_one(cfg, index, total, progress)
    exp = Experiment(cfg)
    bar = _progress(cfg.steps, f"[{index + 1}/{total}] {cfg.label}") if progress else None
    untrained = None
    try:
        for rec in exp.run():
            if rec.step == 0:
                untrained = rec.metrics
                continue
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {rec.loss:.3f}")
    finally:
        if bar is not None:
            bar.close()
    if keep is not None:
        keep.append((cfg, exp.records))
    recs = [r for r in exp.records if r.step > 0]
    metered = [r for r in recs if r.metered]
    peak_rec = peak_record(recs)          # the highest metered peak, the latest on ties
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
    if cfg.parallel != "none":            # the mode in the label, every rank's peak
        row = parallel.summarize(row, recs)
    return row


def run_compare(task: str, overrides: Dict[str, Any], memory=None, optimizer=None, loss=None,
                progress: bool = True,
                choices: Optional[Dict[str, Optional[str]]] = None) -> List[Dict[str, Any]]:
    """Train every combination of the given techniques; one summary row per run."""
    cfgs = compare_configs(task, overrides, memory, optimizer, loss, choices)
    return [_run_one(cfg, i, len(cfgs), progress) for i, cfg in enumerate(cfgs)]


def _print_rows(rows, task: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        return
    t = tasks.get(task)
    metric_cols = [c for c in (*t.metrics, f"untrained_{t.headline}") if c in rows[0]]
    cols = ["run", "peak", *CATEGORIES, "step_s", "final_loss", *metric_cols]
    if any("rank_peaks" in r for r in rows):      # --nproc N: each rank's own peak
        cols.insert(2, "rank_peaks")
    print(format_table(rows, cols))
    print("\n" + t.note)


def _cmd_compare(args) -> int:
    overrides: Dict[str, Any] = {}
    for name in ("steps", "batch_size", "depth", "width", "seed", "device", "model", "lr",
                 "eval_every", "nproc", "parallel", "sync_bn"):
        v = getattr(args, name)
        if v is not None:
            overrides[name] = v
    if overrides.get("nproc", 1) > 1 and "parallel" not in overrides:
        overrides["parallel"] = "ddp"
    # every combination is validated (and its memory checked) before the first run starts
    choices = {kind: getattr(args, _kind_option(kind)) for kind in tech.kinds()}
    scenario = getattr(args, "scenario", None)
    if scenario is not None:      # memlab.scenarios: its sizes and comparison (--<kind> overrides)
        from memlab import scenarios
        scenarios.check_task(scenario, args.task)
        cfgs = scenarios.configs(scenario, choices, **overrides)
        args.task = cfgs[0].task
    else:
        args.task = args.task or "speaker"
        cfgs = compare_configs(args.task, overrides, choices=choices)
    if not args.force:
        check_memory(cfgs)
    if args.plot:
        _check_writable(args.plot, "--plot")   # before runs that may take minutes
    rows: List[Dict[str, Any]] = []
    kept: List[Any] = []                       # (cfg, records) of each run, for --plot
    try:
        for i, cfg in enumerate(cfgs):
            rows.append(_run_one(cfg, i, len(cfgs), progress=not args.json, keep=kept))
    except KeyboardInterrupt:
        _print_rows(rows, args.task, args.json)
        print(f"memlab compare: interrupted after {len(rows)} of {len(cfgs)} runs",
              file=sys.stderr)
        return 130
    except FloatingPointError as e:  # the loss diverged: a learning rate too high for the run
        _print_rows(rows, args.task, args.json)
        print(f"memlab compare: error: {e}", file=sys.stderr)
        return 1
    if scenario is not None:      # the saving against the scenario's baseline, live
        for row, r in zip(rows, scenarios.ratios(scenario, rows, cfgs)):
            row["vs_baseline"] = r
    _print_rows(rows, args.task, args.json)
    if scenario is not None and not args.json:   # ... and at its full-size twin
        print("\n" + scenarios.report(scenario, rows, cfgs))
    if args.plot:
        from memlab import plots
        plots.write_compare_html(args.plot, kept, rows, args.task)
        print(f"memlab compare: wrote {args.plot}", file=sys.stderr)
    return 0


def _cmd_plan(args) -> int:
    from memlab import planner
    return planner.command(args)


# ----------------------------------------------------------------------------- bench
def _check_writable(path: str, flag: str = "--out") -> None:
    """Raise ValueError unless ``path`` can be written as a file (leaves nothing behind)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} must name a file, got the folder {path!r}")
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path!r} cannot be written ({e.strerror or e})") from None
    if not existed:
        p.unlink()


def _cmd_bench(args) -> int:
    import importlib
    import inspect
    from memlab.bench import BENCHMARKS
    if args.name not in BENCHMARKS:
        raise ValueError(f"name must be one of {BENCHMARKS}, got {args.name!r}")
    mod = importlib.import_module(f"memlab.bench.{args.name}")
    fast = args.fast or fast_mode()
    kwargs = {}
    if args.preset is not None:
        if "preset" not in inspect.signature(mod.run).parameters:
            with_presets = [n for n in BENCHMARKS if "preset" in inspect.signature(
                importlib.import_module(f"memlab.bench.{n}").run).parameters]
            raise ValueError(f"preset: bench {args.name} has no presets (--preset applies to "
                             f"{', '.join(with_presets)}), got {args.preset!r}")
        kwargs["preset"] = args.preset
    if args.out:
        _check_writable(args.out)  # before a benchmark that may take minutes
    if args.plot:
        _check_writable(args.plot, "--plot")
    rows = mod.run(fast=fast, **kwargs)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print((mod.__doc__ or "").strip().splitlines()[0])
        print(format_table(rows))
    if args.out:
        try:
            Path(args.out).write_text(json.dumps(rows, indent=2, default=str))
        except OSError as e:
            print(f"memlab bench: error: could not write --out {args.out!r} "
                  f"({e.strerror or e})", file=sys.stderr)
            return 1
    if args.plot:
        from memlab import plots
        plots.write_html(plots.bench_figures(args.name, rows), args.plot,
                         title=f"memlab bench {args.name}", text=format_table(rows))
        print(f"memlab bench: wrote {args.plot}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- lab
from memlab.labserver import (APP_NOTEBOOK, APP_SOURCE, LAB_DISABLED_PLUGINS,  # noqa: E402,F401
                              LAB_OFFLINE_ARGS, _cmd_app, _cmd_lab, app_launch, lab_launch,
                              notebooks_source)


# ----------------------------------------------------------------------------- data
def _cmd_data(args) -> int:
    from memlab.data.manifest import write_corpus
    checks = (("num-speakers", args.num_speakers, 2), ("utts", args.utts, 1),
              ("vocab-size", args.vocab_size, 3), ("seed", args.seed, 0))
    for flag, v, lo in checks:
        if v < lo:
            raise ValueError(f"--{flag} must be >= {lo}, got {v}")
    if not (math.isfinite(args.seconds) and 0.1 <= args.seconds <= 60):
        raise ValueError(f"--seconds must be between 0.1 and 60, got {args.seconds}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out must be a folder, got the file {args.out!r}")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"--out {args.out!r} is not empty; choose a new folder or pass --force "
                         f"to write into it (an earlier corpus's wav/ files are replaced)")
    ds = tasks.get(args.task).corpus(args.num_speakers, args.utts, args.seconds,
                                     args.vocab_size, args.seed)
    path = write_corpus(ds, out)
    # with --force: wavs of an earlier, larger corpus (the names write_corpus uses) must not
    # sit beside a manifest that no longer lists them
    keep = {f"{i:06d}.wav" for i in range(len(ds))}
    stale = [f for f in (out / "wav").glob("[0-9][0-9][0-9][0-9][0-9][0-9].wav")
             if f.name not in keep]
    for f in stale:
        f.unlink()
    print(f"memlab data: wrote {len(ds)} utterances and {path}" +
          (f" (removed {len(stale)} stale wavs)" if stale else ""))
    return 0


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memlab",
        description="memlab: a hands-on lab for memory-efficient training of speech models.",
        epilog="Start with:  memlab compare --task speaker   (a minute or two on a laptop CPU).  "
               "A mistake prints one line; MEMLAB_DEBUG=1 shows the traceback.")
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
    from memlab import scenarios
    c.add_argument("--task", choices=tasks.names(), default=None,
                   help="speaker verification (ResNet) or transducer ASR (default: speaker, "
                        "or the scenario's)")
    c.add_argument("--scenario", help=f"a named preset whose sizes reach a technique's regime "
                   f"(runs its comparison; --<kind> options override it): "
                   f"{', '.join(scenarios.names())}")
    for kind in tech.kinds():             # one option per registered kind
        what = tech.kind(kind).description or f"{kind} techniques"
        c.add_argument(f"--{kind}", dest=_kind_option(kind),
                       help=f"{what}, comma-separated: {', '.join(tech.names(kind))}")
    c.add_argument("--model", help="speaker: resnet | dfresnet")
    c.add_argument("--steps", type=int, help="training steps per run")
    c.add_argument("--batch-size", dest="batch_size", type=int, help="utterances per step")
    c.add_argument("--depth", type=int, help="blocks per stage (speaker) / encoder layers (asr)")
    c.add_argument("--width", type=int, help="base channels (speaker) / model dim (asr)")
    c.add_argument("--lr", type=float, help="learning rate (default: the optimizer's own)")
    c.add_argument("--eval-every", dest="eval_every", type=int, help="steps between evaluations")
    c.add_argument("--seed", type=int)
    c.add_argument("--device", help="cpu (default) or cuda")
    c.add_argument("--nproc", type=int, help="data-parallel ranks (gloo on CPU, NCCL on CUDA): "
                   "the global --batch-size split across them (default 1)")
    c.add_argument("--parallel", choices=("ddp", "fsdp2"),
                   help="data-parallel mode with --nproc (default: ddp)")
    c.add_argument("--sync-bn", dest="sync_bn", action="store_const", const=True,
                   help="with --parallel: BatchNorm statistics of the global batch")
    c.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    c.add_argument("--plot", metavar="FILE", help="also write the dashboard's figures (peak "
                   "breakdown, timeline, loss and metric curves) to a standalone offline HTML file")
    c.add_argument("--force", action="store_true",
                   help="run even when the estimated peak exceeds the memory available now")
    c.set_defaults(func=_cmd_compare)

    from memlab.planner import add_arguments as _plan_arguments
    pl = sub.add_parser(
        "plan", help="which technique combinations make a configuration fit into N GB",
        description="Estimate (on fake tensors: no memory needed) a configuration under every "
                    "registered combination of techniques and list those that fit into --fit, "
                    "cheapest first, with the peak, its breakdown and the expected step-time "
                    "factor from the benchmarks' measured ratios.",
        epilog="example: memlab plan --scenario deep-speaker --full-size --fit 11GiB")
    _plan_arguments(pl)
    pl.set_defaults(func=_cmd_plan)

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
    b.add_argument("--plot", metavar="FILE", help="also write a plot of the rows to a "
                   "standalone offline HTML file")
    b.set_defaults(func=_cmd_bench)

    l = sub.add_parser("lab", help="start JupyterLab on the tutorials (localhost, token on)",
                       description="Copy the bundled tutorials into --dir (your copies are kept) "
                                   "and start JupyterLab on 127.0.0.1 with a fresh token.")
    l.add_argument("--dir", default="memlab-notebooks", help="working folder (default: "
                   "./memlab-notebooks)")
    l.add_argument("--port", type=int, default=8888)
    l.add_argument("--no-browser", action="store_true", help="do not open a browser")
    l.add_argument("--overwrite", action="store_true", help="refresh tutorials in --dir")
    l.add_argument("--app", action="store_true", help="serve the dashboard alone as a web app "
                   "(Voila) instead of JupyterLab, e.g. for a classroom")
    l.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    l.set_defaults(func=_cmd_lab)

    d = sub.add_parser("data", help="write a synthetic corpus as 16 kHz wavs + a manifest",
                       description="Write a synthetic corpus (deterministic from --seed) as wav "
                                   "files and a JSON-lines manifest that the data_scripts' "
                                   "format shares.")
    d.add_argument("--task", choices=tasks.names(), default="speaker")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--num-speakers", dest="num_speakers", type=int, default=10)
    d.add_argument("--utts", type=int, default=10, help="utterances per speaker")
    d.add_argument("--seconds", type=float, default=2.0)
    d.add_argument("--vocab-size", dest="vocab_size", type=int, default=12)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--force", action="store_true",
                   help="write into a non-empty --out (an earlier corpus's wavs are replaced)")
    d.set_defaults(func=_cmd_data)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command; exit 2 with one line on stderr for a bad value, 130 on Ctrl+C.

    memlab raises ValueError/TypeError naming the argument for bad values; those become
    ``memlab COMMAND: error: MESSAGE`` (MEMLAB_DEBUG=1 shows the traceback). Any other
    exception type is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"memlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as e:
        if os.environ.get("MEMLAB_DEBUG", "") not in ("", "0"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__  # one line
        print(f"memlab {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
