"""Scenarios: named presets sized so that a technique's regime is reached on a laptop CPU.

At the lab's defaults (a shallow speaker ResNet, 11 toy tokens) activations, optimizer state and
the transducer's 4-D tensor are all small, so every technique looks useless. A scenario sets the
*sizes* (model, depth, batch, utterance length, vocabulary) and names the *comparison* it is
about, its *baseline* run and its *full-size twin* (the paper-scale configuration that
``memlab.lab.estimate_config`` measures on fake tensors)::

    from memlab import scenarios
    scenarios.names()                               # ("deep-speaker", "long-utterances", ...)
    s = scenarios.get("deep-speaker"); s.description, s.comparison, s.baseline
    cfg = scenarios.config("deep-speaker", memory="reversible")   # a validated lab Config
    cfgs = scenarios.configs("everything")          # every run of its comparison
    scenarios.headline("everything")                # "at full size: 102.9 GiB -> 6.8 GiB, ..."

Every scenario runs with any registered technique (``config(name, optimizer="sgd8bit")``): it
only sets sizes. Each trains in about 2 minutes per run on a 2-core laptop CPU (seconds with
``MEMLAB_FAST=1``). ``memlab compare --scenario NAME`` runs its comparison and prints the ratio
of each run's peak to the baseline's, live and at full size (``full_size``, ``headline``).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from memlab import fast_mode
from memlab import techniques as tech

__all__ = ["Scenario", "FullSize", "names", "get", "config", "configs", "full_size",
           "headline", "ratios", "register_scenario", "choices_of"]


@dataclass(frozen=True)
class FullSize:
    """A scenario's paper-scale twin: Config fields, and estimate_config's frames / classes."""
    overrides: Mapping[str, Any]
    frames: Optional[int] = None
    num_classes: Optional[int] = None
    label: str = ""                       # e.g. "DF-ResNet233, batch 128 x 200 frames"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str                            # one line
    description: str                      # what regime it reaches and why the technique wins
    task: str
    overrides: Mapping[str, Any]          # Config fields (full size: ~2 min a run on a laptop)
    fast_overrides: Mapping[str, Any]     # the same in fast mode (seconds)
    comparison: Mapping[str, Tuple[str, ...]]   # kind -> names, crossed (memlab compare)
    baseline: Mapping[str, str]           # kind -> name of the run the ratios divide by
    twin: Optional[FullSize] = None       # the full-size twin (None: see full_size_fn)
    fast_twin: Optional[FullSize] = None  # a tiny stand-in in fast mode (same code path)
    paper: str = ""                       # what the paper reports, for the headline
    # (kind, name) -> Config fields for runs that choose it (e.g. a tuned lr per optimizer)
    per_choice: Mapping[Tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    # fast -> extra Config fields computed when a Config is built (e.g. a pretrained model)
    prepare: Optional[Callable[[bool], Dict[str, Any]]] = None
    # (choices, fast) -> full-size figures where estimate_config cannot run the step
    full_size_fn: Optional[Callable[[Dict[str, str], bool], Dict[str, Any]]] = None


_SCENARIOS: Dict[str, Scenario] = {}


def register_scenario(s: Scenario) -> Scenario:
    if not isinstance(s, Scenario):
        raise TypeError(f"scenario must be a memlab.scenarios.Scenario, got {type(s).__name__}")
    _SCENARIOS[s.name] = s
    return s


def names() -> Tuple[str, ...]:
    """Every scenario's name, in registration order (the dashboard's picker lists these)."""
    return tuple(_SCENARIOS)


def get(name: str) -> Scenario:
    """The scenario registered as ``name``; a ValueError naming the choices otherwise."""
    if not isinstance(name, str) or name not in _SCENARIOS:
        raise ValueError(f"scenario must be one of {names()}, got {name!r}")
    return _SCENARIOS[name]


def check_task(name: str, task: Optional[str]) -> Scenario:
    """The scenario ``name``, refusing a ``--task`` that contradicts it (None: any)."""
    from memlab import tasks
    s = get(name)
    tasks.require_same(task, s.task, name)
    return s


def _fast(fast: Optional[bool]) -> bool:
    return fast_mode() if fast is None else bool(fast)


def _config_fields(s: Scenario, choices: Mapping[str, str], fast: bool,
                   overrides: Mapping[str, Any]) -> Dict[str, Any]:
    from memlab.lab import FIELD_KINDS
    kw: Dict[str, Any] = dict(s.fast_overrides if fast else s.overrides)
    named: Dict[str, str] = dict(kw.pop("techniques", {}) or {})
    for kind, name in choices.items():
        if name is None:
            continue
        if kind not in tech.kinds():
            raise ValueError(f"kind must be one of {tech.kinds()}, got {kind!r}")
        if kind in FIELD_KINDS:
            kw[kind] = name
        else:
            named[kind] = name
        kw.update(s.per_choice.get((kind, name), {}))
    if s.prepare is not None and "init_from" not in overrides:
        kw.update(s.prepare(fast))
    over = dict(overrides)
    named.update(over.pop("techniques", None) or {})
    kw.update(over)
    if named:
        kw["techniques"] = named
    return kw


def _split_choices(overrides: Dict[str, Any]) -> Tuple[Dict[str, str], Dict[str, Any]]:
    """kind keyword arguments (memory=, optimizer=, precision=, ...) vs other Config fields."""
    kinds = {k.replace("-", "_"): k for k in tech.kinds()}
    choices = {kinds[k]: v for k, v in overrides.items() if k in kinds}
    rest = {k: v for k, v in overrides.items() if k not in kinds}
    return choices, rest


def config(name: str, fast: Optional[bool] = None, **overrides) -> "Config":  # noqa: F821
    """The validated Config of scenario ``name``'s baseline run; keyword arguments override it:
    a kind (``memory="reversible"``, ``optimizer="adam8bit"``, ``precision="bf16"``: any
    registered technique) or any Config field (``steps=20``)."""
    from memlab.lab import Config
    s = get(name)
    fast = _fast(fast)
    choices, rest = _split_choices(overrides)
    picked = dict(s.baseline)
    picked.update(choices)
    return Config.for_task(s.task, **_config_fields(s, picked, fast, rest)).validate()


def choices_of(name: str, choices: Optional[Mapping[str, Optional[str]]] = None
               ) -> List[Dict[str, str]]:
    """The runs of a scenario's comparison: kind -> name dicts, crossed in kinds() order.
    ``choices``: kind -> comma-separated names (or a sequence) replacing the scenario's list
    for that kind (None: keep it)."""
    s = get(name)
    lists: Dict[str, Tuple[str, ...]] = {k: tuple(v) for k, v in s.comparison.items()}
    for kind, v in (choices or {}).items():
        if v is None:
            continue
        if kind not in tech.kinds():
            raise ValueError(f"kind must be one of {tech.kinds()}, got {kind!r}")
        items = [x.strip() for x in v.split(",")] if isinstance(v, str) else list(v)
        items = [x for x in items if x]
        if not items:
            raise ValueError(f"{kind} must name at least one choice, got {v!r}")
        lists[kind] = tuple(items)
    kinds = [k for k in tech.kinds() if k in lists]
    return [dict(zip(kinds, combo)) for combo in itertools.product(*(lists[k] for k in kinds))]


def configs(name: str, choices: Optional[Mapping[str, Optional[str]]] = None,
            fast: Optional[bool] = None, **overrides) -> list:
    """The validated Configs of every run of scenario ``name``'s comparison (the first one
    evaluates the untrained model too, as ``memlab compare`` does)."""
    from memlab.lab import Config
    s = get(name)
    fast = _fast(fast)
    out = []
    for i, picked in enumerate(choices_of(name, choices)):
        full = dict(s.baseline)
        full.update(picked)
        kw = _config_fields(s, full, fast, dict(overrides))
        kw.setdefault("eval_at_start", i == 0)
        out.append(Config.for_task(s.task, **kw).validate())
    return out


def _choices(cfg) -> Dict[str, str]:
    return {k: v for k, v in cfg.choices().items() if tech.applies(k, cfg.task)}


def baseline_index(name: str, cfgs: Sequence) -> Optional[int]:
    """Index of the run in ``cfgs`` whose choices match the scenario's baseline (None: absent)."""
    base = get(name).baseline
    for i, cfg in enumerate(cfgs):
        if all(cfg.choice(k) == v for k, v in base.items()):
            return i
    return None


