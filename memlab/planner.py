"""The memory planner: what makes this configuration fit into N GB?

    from memlab import planner, scenarios
    cfg = scenarios.config("deep-speaker")
    result = planner.plan(cfg, "11GiB", frames=200, num_classes=5994,
                          batch_size=128)                      # or a full-size Config
    print(planner.format_plan(result))

How. Every registered technique of every kind that applies to the task
(``memlab.techniques.kinds()`` / ``names(kind, task)``) is a candidate; the full cross product
is too large to estimate one by one at paper scale (minutes per DF-ResNet233 step on fake
tensors), so the planner

1. estimates the configuration itself and each single change of one kind
   (``memlab.lab.estimate_config`` on fake tensors: the same step the lab trains);
2. predicts every combination's peak as the configuration's plus the sum of those single
   changes (kinds save different categories, so the savings add up to first order);
3. estimates exactly, cheapest first, the combinations predicted to fit (up to ``verify``),
   and lists those whose *estimated* peak fits, with the breakdown at the peak.

Cheapest = the smallest expected step-time factor: the product of the measured ratios in
``MEASURED`` (the benchmarks' own figures, with the command and the machine they came from;
"not measured" where there is none), then the smallest peak. A prediction can be wrong (two
techniques that save the same tensors), so rows say ``verified``; combinations predicted not to
fit are counted, not listed.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from memlab import techniques as tech

__all__ = ["MEASURED", "Measured", "parse_size", "plan", "format_plan", "step_factor", "Plan"]

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}


def parse_size(value) -> int:
    """'11GB' -> 11e9, '11GiB' / '11G' -> 11 * 2**30, '512MiB', 1e9 -> bytes (an int > 0);
    a ValueError naming --fit, the expected form and the value otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"fit must be a size such as '11GB', '11GiB' or a number of bytes, "
                         f"got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"fit must be a size such as '11GB', '11GiB', '512MiB' or a number "
                             f"of bytes, got {value!r}")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"fit must be a size such as '11GB' or a number of bytes, got "
                         f"{type(value).__name__} {value!r}")
    if not math.isfinite(n) or n < 1:
        raise ValueError(f"fit must be a positive, finite size, got {value!r}")
    return int(n)


# ----------------------------------------------------------------------------- measured ratios
@dataclass(frozen=True)
class Measured:
    """A step-time ratio measured side by side against the kind's default."""
    ratio: float                  # time / default's time
    scope: str                    # "step": the whole training step; "optimizer step"; "loss"
    where: str                    # workload
    command: str                  # how to measure it again
    machine: str = "2-core shared CPU, no GPU, 1 thread (OMP_NUM_THREADS=1)"
    spread: str = ""              # range seen over repeats


# (kind, name) -> {model or "*": Measured}; from README's results (the benches' own figures)
MEASURED: Dict[Tuple[str, str], Dict[str, Measured]] = {
    ("memory", "checkpoint"): {
        "resnet": Measured(1.39, "step", "ResNet, stage 3 of depth 32, width 32, batch 2 x 100",
                           "OMP_NUM_THREADS=1 memlab bench reversible", spread="1.29-1.49"),
        "dfresnet": Measured(1.29, "step", "DF-ResNet, stage 3 of depth 16",
                             "bench.reversible.run(model='dfresnet')", spread="1.29-1.43")},
    ("memory", "reversible"): {
        "resnet": Measured(1.44, "step", "ResNet, stage 3 of depth 32, width 32, batch 2 x 100",
                           "OMP_NUM_THREADS=1 memlab bench reversible", spread="1.30-1.50"),
        "dfresnet": Measured(1.62, "step", "DF-ResNet, stage 3 of depth 16",
                             "bench.reversible.run(model='dfresnet')", spread="1.62-1.80")},
    ("memory", "reversible-full"): {
        "resnet": Measured(1.47, "step", "ResNet, stage 3 of depth 32, width 32, batch 2 x 100",
                           "OMP_NUM_THREADS=1 memlab bench reversible", spread="1.32-1.55")},
    ("optimizer", "adam8bit"): {
        "*": Measured(1.45, "optimizer step", "4.18 M params vs torch foreach fp32 Adam",
                      "OMP_NUM_THREADS=1 memlab bench optim", spread="1.2-1.7")},
    ("optimizer", "adamw8bit"): {
        "*": Measured(1.45, "optimizer step", "as adam8bit (the same kernel)",
                      "OMP_NUM_THREADS=1 memlab bench optim", spread="1.2-1.7")},
    ("optimizer", "sgd8bit"): {
        "*": Measured(1.85, "optimizer step", "4.18 M params vs torch foreach fp32 SGD",
                      "OMP_NUM_THREADS=1 memlab bench optim", spread="1.5-2.2")},
    ("loss", "samplewise"): {
        "*": Measured(0.77, "loss", "B=32, T=200, U=40, V=512 loss step vs batched",
                      "OMP_NUM_THREADS=1 memlab bench transducer", spread="0.77-0.93 "
                      "(1-2 threads; 1.3-1.56 on a busy machine)")},
}
# the optimizer step is a small part of a training step: its factor is shown, not multiplied in


