"""The standard alternatives beside the seed techniques: what each saves, costs and changes.

    from memlab import alternatives as alt
    rows = alt.compare("deep-speaker", ["precision=bf16", "accumulation=accumulate4"])
    print(alt.format_rows(rows))       # peak by category, saving, step time, full size, drift
    alt.pruned_gap([2, 4, 7])          # pruned RNN-T band loss vs the exact loss, per s_range
    alt.plan_summary(planner.plan(...))  # the planner's cheapest and smallest answers as ratios

A choice is ``"kind=name"``, several joined by ``+`` (``"memory=reversible-full+optimizer=
adam8bit"``): the scenario's baseline with those kinds changed. ``compare`` gives one row per
choice, the baseline first, each measured three ways on the scenario's live sizes:

* memory: one steady-state step metered (``memlab.ui.measure.measure_step``), and with
  ``full_size=True`` the full-size twin on fake tensors (``scenarios.full_size``);
* time: a few steps of every choice timed round robin in one process (median); ``time`` is the
  ratio to the baseline's, which is what to compare across machines;
* result: every choice starts from the same weights and steps on the same batch; ``drift`` is
  ‖Δp − Δp_base‖ / ‖Δp_base‖ after those steps (0: the same update; None: another network).
  ``reference=True`` adds the row "baseline, another batch": the baseline on a second random
  batch, whose drift and step time are the scale and the noise the other rows are read against.

A combination ``Config.validate`` refuses (a step in backward with LowRankAdam or with
accumulation...) gives a row with ``refused``: the lab's one-line reason. Tutorial 06.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from memlab import scenarios, tasks
from memlab import techniques as tech
from memlab.lab import Config, build_model, build_optimizer, training_step
from memlab.memory import CATEGORIES, format_bytes
from memlab.ui.measure import measure_step

__all__ = ["CHANGES", "parse", "label", "changes", "compare", "format_rows", "pruned_gap",
           "plan_summary"]

REFERENCE = "baseline, another batch"
# (kind, name) -> what the technique changes in the training itself (the table's "changes")
CHANGES = {
    ("memory", "checkpoint"): "nothing: the same forward, recomputed in backward",
    ("memory", "reversible"): "another network: reversible blocks (inputs rebuilt from outputs)",
    ("memory", "reversible-full"): "another network: reversible blocks and downsampling",
    ("precision", "bf16"): "forward in bfloat16: 8 mantissa bits (fp32 master weights)",
    ("precision", "fp16"): "forward in float16, loss scaled (GradScaler)",
    ("optimizer", "adam8bit"): "Adam's moments rounded to 8 bits per step",
    ("optimizer", "adamw8bit"): "AdamW's moments rounded to 8 bits per step",
    ("optimizer", "sgd8bit"): "momentum rounded to 8 bits per step",
    ("optimizer", "adam4bit"): "Adam's moments rounded to 4 bits per step (dithered)",
    ("optimizer", "adam4bit-nearest"): "Adam's moments rounded to the nearest 4-bit value",
    ("optimizer", "adamw4bit"): "AdamW's moments rounded to 4 bits per step",
    ("optimizer", "lowrank-adam"): "another update: gradients projected onto rank-r factors",
    ("optimizer-step", "in-backward"): "nothing: the same update, one parameter at a time "
                                       "(no clipping, scaling or accumulation with it)",
    ("loss", "samplewise"): "nothing: the same loss and gradients, one utterance at a time",
    ("loss", "pruned"): "another loss unless s_range >= U+1 (plus the simple joint's loss)",
    ("loss", "samplewise-pruned"): "another loss unless s_range >= U+1 (as pruned)",
    ("offload", "host"): "nothing: saved tensors copied to host and back",
}


def parse(text: Optional[str]) -> Dict[str, str]:
    """``"kind=name+kind=name"`` -> ``{kind: name}`` (None, "" or "baseline": {})."""
    if text is None:
        return {}
    if not isinstance(text, str):
        raise TypeError(f"choice must be a str 'kind=name[+kind=name]', got "
                        f"{type(text).__name__}")
    out: Dict[str, str] = {}
    if text.strip() in ("", "baseline"):
        return out
    for part in text.split("+"):
        kind, sep, name = (s.strip() for s in part.partition("="))
        if not sep or not name:
            raise ValueError(f"choice must be 'kind=name[+kind=name]', got {text!r}")
        if kind not in tech.kinds():
            raise ValueError(f"kind must be one of {tech.kinds()}, got {kind!r} in {text!r}")
        out[kind] = name
    return out


def label(choices: Mapping[str, str]) -> str:
    """A row's name: ``"kind=name + kind=name"``, "baseline" for no change."""
    return " + ".join(f"{k}={v}" for k, v in choices.items()) or "baseline"


def _has_batchnorm(cfg: Config) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in build_model(cfg).modules())