def ratios(name: str, rows: Sequence[Dict[str, Any]], cfgs: Sequence) -> List[Optional[float]]:
    """baseline peak / run peak for each row (the saving, > 1 is better); None without one."""
    i = baseline_index(name, cfgs)
    if i is None:
        return [None] * len(rows)
    base = rows[i]["peak"]
    return [base / r["peak"] if r.get("peak") else None for r in rows]


# ----------------------------------------------------------------------------- full size
@functools.lru_cache(maxsize=64)
def _estimate(name: str, picked: Tuple[Tuple[str, str], ...], fast: bool) -> Dict[str, Any]:
    from memlab.lab import Config, estimate_config
    s = get(name)
    twin = s.fast_twin if fast and s.fast_twin is not None else s.twin
    kw = dict(twin.overrides)
    from memlab.lab import FIELD_KINDS
    named = dict(kw.pop("techniques", {}) or {})
    for kind, v in picked:
        if kind in FIELD_KINDS:
            kw[kind] = v
        else:
            named[kind] = v
    if named:
        kw["techniques"] = named
    cfg = Config(task=s.task, **kw)
    est = estimate_config(cfg, steps=2, frames=twin.frames, num_classes=twin.num_classes)
    return {"peak": int(est.peak), "breakdown": est.breakdown(), "phase": est.peak_phase,
            "label": twin.label + (" (fast mode: a tiny stand-in)" if fast else ""),
            "config": cfg}