def step_factor(choices: Mapping[str, str], model: Optional[str] = None
                ) -> Tuple[float, List[str], List[str]]:
    """(whole-step factor, notes, unmeasured): the product of the measured whole-step ratios
    of ``choices`` (kind -> name); notes name each ratio and its scope; unmeasured lists the
    non-default choices without a measurement."""
    factor, notes, missing = 1.0, [], []
    for kind, name in choices.items():
        if name == tech.default(kind):
            continue
        table = MEASURED.get((kind, name)) or {}
        m, other = table.get(model or "", table.get("*")), ""
        if m is None and table:             # measured on another model only: say which
            other, m = next(iter(table.items()))
        if m is None:
            missing.append(f"{kind}={name}")
            continue
        if m.scope == "step":
            factor *= m.ratio
        notes.append(f"{name} {m.ratio:.2f}x {m.scope}" + (f" (on {other})" if other else ""))
    return factor, notes, missing


# ----------------------------------------------------------------------------- planning
@dataclass
class Plan:
    fit: int                                  # bytes
    base: Dict[str, Any]                      # the configuration itself
    rows: List[Dict[str, Any]]                # fitting combinations, cheapest first
    predicted_over: int                       # combinations predicted not to fit (not listed)
    checked: int                              # exact estimates run
    failed: List[str] = field(default_factory=list)   # combinations that could not run
    seconds: float = 0.0


def _with(cfg, choices: Mapping[str, str]):
    from memlab.lab import FIELD_KINDS
    kw: Dict[str, Any] = {}
    named = dict(cfg.techniques)
    for kind, name in choices.items():
        if kind in FIELD_KINDS:
            kw[kind] = name
        else:
            named[kind] = name
    opt_kw = cfg.optimizer_kwargs if choices.get("optimizer", cfg.optimizer) == \
        cfg.optimizer else {}
    return cfg.replace(techniques=named, optimizer_kwargs=dict(opt_kw), **kw)


def candidates(cfg, kinds: Optional[Sequence[str]] = None,
               choices: Optional[Mapping[str, Sequence[str]]] = None) -> Dict[str, Tuple[str, ...]]:
    """kind -> the names the planner tries: every registered name that applies to the task
    (``choices`` narrows a kind; ``kinds`` limits which kinds vary, the rest stay as in cfg)."""
    out = {}
    for kind in tech.kinds():
        if not tech.applies(kind, cfg.task):
            continue
        if kinds is not None and kind not in kinds:
            out[kind] = (cfg.choice(kind),)
            continue
        names = tuple(choices[kind]) if choices and kind in choices else \
            tech.names(kind, cfg.task)
        for n in names:
            tech.get(kind, n, cfg.task)              # ValueError naming the kind's choices
        out[kind] = names
    return out