def changes(choices: Mapping[str, str], cfg: Optional[Config] = None) -> str:
    """What ``choices`` change in the training (``CHANGES``; accumulation: whether ``cfg``'s
    network has BatchNorm, which normalises each micro-batch by its own statistics)."""
    out = []
    for kind, name in choices.items():
        if kind == "accumulation" and name != tech.default(kind):
            bn = cfg is not None and _has_batchnorm(cfg)
            out.append("BatchNorm statistics per micro-batch" if bn else
                       "nothing: no BatchNorm, the summed gradient is the batch's")
        elif name != tech.default(kind):
            out.append(CHANGES.get((kind, name), "not described"))
    return "; ".join(out) or "-"


def _no_dropout(model: nn.Module) -> nn.Module:
    """Dropout off (p = 0), so that runs stepping in turn draw no random masks of their own."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return model


def _train(cfgs: Sequence[Config], batches: Sequence[tuple], steps: int):
    """Every Config from its seed's weights, ``steps`` steps on its batch, round robin: the
    median seconds of a step after the first, and each run's (start, end) parameters."""
    runs = []
    for cfg, batch in zip(cfgs, batches):
        torch.manual_seed(cfg.seed)
        model = _no_dropout(build_model(cfg).to(cfg.device))
        start = {k: p.detach().clone() for k, p in model.named_parameters()}
        runs.append((model, build_optimizer(cfg, model), batch, training_step(cfg), start))
    times: List[List[float]] = [[] for _ in runs]
    for i in range(steps):
        for j, (model, opt, batch, step, _) in enumerate(runs):
            t0 = time.perf_counter()
            step(model, opt, batch)
            if i:                            # the first step builds state and kernels
                times[j].append(time.perf_counter() - t0)
    return ([statistics.median(t) for t in times],
            [(start, {k: p.detach() for k, p in model.named_parameters()})
             for model, _, _, _, start in runs])


def _drift(run, base) -> Optional[float]:
    (s0, s1), (b0, b1) = run, base

    def shapes(d):
        return {k: v.shape for k, v in d.items()}
    if shapes(s0) != shapes(b0) or any(not torch.equal(s0[k], b0[k]) for k in b0):
        return None                          # another network, or other initial weights
    if shapes(s1) != shapes(b1):             # reparametrized while training (lowrank-adam)
        return None
    moved = sum(float((b1[k] - b0[k]).double().pow(2).sum()) for k in b0) ** 0.5
    gap = sum(float((s1[k] - b1[k]).double().pow(2).sum()) for k in b0) ** 0.5
    return gap / moved if moved > 0 else None


def compare(scenario: str, choices: Sequence[str], *, repeats: int = 3, full_size: bool = True,
            reference: bool = True, fast: Optional[bool] = None,
            **overrides) -> List[Dict[str, Any]]:
    """One row per choice of scenario ``scenario`` (see the module docstring), the baseline
    first: ``{"run", "choices", "peak", <category>..., "saving", "step_s", "time", "drift",
    "changes", "full_peak", "full_saving", "full_breakdown"}``, or ``{"run", "choices",
    "refused"}``. ``repeats``: timed steps per choice (after one untimed)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(choices, str):
        raise TypeError("choices must be a list of 'kind=name[+kind=name]' strings, got a str")
    scenarios.get(scenario)
    parsed = [parse(c) for c in choices]
    picked = [("baseline", {})] + [(label(ch), ch) for ch in parsed if ch]
    if reference:
        picked.insert(1, (REFERENCE, {}))
    rows: List[Dict[str, Any]] = []
    cfgs: List[Config] = []
    for run, ch in picked:
        try:
            cfg = scenarios.config(scenario, fast=fast, **{k.replace("-", "_"): v
                                                           for k, v in ch.items()}, **overrides)
        except ValueError as e:
            rows.append({"run": run, "choices": ch, "refused": " ".join(str(e).split())})
            continue
        meter = measure_step(cfg)            # one at a time: no other run's tensors alive
        rows.append({"run": run, "choices": ch, "peak": int(meter.peak), **meter.breakdown(),
                     "changes": "-" if run == REFERENCE else changes(ch, cfg)})
        cfgs.append(cfg)
    ran = [r for r in rows if "refused" not in r]
    base_cfg = cfgs[0]
    T = int(round(base_cfg.seconds * 100))
    batches = []
    for r in ran:                            # the same batch for all, another for the reference
        torch.manual_seed(base_cfg.seed + (r["run"] == REFERENCE))
        batches.append(tasks.get(base_cfg.task).random_batch(base_cfg, base_cfg.batch_size, T,
                                                             device=base_cfg.device))
    seconds, params = _train(cfgs, batches, repeats + 1)
    base_full = scenarios.full_size(scenario, {}, fast) if full_size else {}
    for r, s, p in zip(ran, seconds, params):
        r.update(saving=ran[0]["peak"] / r["peak"], step_s=s, time=s / seconds[0],
                 drift=_drift(p, params[0]))
        r.update(full_peak=None, full_saving=None, full_breakdown=None)
        if full_size and r["run"] != REFERENCE:
            fs = scenarios.full_size(scenario, r["choices"], fast)
            if fs.get("available") and base_full.get("available"):
                r.update(full_peak=fs["peak"], full_saving=base_full["peak"] / fs["peak"],
                         full_breakdown=fs.get("breakdown") or None)
    return rows


def format_rows(rows: Sequence[Dict[str, Any]]) -> str:
    """``compare``'s rows as a plain-text table (MiB live, GiB at full size; '-': none)."""
    from memlab.report import format_table

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    out = []
    for r in rows:
        if "refused" in r:
            out.append({"run": r["run"], "peak": "refused", "saving": "-"})
            continue
        out.append({"run": r["run"], "peak": format_bytes(r["peak"]),
                    **{c[:5] if c != "activations" else "activ": f"{r.get(c, 0) / 2**20:.2f}"
                       for c in CATEGORIES},
                    "saving": f"{r['saving']:.2f}x", "step": f"{1e3 * r['step_s']:.0f} ms",
                    "time": f"{r['time']:.2f}x",
                    "full peak": "-" if r.get("full_peak") is None else
                    f"{r['full_peak'] / 2**30:.2f} GiB",
                    "full saving": num(r.get("full_saving"), ".1f"),
                    "drift": num(r.get("drift"), ".2g")})
    cols = ["run", "peak", "param", "gradi", "optim", "activ", "other", "saving", "step", "time",
            "full peak", "full saving", "drift"]
    return (format_table(out, cols) + "\n(categories in MiB at the live peak; saving: "
            "baseline peak / peak; time: step time / the baseline's; drift: see "
            "memlab.alternatives)")