def full_size(name: str, choices: Optional[Mapping[str, str]] = None,
              fast: Optional[bool] = None) -> Dict[str, Any]:
    """The full-size twin of one run of scenario ``name`` (``choices``: kind -> name, the rest
    from its baseline), estimated on fake tensors: ``{"peak", "breakdown", "phase", "label",
    "config"}``; where the scenario defines its own twin (ASR: the paper's loss step), what
    ``full_size_fn`` gives (``{"available": False, "note": ...}`` where there is none). Cached
    per process."""
    s = get(name)
    fast = _fast(fast)
    picked = dict(s.baseline)
    picked.update({k: v for k, v in (choices or {}).items() if v is not None})
    if s.full_size_fn is not None:
        return s.full_size_fn(picked, fast)
    if s.twin is None:
        return {"available": False, "note": "no full-size twin"}
    out = dict(_estimate(name, tuple(sorted(picked.items())), fast))
    out["available"] = True
    return out


def headline(name: str, choices: Optional[Mapping[str, str]] = None,
             fast: Optional[bool] = None) -> str:
    """One line: the baseline's full-size peak -> this run's (default: the scenario's last
    run), the saving, and what the paper reports, e.g. ``at full size (DF-ResNet233, batch 128
    x 200 frames): 102.9 GiB -> 6.8 GiB, 15.2x; the paper reports up to 16.2x``."""
    from memlab.memory import format_bytes
    s = get(name)
    if choices is None:
        choices = choices_of(name)[-1]
    base, run = full_size(name, {}, fast), full_size(name, choices, fast)
    if not (base.get("available") and run.get("available")):
        note = run.get("note") or base.get("note") or "not available"
        parts = []
        parts.append(note)
        if s.paper:
            parts.append(f"the paper reports {s.paper}")
        return "; ".join(parts)
    ratio = base["peak"] / run["peak"]
    what = ", ".join(f"{k}={v}" for k, v in sorted(choices.items()))
    line = (f"at full size ({run['label']}; {what}): {format_bytes(base['peak'])} -> "
            f"{format_bytes(run['peak'])}, {ratio:.1f}x")
    return line + (f"; the paper reports {s.paper}" if s.paper else "")