def plan(cfg, fit, *, batch_size: Optional[int] = None, frames: Optional[int] = None,
         num_classes: Optional[int] = None, kinds: Optional[Sequence[str]] = None,
         choices: Optional[Mapping[str, Sequence[str]]] = None, verify: int = 12,
         progress=None) -> Plan:
    """The combinations of registered techniques under which ``cfg`` fits into ``fit``
    (bytes or a size string), estimated on fake tensors (see the module docstring).

    ``batch_size`` / ``frames`` / ``num_classes``: as ``estimate_config`` (paper-scale what-if
    without building a paper-scale Config). ``verify``: at most this many exact estimates of
    predicted-to-fit combinations. ``progress(text)``: called before each estimate."""
    from memlab.lab import estimate_config
    budget = parse_size(fit)
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 1:
        raise ValueError(f"verify must be an int >= 1, got {verify!r}")
    cfg.validate()
    t0 = time.perf_counter()
    cand = candidates(cfg, kinds, choices)
    cache: Dict[Tuple[Tuple[str, str], ...], Any] = {}
    failed: List[str] = []

    def key(ch):
        return tuple(sorted(ch.items()))

    def est(ch):
        k = key(ch)
        if k not in cache:
            label = ", ".join(f"{a}={b}" for a, b in ch.items()
                              if b != tech.default(a)) or "as given"
            if progress is not None:
                progress(f"estimating {label}")
            try:
                c = _with(cfg, ch).validate()
                cache[k] = estimate_config(c, batch_size=batch_size, frames=frames, steps=2,
                                           num_classes=num_classes)
            except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
                failed.append(f"{label}: {' '.join(str(e).split())[:160]}")
                cache[k] = None
        return cache[k]

    here = {k: cfg.choice(k) for k in cand}
    base = est(here)
    if base is None:
        raise ValueError(f"cfg: its step cannot be estimated on fake tensors ({failed[-1]})")
    delta: Dict[Tuple[str, str], float] = {}
    for kind, names in cand.items():
        for n in names:
            if n == here[kind]:
                continue
            e = est(dict(here, **{kind: n}))
            if e is not None:
                delta[(kind, n)] = e.peak - base.peak
    kinds_order = list(cand)
    predicted = []
    for combo in itertools.product(*(cand[k] for k in kinds_order)):
        ch = dict(zip(kinds_order, combo))
        if any((k, v) not in delta for k, v in ch.items() if v != here[k]):
            continue                                   # a single change already failed
        p = base.peak + sum(delta[(k, v)] for k, v in ch.items() if v != here[k])
        factor, _notes, missing = step_factor(ch, cfg.model_name)
        predicted.append((p, factor, len(missing), ch))
    fitting = [x for x in predicted if x[0] <= budget]
    over = len(predicted) - len(fitting)
    fitting.sort(key=lambda x: (x[1], x[2], x[0]))
    rows: List[Dict[str, Any]] = []
    checked_before = len(cache)
    for p, factor, _m, ch in fitting:
        if len(cache) - checked_before >= verify and key(ch) not in cache:
            break
        e = est(ch)
        if e is None or e.peak > budget:
            continue
        f, notes, missing = step_factor(ch, cfg.model_name)
        rows.append({"choices": {k: v for k, v in ch.items() if v != tech.default(k)},
                     "run": ", ".join(f"{v}" for k, v in ch.items()
                                      if v != tech.default(k)) or "as given",
                     "peak": int(e.peak), "headroom": budget - int(e.peak),
                     "predicted": int(p), **{k: int(v) for k, v in e.breakdown().items()},
                     "phase": e.peak_phase, "time_factor": f, "time_notes": notes,
                     "not_measured": missing})
    rows.sort(key=lambda r: (r["time_factor"], len(r["not_measured"]), r["peak"]))
    base_row = {"run": "as given", "peak": int(base.peak), "phase": base.peak_phase,
                "fits": base.peak <= budget, **base.breakdown()}
    return Plan(budget, base_row, rows, over, len(cache), failed, time.perf_counter() - t0)


def format_plan(result: Plan, limit: int = 10) -> str:
    """The planner's answer as text: the configuration's own estimate, then the fitting
    combinations (cheapest first) with peak, breakdown and expected step-time factor."""
    from memlab.memory import CATEGORIES, format_bytes
    from memlab.report import format_table
    b = result.base
    out = [f"budget {format_bytes(result.fit)}; as given: {format_bytes(b['peak'])} "
           f"({'fits' if b['fits'] else 'does not fit'}; peak in {b['phase']})"]
    if not result.rows:
        out.append("no registered combination fits (estimated on fake tensors); lower the "
                   "batch size, the utterance length or the model")
    else:
        rows = []
        for r in result.rows[:limit]:
            t = f"{r['time_factor']:.2f}x"
            extra = "; ".join(r["time_notes"] + [f"{m}: not measured" for m in r["not_measured"]])
            rows.append({"run": r["run"], "peak": r["peak"],
                         **{c: r[c] for c in CATEGORIES if c in r}, "step_time": t,
                         "measured ratios (bench, CPU)": extra or "-"})
        out.append(format_table(rows))
        if len(result.rows) > limit:
            out.append(f"... and {len(result.rows) - limit} more that fit")
    out.append(f"{result.checked} estimates on fake tensors in {result.seconds:.0f} s; "
               f"{result.predicted_over} combinations predicted not to fit (not estimated)"
               + (f"; {len(result.failed)} could not run" if result.failed else ""))
    out.append("step_time: product of the benchmarks' measured whole-step ratios "
               "(memlab.planner.MEASURED: 2-core CPU, 1 thread); optimizer-step and loss "
               "ratios are shown, not multiplied in")
    return "\n".join(out)