def pruned_gap(s_ranges: Sequence[int], batch: int = 4, frames: int = 16, U: int = 6,
               vocab: int = 12, seed: int = 0) -> List[Dict[str, Any]]:
    """The pruned loss's band part (``memlab.pruned.pruned_rnnt_loss``, ``stats["pruned"]``)
    beside the exact RNN-T loss of the same joiner (``rnnt_loss_reference`` on the whole
    lattice), float64, one random lattice: ``{"s_range", "pruned", "full", "gap"}`` with
    gap = (pruned - full) / full. From s_range = U+1 the band is the lattice."""
    from memlab.models.transducer import Joiner
    from memlab.pruned import pruned_rnnt_loss
    from memlab.transducer import rnnt_loss_reference
    g = torch.Generator().manual_seed(seed)
    H = 16
    joiner = Joiner(H, H, H, vocab).double()
    with torch.no_grad():
        for p in joiner.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    enc = torch.randn(batch, frames, H, generator=g, dtype=torch.float64)      # (B, T, H)
    pred = torch.randn(batch, U + 1, H, generator=g, dtype=torch.float64)  # (B, U+1, H)
    am = torch.randn(batch, frames, vocab, generator=g, dtype=torch.float64)   # (B, T, V)
    lm = torch.randn(batch, U + 1, vocab, generator=g, dtype=torch.float64)  # (B, U+1, V)
    targets = torch.randint(1, vocab, (batch, U), generator=g)            # (B, U)
    enc_lengths = torch.full((batch,), frames, dtype=torch.long)
    target_lengths = torch.full((batch,), U, dtype=torch.long)
    with torch.no_grad():
        full = float(rnnt_loss_reference(joiner(enc, pred), targets, enc_lengths,
                                         target_lengths, blank=0))
        rows = []
        for s in s_ranges:
            stats: Dict[str, Any] = {}
            pruned_rnnt_loss(joiner, enc, pred, am, lm, targets, enc_lengths, target_lengths,
                             s_range=int(s), blank=0, stats=stats)
            band = float(stats["pruned"].mean())
            rows.append({"s_range": int(s), "pruned": band, "full": full,
                         "gap": (band - full) / full})
    return rows


def plan_summary(result) -> Dict[str, Any]:
    """A ``planner.plan`` result read off as ratios to the configuration as given:
    ``{"base_peak", "cheapest", "smallest"}``, each answer ``{"run", "peak", "ratio"}`` (None
    when nothing fits). Cheapest: the planner's first row (measured step-time ratios);
    smallest: the lowest peak among the rows."""
    base = int(result.base["peak"])

    def row(r):
        return None if r is None else {"run": r["run"], "peak": int(r["peak"]),
                                       "ratio": base / r["peak"], "choices": r.get("choices", {})}
    rows = list(result.rows)
    return {"base_peak": base, "cheapest": row(rows[0] if rows else None),
            "smallest": row(min(rows, key=lambda r: r["peak"]) if rows else None)}