# ----------------------------------------------------------------------------- the scenarios
def _asr_full_size(picked: Dict[str, str], fast: bool) -> Dict[str, Any]:
    """Braun et al.'s batch 1024 x 40 s (V 1024, joint 144; T and U from bench.transducer's
    frame and token rates): the loss step (joiner, loss, gradients of its inputs), measured by
    the meter on fake tensors (``bench.transducer.metered_bytes``; on CUDA ``run_paper`` runs
    it for real). The whole step of a paper-size encoder is not part of the claim."""
    loss = picked.get("loss", "batched")
    # fast: 8 x 4 s, V 64, groups of one utterance (1 MiB each), as the paper's are
    kw = dict(batch_size=8, seconds=4.0, vocab_size=64, max_chunk_bytes=2 << 20) if fast else {}
    rows = _paper_rows(tuple(sorted(kw.items())))
    label = ("the loss step, batch 8 x 4 s, V 64 (fast mode: a tiny stand-in)" if fast else
             "the loss step, batch 1024 x 40 s, V 1024, joint 144")
    if loss not in rows:
        return {"available": False, "label": label,
                "note": f"no full-size twin for loss={loss} (the paper's comparison is batched "
                        f"vs sample-wise)"}
    return {"available": True, "label": label, "peak": rows[loss]["peak_bytes"],
            "phase": None, "breakdown": {}, "config": None,
            "loss_step_bytes": {m: r["peak_bytes"] for m, r in rows.items()}}


@functools.lru_cache(maxsize=8)
def _paper_rows(kw: Tuple[Tuple[str, Any], ...]) -> Dict[str, Dict[str, Any]]:
    from memlab.bench.transducer import run_paper
    return {r["method"]: r for r in run_paper("cpu", **dict(kw))}


def _pretrained(fast: bool) -> Dict[str, Any]:
    from memlab.bench import lowrank
    path, _ = lowrank.pretrained(fast)
    pre = lowrank.pretrain_config(fast)
    return {"init_from": path, "width": pre.width, "depth": pre.depth,
            "vocab_size": pre.vocab_size}


LONG_UTTERANCE_GROUP_BYTES = 4 << 20     # long-utterances: the sample-wise loss's group budget