# ----------------------------------------------------------------------------- memlab plan
def add_arguments(p) -> None:
    """The options of ``memlab plan`` (an argparse parser)."""
    p.add_argument("--fit", required=True, help="the memory to fit into: 11GB (10^9 B), 11GiB "
                   "or 11G (2^30 B), 512MiB, or a number of bytes")
    p.add_argument("--scenario", help="start from a scenario's configuration (memlab.scenarios)")
    p.add_argument("--full-size", dest="full_size", action="store_true",
                   help="plan the scenario's full-size twin (e.g. DF-ResNet233 at batch 128)")
    p.add_argument("--task", help="speaker | asr (default: speaker, or the scenario's)")
    p.add_argument("--model", help="speaker: resnet | dfresnet")
    p.add_argument("--blocks", help="blocks per stage, e.g. 3,8,63,3 (speaker)")
    for flag, kind, what in (("--depth", int, "blocks per stage / encoder layers"),
                             ("--width", int, "base channels / model dim"),
                             ("--embed-dim", int, "speaker embedding size"),
                             ("--batch-size", int, "utterances per step"),
                             ("--frames", int, "frames per utterance (10 ms each)"),
                             ("--num-classes", int, "speakers of the classifier head"),
                             ("--vocab-size", int, "tokens incl. blank (asr)")):
        p.add_argument(flag, dest=flag[2:].replace("-", "_"), type=kind, help=what)
    p.add_argument("--vary", help="comma-separated kinds to vary (default: every kind that "
                   "applies); the others stay as configured")
    for kind in tech.kinds():
        p.add_argument(f"--{kind}", dest="kind_" + kind.replace("-", "_"),
                       help=f"{kind} names to try, comma-separated (default: every registered "
                            f"one): {', '.join(tech.names(kind))}")
    p.add_argument("--verify", type=int, default=8, help="at most this many exact estimates "
                   "of combinations predicted to fit (default 8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def config_from_args(args):
    """(Config, estimate_config keyword arguments) from ``memlab plan``'s options."""
    from memlab.lab import Config
    fields = {k: getattr(args, k) for k in ("model", "depth", "width", "embed_dim",
                                            "batch_size", "vocab_size")
              if getattr(args, k, None) is not None}
    if args.blocks is not None:
        try:
            fields["blocks"] = tuple(int(b) for b in args.blocks.split(","))
        except ValueError:
            raise ValueError(f"blocks must be 4 comma-separated ints such as 3,8,63,3, got "
                             f"{args.blocks!r}") from None
    extra = {k: getattr(args, k) for k in ("frames", "num_classes")
             if getattr(args, k, None) is not None}
    if args.scenario is not None:
        from memlab import scenarios
        s = scenarios.check_task(args.scenario, args.task)
        if args.full_size:
            if s.twin is None:
                raise ValueError(f"full_size: scenario {args.scenario!r} has no full-size twin "
                                 f"that estimates on fake tensors")
            kw = dict(s.twin.overrides)
            kw.update(fields)
            cfg = Config(task=s.task, **kw)
            extra.setdefault("frames", s.twin.frames)
            extra.setdefault("num_classes", s.twin.num_classes)
        else:
            cfg = scenarios.config(args.scenario, **fields)
    else:
        if args.full_size:
            raise ValueError("full_size: --full-size needs --scenario NAME")
        cfg = Config.for_task(args.task or "speaker", **fields)
    return cfg.validate(), {k: v for k, v in extra.items() if v is not None}


def command(args) -> int:
    """``memlab plan``: print the planner's answer (one line on stderr for a bad value, via
    memlab.cli.main)."""
    import json
    import sys
    fit = parse_size(args.fit)                       # before any estimate
    cfg, extra = config_from_args(args)
    vary = None if args.vary is None else tuple(v.strip() for v in args.vary.split(",")
                                                if v.strip())
    for k in vary or ():
        if k not in tech.kinds():
            raise ValueError(f"vary must name kinds from {tech.kinds()}, got {k!r}")
    choices = {}
    for kind in tech.kinds():
        v = getattr(args, "kind_" + kind.replace("-", "_"), None)
        if v is not None:
            choices[kind] = tuple(x.strip() for x in v.split(",") if x.strip())
    quiet = args.json or not sys.stderr.isatty()
    result = plan(cfg, fit, kinds=vary, choices=choices or None, verify=args.verify,
                  progress=None if quiet else (lambda t: print(f"memlab plan: {t}",
                                                               file=sys.stderr)), **extra)
    if args.json:
        print(json.dumps({"fit": result.fit, "config": cfg.label, "base": result.base,
                          "rows": result.rows, "predicted_over": result.predicted_over,
                          "checked": result.checked, "failed": result.failed}, indent=2,
                         default=str))
    else:
        print(f"memlab plan: {cfg.label}" + (f", {extra}" if extra else ""))
        print(format_plan(result))
    return 0
