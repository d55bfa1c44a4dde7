"""The memory planner: what makes this configuration fit into N GB?

    from memlab import planner, scenarios
    cfg = scenarios.config("deep-speaker")
    result = planner.plan(cfg, "11GiB", frames=200, num_classes=5994,
                          batch_size=128)                      # or a full-size Config
    print(planner.format_plan(result))

How. Every registered technique of every kind that applies to the task
(``memlab.techniques.kinds()`` / ``names(kind, task)``) is a candidate; the cross product (432
combinations for a speaker net) is far too large to estimate one by one, and one DF-ResNet233
step on fake tensors takes 5-15 s on a 2-core CPU, so the planner

1. measures shallower nets where the structure is linear: a stage of at least
   ``EXTRAPOLATE_FROM`` blocks (DF-ResNet233's third, 63) is estimated at ``DEPTHS`` = 2 and 3
   blocks (``memlab.lab.estimate_config``, the step the lab trains) and the peak and each
   category at the peak are extrapolated linearly to the full depth: every block from the
   second on is the same module and adds the same bytes (``extrapolated_estimate``; exact for
   vanilla, reversible and the optimizers, tests pin it against full estimates);
2. takes the combinations in order of known cost -- those whose every technique has a measured
   step-time ratio first, then by the product of those ratios (``MEASURED``), then the fewest
   changes -- and predicts each one's peak from single changes measured on a proxy (every
   other stage at one block): each category of the configuration's breakdown scaled by each
   change's ratio (bf16 halves what checkpointing keeps). Single changes are measured only
   when a combination needs them, so costly ones are rarely reached;
3. estimates (step 1) the combinations predicted under ``budget x (1 + MARGIN)``, cheapest first,
   up to ``verify`` of them or ``time_budget`` seconds, and lists those whose estimated peak fits;
4. confirms the top answer(s) with one estimate at full size. Extrapolation is a lower bound
   where the peak moves to another moment as blocks are added (checkpointing: at 2-3 blocks the
   peak is the first stage's recompute, at 63 the 63 kept block inputs; +10%): the shortfall
   is then added to the other rows with the same choice (or those are estimated at full size
   while time is left), and said. Depths that disagree on the peak's phase fall back to a full
   estimate.

Rows say where their figure comes from (``full``, ``2,3->63``, ``2,3->63+X``). Combinations
predicted not to fit are counted, not listed.
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


# the measured ratios and the depth extrapolation live beside this module
from memlab._extrapolate import (CONFIRM_TOLERANCE, DEPTHS, EXTRAPOLATE_FROM,  # noqa: E402,F401
                                 MARGIN, PROXY_DEPTHS, Axis, Figure, _extrapolate,
                                 depth_axis, extrapolated_estimate)
from memlab._measured import MEASURED, Measured, step_factor  # noqa: E402,F401


# ----------------------------------------------------------------------------- planning
@dataclass
class Plan:
    fit: int                                  # bytes
    base: Dict[str, Any]                      # the configuration itself
    rows: List[Dict[str, Any]]                # fitting combinations, cheapest first
    predicted_over: int                       # combinations predicted not to fit (not listed)
    checked: int                              # estimate_config calls (any depth)
    failed: List[str] = field(default_factory=list)   # combinations that could not run
    seconds: float = 0.0
    axis: Optional[str] = None                # what was extrapolated ("stage 3 blocks")
    full_depth: Optional[int] = None          # ... from DEPTHS to this
    full_estimates: int = 0                   # estimate_config calls at full size
    unverified: int = 0                       # predicted to fit, not estimated (verify/time)
    not_predicted: int = 0                    # costlier than the rows found: not considered
    notes: List[str] = field(default_factory=list)
    per_rank: Optional[str] = None            # "fsdp2 on 2 ranks, 16 utterances each": figures
    #                                           are each rank's (memlab._per_rank)


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


def _predict(base: Mapping[str, int], ref: Mapping[str, int],
             changes: Sequence[Mapping[str, int]]) -> int:
    """Each category at the peak scaled by every change's measured ratio on the reference
    (kinds act on the same tensors multiplicatively: bf16 halves what checkpointing keeps)."""
    total = 0.0
    for c, v in base.items():
        add = 0.0
        for ch in changes:
            if ref.get(c, 0) > 0:
                v = v * ch.get(c, 0) / ref[c]
            else:
                add += ch.get(c, 0)
        total += v + add
    return int(total)


def add_shortfall(row: dict, delta: Mapping[str, int]) -> None:
    """Add another row's full-size shortfall, category by category, to ``row``'s categories.
    The total is what counts; a category that would go below zero (the peak moved to a moment
    with fewer gradients, say) is set to 0 and the largest category gives up the difference, so
    the categories still add up to the peak and none is negative."""
    new = {cat: row.get(cat, 0) + v for cat, v in delta.items()}
    deficit = -sum(v for v in new.values() if v < 0)
    if deficit:
        new = {cat: max(v, 0) for cat, v in new.items()}
        top = max(new, key=new.get)
        new[top] -= deficit
    row.update(new)


def plan(cfg, fit, *, batch_size: Optional[int] = None, frames: Optional[int] = None,
         num_classes: Optional[int] = None, kinds: Optional[Sequence[str]] = None,
         choices: Optional[Mapping[str, Sequence[str]]] = None, verify: int = 12,
         progress=None, confirm: int = 1, time_budget: Optional[float] = None,
         extrapolate: bool = True) -> Plan:
    """The combinations of registered techniques under which ``cfg`` fits into ``fit``
    (bytes or a size string), estimated on fake tensors (see the module docstring).

    ``batch_size`` / ``frames`` / ``num_classes``: as ``estimate_config`` (paper-scale what-if
    without building a paper-scale Config). ``verify``: at most this many estimates of
    predicted-to-fit combinations. ``confirm``: the top answers estimated at full size when
    extrapolated. ``time_budget``: seconds after which no more combinations are estimated
    (the top answer is still confirmed). ``extrapolate=False``: every estimate at full size.
    ``progress(text)``: called before each estimate. A ``cfg`` with ``parallel="ddp"|"fsdp2"``
    and ``nproc=N``: every figure is per rank (``estimate_config``'s per-rank estimate, the
    global batch split across N) and ``fit`` is the memory of one rank's device."""
    from memlab.lab import estimate_config
    budget = parse_size(fit)
    for name, v, lo in (("verify", verify, 1), ("confirm", confirm, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(
            time_budget, (int, float)) or not time_budget > 0):
        raise ValueError(f"time_budget must be None or seconds > 0, got {time_budget!r}")
    cfg.validate()
    per_rank = None
    if cfg.parallel != "none":
        from memlab._per_rank import local_batch
        b = local_batch(cfg.batch_size if batch_size is None else batch_size, cfg.nproc)
        per_rank = f"{cfg.parallel} on {cfg.nproc} ranks, {b} utterances each"
    t0 = time.perf_counter()
    cand = candidates(cfg, kinds, choices)
    axis = depth_axis(cfg) if extrapolate else None
    kw = dict(batch_size=batch_size, frames=frames, num_classes=num_classes)
    cache: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], Optional[Figure]] = {}
    failed: List[str] = []
    calls = {"all": 0, "full": 0}
    # with a time budget: no combination is estimated when it and the top answer's full-size
    # estimate (both predicted from the seconds the estimates so far took) would overrun it
    cost: Dict[Any, Tuple[float, float]] = {}
    here = {k: cfg.choice(k) for k in cand}

    def elapsed() -> float:
        return time.perf_counter() - t0

    def label(ch) -> str:
        return ", ".join(f"{a}={b}" for a, b in ch.items() if b != here[a]) or "as given"

    def run(c, what: str, where: str, full: bool):
        if progress is not None:
            progress(f"[{elapsed():4.0f} s] estimating {what} {where}")
        calls["all"] += 1
        calls["full"] += full
        return estimate_config(c, steps=2, **kw)

    def measure(ch, how: str) -> Optional[Figure]:
        """how: "full" (full size), "reduced" (DEPTHS, extrapolated), "proxy" (predictions)."""
        if axis is None:
            how = "full"
        k = (how, tuple(sorted(ch.items())))
        if k in cache:
            return cache[k]
        what = label(ch)
        fig: Optional[Figure] = None
        try:
            c = _with(cfg, ch).validate()
            if how == "full":
                e = run(c, what, "at full size", True)
                fig = Figure(int(e.peak), e.breakdown(), e.peak_phase, "full")
            else:
                proxy = how == "proxy"
                ds = PROXY_DEPTHS if proxy else DEPTHS
                t = time.perf_counter()
                es = [run(axis.at(c, d, proxy).validate(), what,
                          f"at {d} {axis.label}{' (proxy)' if proxy else ''}", False) for d in ds]
                fig = _extrapolate(es, ds, axis.full)
                if not proxy:           # seconds: this pair, and (estimated) one at full size
                    spent = time.perf_counter() - t
                    cost[k] = (spent, spent / sum(axis.size(c, d) for d in ds)
                               * axis.size(c, axis.full))
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
            failed.append(f"{what}: {' '.join(str(e).split())[:160]}")
        cache[k] = fig
        if fig is not None and not fig.linear and how == "reduced":   # the phase moved
            notes.append(f"{what}: the peak's phase changes with depth; estimated at full size")
            fig = cache[k] = measure(ch, "full")
        return fig

    notes: List[str] = []
    first = "reduced" if axis is not None else "full"
    base = measure(here, first)
    if base is None:
        raise ValueError(f"cfg: its step cannot be estimated on fake tensors ({failed[-1]})")
    # predictions: each single change measured on the reference (the proxy when extrapolating),
    # lazily: combinations are taken cheapest first and the expensive ones are rarely reached
    ref = measure(here, "proxy") if axis is not None else base
    ref_how = "proxy" if ref is not None else first      # no proxy: the changes as verified
    ref = ref or base
    single: Dict[Tuple[str, str], Optional[Dict[str, int]]] = {}

    def single_change(kind: str, name: str) -> Optional[Dict[str, int]]:
        if (kind, name) not in single:
            f = measure(dict(here, **{kind: name}), ref_how)
            single[(kind, name)] = None if f is None else f.parts
        return single[(kind, name)]

    kinds_order = list(cand)
    groups: Dict[Tuple[int, float, int], List[Dict[str, str]]] = {}
    for combo in itertools.product(*(cand[k] for k in kinds_order)):
        ch = dict(zip(kinds_order, combo))
        factor, _notes, missing = step_factor(ch, cfg.model_name)
        changes = sum(v != here[k] for k, v in ch.items())
        groups.setdefault((len(missing), round(factor, 6), changes), []).append(ch)
    rows: List[Dict[str, Any]] = []
    verified = unverified = invalid = over = skipped = 0

    def make_row(ch, fig: Figure, p: int) -> Dict[str, Any]:
        f, tnotes, missing = step_factor(ch, cfg.model_name)
        return {"choices": {k: v for k, v in ch.items() if v != tech.default(k)},
                "all_choices": dict(ch),
                "run": ", ".join(v for k, v in ch.items() if v != tech.default(k)) or "as given",
                "peak": fig.peak, "headroom": budget - fig.peak, "predicted": int(p),
                **{k: int(v) for k, v in fig.parts.items()}, "phase": fig.phase,
                "source": fig.source, "time_factor": f, "time_notes": tnotes,
                "not_measured": missing, "changes": sum(v != here[k] for k, v in ch.items())}

    def done() -> bool:
        if verified >= verify:
            return True
        if time_budget is None or not cost or not rows:   # time ends the search after an answer
            return False
        pairs = sorted(v[0] for v in cost.values())     # the median: the first one warms up
        top = cost.get((first, tuple(sorted(rows[0]["all_choices"].items()))), (0, 0)) \
            if rows and rows[0]["source"] != "full" else (0, 0)
        return elapsed() + pairs[len(pairs) // 2] + top[1] > time_budget

    for gkey in sorted(groups):
        if done():
            skipped += len(groups[gkey])
            continue
        predicted = []
        for ch in groups[gkey]:
            if done():
                skipped += 1
                continue
            changed = [(k, v) for k, v in ch.items() if v != here[k]]
            parts = [single_change(k, v) for k, v in changed]
            if any(s is None for s in parts):
                continue                               # a single change already failed
            p = base.peak if not changed else _predict(base.parts, ref.parts, parts)
            predicted.append((p, ch))
        predicted.sort(key=lambda x: x[0])
        for p, ch in predicted:
            if p > budget * (1 + MARGIN):
                over += 1
                continue
            if (first, tuple(sorted(ch.items()))) not in cache:
                if done():
                    unverified += 1
                    continue
                try:
                    _with(cfg, ch).validate()
                except (ValueError, TypeError):
                    invalid += 1                        # e.g. in-backward with accumulation
                    continue
                verified += 1
            fig = measure(ch, first)
            if fig is not None and fig.peak <= budget:
                rows.append(make_row(ch, fig, p))

    def order(r):
        return (len(r["not_measured"]), r["time_factor"], r["changes"], r["peak"])
    rows.sort(key=order)
    # confirm: the top answers estimated at full size. Extrapolation is a lower bound where the
    # peak moves to another moment as blocks are added; a confirmed shortfall is attributed to
    # the row's choices, and other rows with one of them get it added (estimated at full size
    # instead while time is left)
    short: Dict[Tuple[str, str], Dict[str, int]] = {}   # choice -> full - extrapolated bytes
    confirmed, i, full_seconds = 0, 0, [0.0]
    while i < len(rows) and axis is not None:
        r = rows[i]
        flagged = [c for c in r["choices"].items() if c in short] + \
            ([("*", "*")] if ("*", "*") in short else [])
        time_left = time_budget is not None and elapsed() + full_seconds[0] < time_budget
        if r["source"] == "full" or (confirmed >= confirm and not flagged):
            i += 1
            continue
        if confirmed >= confirm and not time_left:       # flagged: add the shortfall
            c = max(flagged, key=lambda c: sum(short[c].values()))
            add_shortfall(r, short[c])
            add = sum(short[c].values())
            r["peak"] += add
            r["headroom"] = budget - r["peak"]
            r["source"] += f"+{_gib(add).replace(' ', '')}"
            r["shortfall_of"] = "=".join(c) if c[0] != "*" else "as given"
            if r["peak"] > budget:
                notes.append(f"{r['run']}: {_gib(r['peak'])} with the shortfall of "
                             f"{'='.join(c)} at full size: does not fit")
                rows.pop(i)
                continue
            i += 1
            continue
        t = time.perf_counter()
        full = measure(r["all_choices"], "full")
        full_seconds[0] = max(full_seconds[0], time.perf_counter() - t)
        confirmed += 1
        if full is None:
            i += 1
            continue
        if full.peak > r["peak"] * (1 + CONFIRM_TOLERANCE):
            ratio = full.peak / max(r["peak"], 1)
            if not flagged:                      # the first row with these choices: theirs
                delta = {c: full.parts.get(c, 0) - r.get(c, 0) for c in full.parts}
                for c in (list(r["choices"].items()) or [("*", "*")]):
                    short[c] = delta
            notes.append(f"{r['run']}: extrapolated {_gib(r['peak'])}, at full size "
                         f"{_gib(full.peak)} (+{100 * (ratio - 1):.1f}%): the peak moves to "
                         f"another moment as {axis.label} are added")
        extrapolated = r["peak"]
        rows[i] = make_row(r["all_choices"], full, r["predicted"])
        rows[i]["extrapolated"] = extrapolated
        if full.peak > budget:
            rows.pop(i)
            continue
        i += 1
    rows.sort(key=order)
    for r in rows:
        r.pop("all_choices", None)
    if unverified or skipped:
        notes.append(f"after these (--verify {verify}" + (f", {time_budget:.0f} s" if
                     time_budget else "") + f"): {unverified} more combinations predicted to "
                     f"fit were not estimated, {skipped} costlier ones not predicted")
    if invalid:
        notes.append(f"{invalid} combinations predicted to fit are not valid together "
                     f"(Config.validate)")
    base_row = {"run": "as given", "peak": int(base.peak), "phase": base.phase,
                "fits": base.peak <= budget, "source": base.source, **base.parts}
    return Plan(budget, base_row, rows, over, calls["all"], failed, elapsed(),
                axis=None if axis is None else axis.label,
                full_depth=None if axis is None else axis.full,
                full_estimates=calls["full"], unverified=unverified,
                not_predicted=skipped, notes=notes, per_rank=per_rank)


def _gib(n: int) -> str:
    from memlab.memory import format_bytes
    return format_bytes(n)


def format_plan(result: Plan, limit: int = 10) -> str:
    """The planner's answer as text: the configuration's own estimate, then the fitting
    combinations (cheapest first) with peak, breakdown and expected step-time factor."""
    from memlab.memory import CATEGORIES, format_bytes
    from memlab.report import format_table
    b = result.base
    each = " per rank" if result.per_rank else ""
    out = [f"budget {format_bytes(result.fit)}{each}"
           + (f" ({result.per_rank})" if result.per_rank else "")
           + f"; as given: {format_bytes(b['peak'])}{each} "
           f"({'fits' if b['fits'] else 'does not fit'}; peak in {b['phase']}"
           + (f"; {b['source']} {result.axis}" if b.get("source", "full") != "full" else "")
           + ")"]
    if not result.rows and (result.unverified or result.not_predicted):
        out.append(f"none of the {result.checked} estimates fits, and the search stopped "
                   f"(--verify): raise --verify to estimate more combinations")
    elif not result.rows:
        out.append("no registered combination fits (estimated on fake tensors); lower the "
                   "batch size, the utterance length or the model")
    else:
        rows = []
        for r in result.rows[:limit]:
            t = f"{r['time_factor']:.2f}x"
            extra = "; ".join(r["time_notes"] + [f"{m}: not measured" for m in r["not_measured"]])
            rows.append({"run": r["run"], "peak": r["peak"],
                         **{c: r[c] for c in CATEGORIES if c in r},
                         **({"from": r.get("source", "full")} if result.axis else {}),
                         "step_time": t, "measured ratios (bench, CPU)": extra or "-"})
        out.append(format_table(rows))
        if each:
            out.append(f"peak and breakdown: per rank ({result.per_rank}; memlab._per_rank)")
        if len(result.rows) > limit:
            out.append(f"... and {len(result.rows) - limit} more that fit")
    out.append(f"{result.checked} estimates on fake tensors ({result.full_estimates} at full "
               f"size) in {result.seconds:.0f} s; {result.predicted_over} combinations "
               f"predicted not to fit (not estimated)"
               + (f"; {len(result.failed)} could not run" if result.failed else ""))
    if result.axis:
        d = ",".join(map(str, DEPTHS))
        out.append(f"from: 'full' = estimated at full size; '{d}->{result.full_depth}' = "
                   f"estimated at {' and '.join(map(str, DEPTHS))} {result.axis}, the peak and "
                   f"each category extrapolated linearly to {result.full_depth} (exact while "
                   f"the peak stays at the same moment; the top answer is estimated at full "
                   f"size)")
    fixed = sorted({r["shortfall_of"] for r in result.rows if r.get("shortfall_of")})
    if fixed:
        out.append(f"'->N+X': extrapolated, plus the shortfall X that the full-size estimate of "
                   f"{', '.join(fixed)} found (its peak moves with depth)")
    out.extend(result.notes)
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
    p.add_argument("--nproc", type=int, help="data-parallel ranks: plan the memory each of N "
                   "devices needs, the global --batch-size split across them (default 1)")
    p.add_argument("--parallel", choices=("ddp", "fsdp2"), help="data-parallel mode with "
                   "--nproc (default: ddp): fsdp2 shards parameters, gradients and optimizer")
    p.add_argument("--vary", help="comma-separated kinds to vary (default: every kind that "
                   "applies); the others stay as configured")
    for kind in tech.kinds():
        p.add_argument(f"--{kind}", dest="kind_" + kind.replace("-", "_"),
                       help=f"{kind} names to try, comma-separated (default: every registered "
                            f"one): {', '.join(tech.names(kind))}")
    p.add_argument("--verify", type=int, default=8, help="at most this many estimates of "
                   "combinations predicted to fit (default 8)")
    p.add_argument("--confirm", type=int, default=1, help="the top answers estimated at full "
                   "size when the others are extrapolated from shallower nets (default 1)")
    p.add_argument("--seconds", type=float, default=45.0, help="time budget: no combination "
                   "is estimated when it and the top answer's full-size estimate would overrun "
                   "it (default 45; memlab's start adds a few)")
    p.add_argument("--no-extrapolate", dest="extrapolate", action="store_false",
                   help="estimate every combination at full depth (slow for deep nets)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def config_from_args(args):
    """(Config, estimate_config keyword arguments) from ``memlab plan``'s options."""
    from memlab.lab import Config
    fields = {k: getattr(args, k) for k in ("model", "depth", "width", "embed_dim",
                                            "batch_size", "vocab_size", "nproc", "parallel")
              if getattr(args, k, None) is not None}
    if "nproc" in fields and "parallel" not in fields:
        fields["parallel"] = "ddp"                   # as memlab compare --nproc
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
    import os
    show = os.environ.get("MEMLAB_PROGRESS") == "1" or (not args.json and sys.stderr.isatty())
    result = plan(cfg, fit, kinds=vary, choices=choices or None, verify=args.verify,
                  confirm=args.confirm, time_budget=args.seconds, extrapolate=args.extrapolate,
                  progress=(lambda t: print(f"memlab plan: {t}", file=sys.stderr, flush=True))
                  if show else None, **extra)
    if args.json:
        print(json.dumps({"fit": result.fit, "config": cfg.label, "per_rank": result.per_rank,
                          "base": result.base,
                          "rows": result.rows, "predicted_over": result.predicted_over,
                          "checked": result.checked, "full_estimates": result.full_estimates,
                          "extrapolated": {"axis": result.axis, "depths": list(DEPTHS),
                                           "to": result.full_depth} if result.axis else None,
                          "unverified": result.unverified, "notes": result.notes,
                          "failed": result.failed, "seconds": round(result.seconds, 1)},
                         indent=2, default=str))
    else:
        print(f"memlab plan: {cfg.label}" + (f", {extra}" if extra else ""))
        print(format_plan(result))
    return 0