def _builtin() -> None:
    from memlab.data.syllables import MAX_SYLLABLE_VOCAB
    df233 = (3, 8, 63, 3)
    speaker_twin = FullSize(dict(model="dfresnet", blocks=df233, width=32, embed_dim=256,
                                 batch_size=128), frames=200, num_classes=5994,
                            label="DF-ResNet233, batch 128 x 200 frames, 5,994 speakers")
    speaker_fast_twin = FullSize(dict(model="dfresnet", blocks=(1, 1, 2, 1), width=8,
                                      embed_dim=32, batch_size=4), frames=50, num_classes=10,
                                 label="DF-ResNet 1-1-2-1, batch 4 x 50 frames")
    # Deep third stage: vanilla keeps ~4 expanded tensors per inverted-bottleneck block, so
    # activations dominate and grow with depth; checkpoint keeps one block input each;
    # reversible keeps none (the stage-1 working set is its floor). 240 steps of 8 x 1 s at
    # Adam lr 0.015, measured (memlab compare --scenario deep-speaker --seed 0/1/2, one thread):
    # peaks 281.35 / 57.87 / 48.45 / 48.46 MiB (vanilla / checkpoint / reversible /
    # reversible-full: 5.8x), steps 0.27 / 0.43 / 0.63 / 0.58 s, runs 83-176 s; EER 0.263 +-
    # 0.062 / 0.263 +- 0.062 / 0.288 +- 0.051 / 0.231 +- 0.013 against 0.487 untrained.
    deep = dict(model="dfresnet", blocks=(1, 1, 24, 1), width=8, batch_size=8, seconds=1.0,
                steps=240, eval_every=60, measure_every=20, num_speakers=24,
                utts_per_speaker=16, eval_speakers=12)
    deep_fast = dict(model="dfresnet", blocks=(1, 1, 6, 1), width=8, batch_size=4,
                     seconds=1.0, steps=4, eval_every=2, measure_every=2, num_speakers=6,
                     utts_per_speaker=4, eval_speakers=4)
    # Adam's default 2e-3 barely moves the deep net in 240 steps (EER 0.38 at 150 steps, 1-s
    # utterances; 6e-3: 0.31 at 240); 0.015 (8-bit Adam alike, the same update rule) learns.
    deep_lrs = {("optimizer", "adam"): {"lr": 0.015}, ("optimizer", "adam8bit"): {"lr": 0.015}}
    register_scenario(Scenario(
        name="deep-speaker",
        title="deep speaker net: activations dominate",
        description="A DF-ResNet with a deep third stage (24 inverted-bottleneck blocks, as "
                    "DF-ResNet233 has 63) on 1-s utterances: activations are most of the "
                    "step's memory and grow with every block. Checkpointing keeps one input "
                    "per block; reversible blocks keep none (their floor is the first stage's "
                    "working set); fully reversible also removes the strided downsampling.",
        task="speaker", overrides=deep, fast_overrides=deep_fast,
        comparison={"memory": ("vanilla", "checkpoint", "reversible", "reversible-full"),
                    "optimizer": ("adam",)},
        baseline={"memory": "vanilla", "optimizer": "adam"},
        per_choice=deep_lrs, twin=speaker_twin, fast_twin=speaker_fast_twin,
        paper="activation memory flat in depth for the reversible nets (Liu & Qian 2024)"))

    # Long utterances, large vocabulary: 320 syllables, 4 s each (~14 tokens), batch 16: the
    # joiner's B x T x (U+1) x V logits and their gradient grow with T x U, the encoder's
    # activations only with T. A lean encoder (one layer of width 96, no dropout: its masks were
    # half of the sample-wise step's activations) and groups of one utterance (4 MiB) leave the
    # sample-wise run little but the encoder. Learnable in minutes because of two choices:
    # the 240-ms context front end (each encoder frame sees a syllable from the first step) and
    # the factored output layer (onset row + nucleus row + the token's own, so each of the 36
    # sub-units learns from every token that has it); with either one missing the model stayed
    # on the blank plateau for 600 steps, and on 800 utterances it memorised them instead.
    # Measured (memlab compare --scenario long-utterances, 2 threads, 2 min 53 s for both runs
    # and the corpus): peaks 145.83 / 29.77 MiB (4.90x), steps 0.155 / 0.132 s, TER 0.692 /
    # 0.692 after 400 steps (untrained: 34.9, it emits 5 tokens a frame; seed 1: 0.532
    # sample-wise; Adam's ASR default 6e-3: 0.902 / 0.901). The batched loss runs memlab's
    # lattice kernel on the whole 4-D tensor (torchaudio's CPU kernel: 0.67 s a step, ~6 min a
    # run). At batch 12 109.66 / 26.06 MiB.
    asr = dict(vocab_size=MAX_SYLLABLE_VOCAB, seconds=4.0, batch_size=16, width=96, depth=1,
               frontend="context", output="factored", dropout=0.0,
               max_chunk_bytes=LONG_UTTERANCE_GROUP_BYTES,
               num_utts=2000, eval_utts=48, steps=400, eval_every=100, measure_every=50)
    # the Adam family at lr 0.01 (the ASR task's 6e-3: TER 0.90 after 400 steps; 0.008 / 0.012 /
    # 0.015: 0.75 / 0.76 / 0.68, sample-wise runs at batch 16, one thread)
    asr_lrs = {("optimizer", o): {"lr": 0.01}
               for o in ("adam", "adamw", "adam8bit", "adamw8bit", "adam4bit", "adamw4bit",
                         "adam4bit-nearest")}
    asr_fast = dict(vocab_size=MAX_SYLLABLE_VOCAB, seconds=5.0, batch_size=10, width=32,
                    depth=1, frontend="context", output="factored", dropout=0.0,
                    max_chunk_bytes=4 << 20, num_utts=8, eval_utts=4, steps=3, eval_every=3,
                    measure_every=2)
    register_scenario(Scenario(
        name="long-utterances",
        title="long utterances, large vocabulary: the 4-D joiner tensor dominates",
        description="A Transducer on the syllable corpus (320 compositional tokens + blank, "
                    "4-s utterances, ~14 tokens each, batch 16): the joiner's B x T x (U+1) x V "
                    "logits and their gradient grow with T x U, the encoder's activations only "
                    "with T, so they are most of the batched step. The encoder is lean (one "
                    "layer of width 96 behind a 240-ms context front end, no dropout) and the "
                    "output layer factored (each syllable's row: its onset's + its nucleus's + "
                    "its own). The sample-wise loss computes the logits one utterance at a time "
                    "(4 MiB groups) and frees each one's before the next: about a quarter of the "
                    "batched peak, with the same gradients, so the same TER curve (~0.69 after "
                    "400 steps; an empty transcript scores 1.0).",
        task="asr", overrides=asr, fast_overrides=asr_fast,
        comparison={"loss": ("batched", "samplewise"), "optimizer": ("adam",)},
        baseline={"loss": "batched", "optimizer": "adam"}, per_choice=asr_lrs,
        paper="batch 1024 x 40 s in 6 GB with the sample-wise loss (Braun et al. 2022)",
        full_size_fn=_asr_full_size))

    # Optimizer-bound: a wide net at a tiny batch (fine-tuning): weights, gradients and
    # optimizer state outweigh the activations.
    # 0.3 s: activations small enough that 8-bit Adam's saving is >= 30% of the whole peak
    # (87.95 -> 61.07 MiB measured); 300 steps (~1 min a run): EER 0.319 for both, 0.458 untrained
    wide = dict(model="resnet", depth=1, width=48, embed_dim=256, batch_size=4, seconds=0.3,
                steps=300, eval_every=75, measure_every=10, num_speakers=24,
                utts_per_speaker=8, eval_speakers=12)
    wide_fast = dict(model="resnet", depth=1, width=16, embed_dim=64, batch_size=4,
                     seconds=0.5, steps=4, eval_every=2, measure_every=2, num_speakers=6,
                     utts_per_speaker=4, eval_speakers=4)
    register_scenario(Scenario(
        name="optimizer-bound",
        title="optimizer-bound: a wide model at a small batch (fine-tuning)",
        description="A wide ResNet (stages of 48/96/192/384 channels) at batch 4 x 0.3 s: "
                    "parameters, gradients and optimizer state are most of the step. "
                    "8-bit block-wise states take ~1 B (SGD) / ~2 B (Adam) per parameter "
                    "instead of 4 / 8. (Batch 4: the smallest that every technique, accumulate4 "
                    "included, can run.)",
        task="speaker", overrides=wide, fast_overrides=wide_fast,
        comparison={"optimizer": ("sgd", "sgd8bit", "adam", "adam8bit")},
        baseline={"optimizer": "adam", "memory": "vanilla"},
        twin=FullSize(dict(model="resnet", blocks=(3, 4, 6, 3), width=64, embed_dim=256,
                           batch_size=4), frames=200, num_classes=5994,
                      label="ResNet34 at width 64, batch 4 x 200 frames, 5,994 speakers"),
        fast_twin=FullSize(dict(model="resnet", blocks=(1, 1, 1, 1), width=16, embed_dim=64,
                                batch_size=2), frames=50, num_classes=20,
                           label="ResNet 1-1-1-1 width 16, batch 2 x 50 frames"),
        paper="75% less optimizer-state memory (Liu & Qian 2024; Dettmers et al. 2021)"))

    # Personalization: the low-rank study (memlab.bench.lowrank): a pretrained Transducer
    # adapted to one unseen speaker at batch 2.
    from memlab.bench import lowrank
    adapt = dict(lowrank.ADAPT, adapt_speaker=lowrank.ADAPT_SPEAKER, eval_every=25,
                 measure_every=25, eval_at_start=True)
    adapt_fast = dict(lowrank.ADAPT_FAST, adapt_speaker=lowrank.ADAPT_SPEAKER, eval_every=2,
                      measure_every=2, eval_at_start=True)
    register_scenario(Scenario(
        name="personalization",
        title="personalization: adapting a pretrained Transducer to one speaker",
        description="The low-rank study's setting (memlab.bench.lowrank): a Transducer "
                    "pretrained on 8 synthetic speakers (cached after the first run) adapted "
                    "to an unseen one at batch 2, where gradients and optimizer state dominate. "
                    "LowRankAdam keeps gradients and Adam moments of rank-16 factors only.",
        task="asr", overrides=adapt, fast_overrides=adapt_fast,
        comparison={"optimizer": ("sgd", "adam", "lowrank-adam")},
        baseline={"optimizer": "adam"},
        per_choice={("optimizer", m): {"lr": lowrank.LRS[m]} for m in lowrank.METHODS} | {
            ("optimizer", "lowrank-adam"): {"lr": lowrank.LRS["lowrank-adam"],
                                            "optimizer_kwargs": {"rank": lowrank.RANK,
                                                                 "other_lr": lowrank.OTHER_LR}}},
        prepare=_pretrained,
        full_size_fn=lambda picked, fast: {
            "available": False, "note": "no full-size twin: the study adapts a small "
            "pretrained model, its sizes are the live ones", "label": "-"},
        paper="-33% memory for low-rank Adam, 4.5% relative lower WER than momentum "
              "(Gooneratne et al. 2020)"))

    register_scenario(Scenario(
        name="everything",
        title="everything together on the deep speaker net",
        description="The deep speaker net of 'deep-speaker' with reversible blocks and 8-bit "
                    "Adam together: the activations go with the reversible blocks, then the "
                    "optimizer state with 8-bit blocks (Liu & Qian's combination).",
        task="speaker", overrides=deep, fast_overrides=deep_fast,
        comparison={"memory": ("vanilla", "reversible-full"),
                    "optimizer": ("adam", "adam8bit")},
        baseline={"memory": "vanilla", "optimizer": "adam"},
        per_choice=deep_lrs, twin=speaker_twin, fast_twin=speaker_fast_twin,
        paper="up to 16.2x (reversible + 8-bit; Liu & Qian 2024)"))


_builtin()


def report(name: str, rows: Sequence[Dict[str, Any]], cfgs: Sequence,
           fast: Optional[bool] = None, full: bool = True) -> str:
    """What ``memlab compare --scenario`` prints beside the table: each run's peak as a ratio
    to the baseline run's, live and at the full-size twin (``full=False``: live only), and the
    paper's figure."""
    from memlab.memory import format_bytes
    s = get(name)
    live = ratios(name, rows, cfgs)
    i = baseline_index(name, cfgs)
    base_label = cfgs[i].label if i is not None else "(baseline not run)"
    out = [f"scenario {name}: {s.title}", f"ratios: baseline peak / run peak (baseline: "
           f"{base_label})"]
    base_full = full_size(name, {}, fast) if full else None
    for row, cfg, r in zip(rows, cfgs, live):
        line = f"  {cfg.label}: live {format_bytes(row['peak'])}"
        line += f" ({r:.2f}x)" if r is not None else ""
        if full:
            fs = full_size(name, _choices(cfg), fast)
            if fs.get("available") and base_full.get("available"):
                line += (f"; at full size {format_bytes(fs['peak'])} "
                         f"({base_full['peak'] / fs['peak']:.1f}x)")
            elif fs.get("loss_step_bytes"):
                lb = fs["loss_step_bytes"]
                mine = cfg.choice("loss")
                if mine in lb:
                    line += (f"; at full size, loss step alone {format_bytes(lb[mine])} "
                             f"({lb['batched'] / lb[mine]:.0f}x)")
        out.append(line)
    if full:
        last = _choices(cfgs[-1])
        out.append(headline(name, last, fast))
    return "\n".join(out)
