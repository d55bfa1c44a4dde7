"""Benchmark: low-rank gradients for ASR personalization -- training memory and TER per optimizer.

What is measured. A small Transducer (``memlab.models.Transducer``: conv front end, 2 Transformer
layers of width 256, LSTM predictor; 2.4 M parameters, 99 % of them in weight matrices) is
pretrained on 8 synthetic speakers (``TokenCorpus`` speakers 0..7; cached, see
:func:`pretrained`), then adapted to each of sixteen unseen synthetic speakers (``SPEAKERS``,
1000-1015; one adaptation per speaker, each from the pretrained model) with each optimizer for the
same number of steps, the same batches and the same LR schedule (10 % linear warm-up, then
cosine; ``memlab.lab.Experiment`` runs it, so the numbers match a ``MemoryLab`` run of
:func:`personalization_config`):

* ``sgd``           SGD with momentum 0.9 (one fp32 state tensor per parameter)
* ``adam``          torch.optim.Adam (two)
* ``lowrank-adam``  ``memlab.lowrank.LowRankAdam`` at each rank in ``ranks``: every weight matrix
  with >= 4096 entries (Linear / Conv / LSTM weights and MultiheadAttention's packed
  ``in_proj_weight``: 99.3 % of the parameters) trains through rank-r factors W + A B (gradients
  and Adam moments of A, B only); biases, norms, the embedding and two small matrices (the first
  conv kernel, 288 entries, and the joiner's 12 x 256 output layer), 16 k parameters in all,
  keep plain Adam at ``OTHER_LR`` (Gooneratne et al., ICASSP 2020, arXiv 2001.08885).

One row per method (and rank):

* ``peak_bytes`` and ``parameters`` / ``gradients`` / ``optimizer`` / ``activations`` / ``other``:
  ``MemoryMeter`` over a whole adaptation step (zero_grad, forward, backward, optimizer step) in
  the steady state (optimizer state already allocated; the largest metered step after step 1):
  total training memory and its breakdown at the peak. ``peak_vs_adam``: peak / Adam's peak.
* ``grad_opt_bytes``: what lives between steps besides the weights: every ``.grad`` plus every
  tensor in ``optimizer.state``, counted storage by storage after the last step.
* ``ter_before`` / ``ter_after``: token error rate (greedy decoding) on 100 held-out utterances of
  each unseen speaker before and after adaptation, mean over the speakers; ``ter_after_std``:
  the spread between speakers; ``ter_per_speaker``. ``vs_momentum``: the mean paired difference
  to momentum on the same speaker (negative: better), ``vs_momentum_se`` its standard error,
  ``wins_vs_momentum``: speakers better / equal / worse. ``pretrain_ter``: the pretrained model
  on held-out utterances of the training speakers (how good the starting point is).

Learning rates. Each method's lr (``LRS``, and ``OTHER_LR`` for lowrank-adam's plain-Adam group)
was chosen by :func:`sweep_lr` on the adaptation training splits of speakers 1000-1007 only
(3/4 trains, 1/4 is the dev set, the quarter rotating with the speaker; the held-out test
utterances are never used to choose): ``memlab bench lowrank`` uses the stored values,
``run(sweep=True)`` redoes the sweep. Memory is measured on CPU (live tensor storages); on CUDA
the meter also reads ``torch.cuda.max_memory_allocated``.

Sizes. The adaptation batch is small (2 utterances of 3-8 tokens, on-device personalization), so
that weight-sized memory (parameters, gradients, optimizer state) dominates the step: with large
batches activations dominate and every optimizer looks alike (try ``batch_size=16``).
``fast=True``: a width-128 model, seconds of work (tests, CI).

Results (``OMP_NUM_THREADS=1 memlab bench lowrank``; 2-core CPU, no GPU, torch 2.14.1, 1 thread;
9.4 min for the 80 adaptations with the pretrained model cached, pretraining 64-116 s once).
Pretrained TER on the training speakers 0.216; the sixteen unseen speakers before adaptation
0.288 (mean). MiB at the peak of a step (the same for every speaker); TER after adaptation, mean
+- std over the speakers; vs momentum: mean paired difference +- standard error, and speakers
better/equal/worse:

    method        rank  lr     peak   vs Adam  grads  optim  activ  grads+state  TER after      vs momentum
    momentum      -     3e-3   30.81  0.770    10.34   9.22   1.91  18.45        0.2342+-0.048  -
    adam          -     3e-4   40.04  1.000    10.34  18.45   1.91  27.67        0.2322+-0.041  -0.0019+-0.0033  7/2/7
    lowrank-adam  1     1e-3   23.36  0.583     1.45   0.22  12.30   0.24        0.2454+-0.044  +0.0112+-0.0047  6/0/10
    lowrank-adam  4     1e-3   23.83  0.595     1.45   0.52  12.33   0.39        0.2392+-0.040  +0.0051+-0.0032  4/0/12
    lowrank-adam  16    1e-3   25.72  0.643     1.45   1.71  12.44   0.98        0.2326+-0.041  -0.0016+-0.0036  8/4/4

Memory: low rank is 36-42 % below Adam and 17-24 % below momentum. The peaks sit in different
places: Adam and momentum peak in the optimizer step (every gradient and the state alive,
activations freed); low rank peaks at the start of backward (activations alive, including
W + A B that the parametrized LSTM, attention in_proj_weight and output projection keep for
backward). TER: rank 16 (``RANK``, the preset's default) is level with momentum (-0.002, within
half a standard error; better on 8 speakers, equal on 4, worse on 4) and with Adam; rank 4 is
behind by 0.005 +- 0.003 (worse on 12 of 16) and rank 1 by 0.011 +- 0.005, so for this model
and 100 steps a rank-4 update is not quite enough. Speakers 1000-1007 (whose training splits
chose the lrs) and 1008-1015 (never used for any choice) agree: rank 16 vs momentum
+0.0014 +- 0.0034 and -0.0045 +- 0.0065; rank 4 +0.0088 +- 0.0023 and +0.0014 +- 0.0059.

The sweep (``sweep_lr``, r=4 for lowrank-adam; dev TER, mean over speakers 1000-1007's dev
quarters, 60 distinct transcripts): sgd 1e-3 0.223, 3e-3 0.209, 1e-2 diverges; adam 3e-5
0.253, 1e-4 0.223, 3e-4 0.208, 1e-3 0.218; lowrank-adam at lr 1e-3 with OTHER_LR 3e-5 0.216,
1e-4 0.216, 3e-4 0.208, 1e-3 0.213, then at OTHER_LR 3e-4 lr 3e-4 0.246, 3e-3 0.214;
``merge_every`` 100 / 25 / 10 at lr 1e-3: 0.208 / 0.221 / 0.222, so the default 100 (one merge,
at the end of 100 steps) is kept. An earlier dev split (the same last 15 utterances for every
speaker: the synthetic speakers read the same transcripts, so only 15 distinct ones) ranked the
methods the other way round from the test set and was replaced by the rotating quarters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from memlab.lab import Config, Experiment, build_model, fast_mode, load_init, peak_record
from memlab.memory import CATEGORIES, MemoryMeter, storage_bytes

ADAPT_SPEAKER = 1000          # unseen: pretraining uses TokenCorpus speakers 0..7
# The study adapts to each of these unseen speakers in turn (from the same pretrained model) and
# reports the mean TER, its spread and the paired difference to momentum per speaker.
SPEAKERS = tuple(range(1000, 1016))
SPEAKERS_FAST = (1000, 1001)
PRESET_SPEAKERS = SPEAKERS    # --preset speakers: the default (kept for old command lines)
METHODS = ("sgd", "adam", "lowrank-adam")

# Pretraining on the default ASR corpus (8 speakers). About 1-2 min on a laptop CPU.
PRETRAIN = dict(width=256, depth=2, batch_size=16, steps=300, lr=6e-3, num_utts=600,
                eval_utts=60, vocab_size=12, seed=0)
PRETRAIN_FAST = dict(width=128, depth=1, batch_size=8, steps=12, lr=6e-3, num_utts=32,
                     eval_utts=8, vocab_size=12, seed=0)
# Adaptation to ADAPT_SPEAKER (same model sizes as pretraining).
ADAPT = dict(batch_size=2, steps=100, num_utts=60, eval_utts=100, seed=0)
ADAPT_FAST = dict(batch_size=2, steps=4, num_utts=8, eval_utts=4, seed=0)
# lr per method, chosen by sweep_lr (see the module docstring); lowrank-adam: every rank.
LRS = {"sgd": 3e-3, "adam": 3e-4, "lowrank-adam": 1e-3}
# lowrank-adam: lr of its plain-Adam group (biases, norms, embedding, two small matrices),
# chosen on the training splits like LRS (the same value as Adam's; the factors' lr is LRS's).
OTHER_LR = 3e-4
# The rank the preset uses: the smallest of the study's ranks (1, 4, 16) whose TER after adaptation
# is level with momentum's on this model (see the results above); 36 % less memory than Adam.
RANK = 16
SWEEP_LRS = {"sgd": (1e-3, 3e-3, 1e-2), "adam": (3e-5, 1e-4, 3e-4, 1e-3),
             "lowrank-adam": (3e-4, 1e-3, 3e-3)}

COLUMNS = ("method", "rank", "lr", "peak_bytes", "peak_vs_adam", *CATEGORIES, "grad_opt_bytes",
           "ter_before", "ter_after", "ter_after_std", "vs_momentum", "vs_momentum_se",
           "wins_vs_momentum", "ter_per_speaker", "pretrain_ter", "final_loss", "steps",
           "batch_size", "speakers")

_PRETRAINED: Dict[str, Tuple[str, Dict[str, float]]] = {}
_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- pretraining
def pretrain_config(fast: Optional[bool] = None, **overrides) -> Config:
    """The Config that pretrains the model on the training speakers."""
    fast = fast_mode() if fast is None else fast
    base = dict(PRETRAIN_FAST if fast else PRETRAIN)
    base.update(overrides)
    return Config(task="asr", eval_every=10 ** 6, measure_every=10 ** 6, **base).validate()


_SCRATCH: list = []          # this process's private temporary folder, when the cache is unsafe


def cache_dir() -> Path:
    """Where pretrained state dicts are kept: $MEMLAB_CACHE_DIR or ``~/.cache/memlab/pretrained``
    ($MEMLAB_CACHE), made private (``memlab._private``: ours, 0700); a folder another user could
    write to is never reused (a planted checkpoint would change every result): then a fresh
    private temporary folder serves this process."""
    from memlab._private import private_dir, user_cache_root
    wanted = os.environ.get("MEMLAB_CACHE_DIR") or user_cache_root() / "pretrained"
    try:
        return private_dir(wanted)
    except OSError as e:
        if not _SCRATCH:
            import warnings
            warnings.warn(f"memlab: not using the checkpoint cache ({e}); pretraining into a "
                          f"private temporary folder for this process")
            _SCRATCH.append(tempfile.TemporaryDirectory(prefix="memlab-cache-"))
        return Path(_SCRATCH[0].name)


_NEW_FIELDS = {"techniques": {}, "dev_fold": None}   # left out at these values: old keys hold


def _key(cfg: Config) -> str:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("eval_every", "measure_every", "device", "budget")
              and not (k in _NEW_FIELDS and v == _NEW_FIELDS[k])}
    text = json.dumps(fields, sort_keys=True, default=str) + torch.__version__
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def pretrained(fast: Optional[bool] = None, directory=None, **overrides) -> Tuple[str, Dict]:
    """Path of the pretrained state dict (trained once, then cached) and its metrics.

    The state dict is kept in a file under ``directory`` (default :func:`cache_dir`) named after
    a hash of the pretraining Config, so repeated calls, processes and notebook runs reuse it.
    Returns ``(path, {"ter": ..., "seconds": ...})``.
    """
    cfg = pretrain_config(fast, **overrides)
    key = _key(cfg)
    folder = Path(directory) if directory is not None else cache_dir()
    with _LOCK:
        memo = _PRETRAINED.get(f"{folder}/{key}")
        if memo is not None and os.path.isfile(memo[0]):
            return memo
        folder.mkdir(parents=True, exist_ok=True)
        path, meta = folder / f"transducer-{key}.pt", folder / f"transducer-{key}.json"
        if path.is_file() and meta.is_file():
            out = (str(path), json.loads(meta.read_text()))
        else:
            t0 = time.perf_counter()
            exp = Experiment(cfg)
            final = None
            for rec in exp.run():
                final = rec
            info = {"ter": float(final.metrics["ter"]), "loss": float(final.loss),
                    "seconds": time.perf_counter() - t0, "steps": cfg.steps}
            tmp = folder / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(info))
            os.replace(tmp, meta)
            torch.save(exp.model.state_dict(), tmp)
            os.replace(tmp, path)                       # atomic: readers never see half a file
            out = (str(path), info)
        _PRETRAINED[f"{folder}/{key}"] = out
        return out


# ----------------------------------------------------------------------------- adaptation
def personalization_config(method: str = "lowrank-adam", rank: Optional[int] = RANK, *,
                           fast: Optional[bool] = None, lr: Optional[float] = None,
                           merge_every: Optional[int] = None, other_lr: Optional[float] = None,
                           **overrides) -> Config:
    """A lab Config that adapts the pretrained model to ``ADAPT_SPEAKER`` with ``method``.

    ``method``: "sgd" (momentum), "adam" or "lowrank-adam" (``rank``, ``merge_every``,
    ``other_lr``: the lr of its plain-Adam group, default ``OTHER_LR``). Pretrains
    (or loads the cached model) first. Use it in the dashboard::

        cfg = personalization_config("lowrank-adam", rank=16)
        lab = MemoryLab(**lab_overrides(cfg)); lab.show(); lab.run(block=True)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "lowrank-adam":
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1 for method='lowrank-adam', got {rank!r}")
    fast = fast_mode() if fast is None else fast
    path, _ = pretrained(fast)
    pre = pretrain_config(fast)
    kw: Dict[str, Any] = {}
    if method == "lowrank-adam":
        kw["rank"] = rank
        if merge_every is not None:
            kw["merge_every"] = merge_every
        kw["other_lr"] = OTHER_LR if other_lr is None else other_lr
    base = dict(ADAPT_FAST if fast else ADAPT)
    steps = overrides.get("steps", base["steps"])
    base.update(task="asr", width=pre.width, depth=pre.depth, vocab_size=pre.vocab_size,
                optimizer=method, optimizer_kwargs=kw, lr=lr if lr is not None else LRS[method],
                init_from=path, adapt_speaker=ADAPT_SPEAKER, eval_at_start=True,
                eval_every=max(1, steps // 4), measure_every=max(2, steps // 4))
    base.update(overrides)
    return Config(**base).validate()


def lab_overrides(cfg: Config) -> Dict[str, Any]:
    """``MemoryLab(**lab_overrides(cfg))`` starts the dashboard on ``cfg``."""
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    d["optimizer_kwargs"] = dict(cfg.optimizer_kwargs)
    return d


def _persistent_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of every .grad and every tensor in optimizer.state (each storage once)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return storage_bytes([*grads, *opt.state.values()])


def adapt(cfg: Config) -> Dict[str, Any]:
    """Run one adaptation (an Experiment of ``cfg``); memory and TER in one flat dict."""
    exp = Experiment(cfg)
    records = list(exp.run())
    start = next((r for r in records if r.step == 0), None)
    peak = peak_record(records, skip_first=True)      # the steady state: after step 1
    tail = [r.loss for r in records if r.step > 0][-10:]
    out: Dict[str, Any] = {
        "peak_bytes": int(peak.peak),
        **{c: int(peak.breakdown[c]) for c in CATEGORIES},
        "grad_opt_bytes": _persistent_bytes(exp.model, exp.optimizer),
        "ter_before": float(start.metrics["ter"]) if start is not None else float("nan"),
        "ter_after": float(records[-1].metrics["ter"]),
        "final_loss": sum(tail) / len(tail),           # mean training loss, last 10 steps
    }
    return out


def dev_loss(exp: Experiment) -> float:
    """Mean transducer loss per utterance on the dev utterances of a finished ``exp`` whose
    Config has ``dev_fold`` set (its evaluation split is then the dev quarter)."""
    return exp.task.mean_loss(exp.model, exp.data.evaluation["test"], exp.data.collate,
                              exp.config.device)


def sweep_lr(method: str, rank: Optional[int] = 4, lrs: Optional[Sequence[float]] = None, *,
             fast: Optional[bool] = None, speakers: Optional[Sequence[int]] = None,
             **overrides) -> List[Dict[str, Any]]:
    """Dev TER of ``method`` for each lr, trained and evaluated on the adaptation training split.

    For each speaker in ``speakers`` (default: ``overrides["adapt_speaker"]`` or
    ``ADAPT_SPEAKER``) the model is adapted on 3/4 of that speaker's training split and evaluated
    on the other 1/4; ``dev_ter`` is the mean over the speakers (``dev_ters`` each). The
    synthetic speakers read the same transcripts, so the held-out quarter rotates with the
    speaker (fold i mod 4 for the i-th speaker): over four or more speakers every training
    transcript is a dev transcript once, instead of the same 15 for everyone.
    Returns one row per lr, the chosen one (lowest dev TER, then lowest final loss) marked
    ``chosen=True``. The held-out test utterances are not touched.
    """
    lrs = tuple(lrs or SWEEP_LRS[method])
    if speakers is None:
        speakers = (overrides.pop("adapt_speaker", ADAPT_SPEAKER),)
    rows = []
    quiet = {"eval_at_start": False, "eval_every": 10 ** 6, "measure_every": 10 ** 6}
    quiet.update(overrides)
    for lr in lrs:
        ters, losses, dev_losses = [], [], []
        for i, spk in enumerate(speakers):
            cfg = personalization_config(method, rank, fast=fast, lr=lr, adapt_speaker=spk,
                                         dev_fold=i, **quiet)     # rotating dev quarters
            exp = Experiment(cfg)
            records = list(exp.run())
            tail = [r.loss for r in records[-10:]]
            ters.append(float(records[-1].metrics["ter"]))
            dev_losses.append(dev_loss(exp))
            losses.append(sum(tail) / len(tail))
        rows.append({"method": method, "rank": rank if method == "lowrank-adam" else None,
                     "lr": lr, "dev_ter": sum(ters) / len(ters), "dev_ters": ters,
                     "dev_loss": sum(dev_losses) / len(dev_losses),
                     "final_loss": sum(losses) / len(losses)})
    best = min(rows, key=lambda r: (r["dev_ter"], r["final_loss"]))
    for r in rows:
        r["chosen"] = r is best
    return rows


def _std(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); nan for fewer than two values."""
    if len(xs) < 2:
        return float("nan")
    mean = sum(xs) / len(xs)
    return (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def run(fast: bool = False, ranks: Iterable[int] = (1, 4, 16), methods: Sequence[str] = METHODS,
        *, lrs: Optional[Dict[str, float]] = None, sweep: bool = False,
        speakers: Optional[Sequence[int]] = None, steps: Optional[int] = None,
        batch_size: Optional[int] = None, merge_every: Optional[int] = None,
        other_lr: Optional[float] = None, device: str = "cpu",
        preset: Optional[str] = None) -> List[Dict[str, Any]]:
    """The personalization study: one row per method (lowrank-adam: per rank).

    ``speakers``: the unseen speakers to adapt to, one after another from the same pretrained
    model, every method with the same batches (default ``SPEAKERS``, sixteen; fast mode
    ``SPEAKERS_FAST``). Per row: ``ter_before`` / ``ter_after`` are means over the speakers,
    ``ter_after_std`` the spread between speakers, ``ter_per_speaker`` each speaker's TER after
    adaptation; ``vs_momentum`` is the mean paired difference (TER after - momentum's TER after
    on the same speaker; negative: better than momentum), ``vs_momentum_se`` its standard error
    (std of the differences / sqrt(speakers)), ``wins_vs_momentum`` "better/equal/worse" speaker
    counts. Memory is that of the first speaker.

    ``lrs`` overrides ``LRS``; ``sweep=True`` chooses each method's lr with :func:`sweep_lr`
    first (on the same speakers' training splits; lowrank-adam at the middle rank).
    ``steps`` / ``batch_size`` / ``merge_every`` / ``other_lr`` (lowrank-adam's plain group,
    default ``OTHER_LR``) override the adaptation settings.
    ``preset="speakers"``: the default (kept for ``memlab bench lowrank --preset speakers``).
    """
    if preset is not None:
        if preset != "speakers":
            raise ValueError(f"preset must be None or 'speakers', got {preset!r}")
        speakers = PRESET_SPEAKERS if speakers is None else speakers
    ranks = tuple(ranks)
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"ranks must be ints >= 1, got {ranks!r}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be drawn from {METHODS}, got {m!r}")
    if speakers is None:
        speakers = SPEAKERS_FAST if fast else SPEAKERS
    speakers = tuple(speakers)
    if not speakers or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 8
                               for s in speakers):
        raise ValueError(f"speakers must be unseen speaker ids (ints >= 8; 0..7 are the "
                         f"pretraining speakers), got {speakers!r}")
    over: Dict[str, Any] = {"device": device}
    if steps is not None:
        over["steps"] = steps
    if batch_size is not None:
        over["batch_size"] = batch_size
    chosen = dict(LRS)
    chosen.update(lrs or {})
    if sweep:
        for m in methods:
            r = ranks[len(ranks) // 2] if m == "lowrank-adam" else None
            rows = sweep_lr(m, r, fast=fast, merge_every=merge_every, other_lr=other_lr,
                            speakers=speakers, **over)
            chosen[m] = next(x["lr"] for x in rows if x["chosen"])
    _, info = pretrained(fast)
    jobs = [(m, r) for m in methods for r in (ranks if m == "lowrank-adam" else (None,))]
    results: Dict[Tuple[str, Optional[int]], List[Dict[str, Any]]] = {j: [] for j in jobs}
    before: Dict[int, float] = {}
    for spk in speakers:
        for m, r in jobs:
            # the TER before adaptation is the same for every method: evaluate it once
            cfg = personalization_config(m, r, fast=fast, lr=chosen[m], merge_every=merge_every,
                                         other_lr=other_lr, adapt_speaker=spk,
                                         eval_at_start=spk not in before, eval_every=10 ** 6,
                                         **over)
            res = adapt(cfg)
            before.setdefault(spk, res["ter_before"])
            res["ter_before"] = before[spk]
            results[(m, r)].append(res)
    rows = []
    for m, r in jobs:
        res = results[(m, r)]
        ters = [x["ter_after"] for x in res]
        row = {"method": "momentum" if m == "sgd" else m, "rank": r, "lr": chosen[m],
               "steps": cfg.steps, "batch_size": cfg.batch_size, **res[0]}
        for k in ("ter_before", "ter_after", "final_loss"):
            row[k] = sum(x[k] for x in res) / len(res)
        row["ter_after_std"] = _std(ters)
        row["ter_per_speaker"] = [round(t, 4) for t in ters]
        row["speakers"] = len(speakers)
        row["pretrain_ter"] = info["ter"]
        rows.append(row)
    mom = next((x for x in rows if x["method"] == "momentum"), None)
    adam = next((x for x in rows if x["method"] == "adam"), None)
    for x in rows:
        x["peak_vs_adam"] = x["peak_bytes"] / adam["peak_bytes"] if adam else float("nan")
        if mom is None:
            x["vs_momentum"] = x["vs_momentum_se"] = float("nan")
            x["wins_vs_momentum"] = None
            continue
        diff = [a - b for a, b in zip(x["ter_per_speaker"], mom["ter_per_speaker"])]
        x["vs_momentum"] = sum(diff) / len(diff)
        x["vs_momentum_se"] = _std(diff) / len(diff) ** 0.5
        x["wins_vs_momentum"] = (f"{sum(d < 0 for d in diff)}/{sum(d == 0 for d in diff)}/"
                                 f"{sum(d > 0 for d in diff)}")
    return [{k: x[k] for k in COLUMNS} for x in rows]


def check(rows: Sequence[Dict[str, Any]], saving: float = 0.30) -> List[Dict[str, Any]]:
    """The acceptance criteria, one row per low-rank row: peak at least ``saving`` below Adam's,
    peak relative to momentum's, TER after adaptation no worse than momentum's.

    ``ter_ok``: the mean TER after adaptation over the speakers is <= momentum's.
    ``ter_ok_within_noise``: the mean paired difference to momentum is at most two standard
    errors above zero (not worse beyond the speaker-to-speaker noise).
    """
    by = {x["method"]: x for x in rows if x["method"] != "lowrank-adam"}
    adam, mom = by.get("adam"), by.get("momentum")
    out = []
    for x in rows:
        if x["method"] != "lowrank-adam" or adam is None or mom is None:
            continue
        se = x.get("vs_momentum_se", float("nan"))
        diff = x.get("vs_momentum", x["ter_after"] - mom["ter_after"])
        out.append({"rank": x["rank"],
                    "saving_vs_adam": 1 - x["peak_bytes"] / adam["peak_bytes"],
                    "memory_ok": x["peak_bytes"] <= (1 - saving) * adam["peak_bytes"],
                    "peak_vs_momentum": x["peak_bytes"] / mom["peak_bytes"],
                    "ter_after": x["ter_after"], "momentum_ter_after": mom["ter_after"],
                    "vs_momentum": diff, "vs_momentum_se": se,
                    "ter_ok": x["ter_after"] <= mom["ter_after"],
                    "ter_ok_within_noise": diff <= 2 * (0.0 if se != se else se)})
    return out


# ----------------------------------------------------------------------------- for the notebook
def gradient_spectra(fast: Optional[bool] = None, batch_size: int = 8,
                     min_size: int = 4096) -> List[Dict[str, Any]]:
    """Singular values of the gradient of every weight matrix of the pretrained model.

    One backward pass on ``batch_size`` utterances of the unseen speaker. One row per matrix
    (viewed as out x rest): ``name``, ``shape``, ``sv`` (singular values, largest first, divided
    by the largest), ``energy_rank_90`` (how many singular values hold 90 % of the squared
    Frobenius norm) and ``energy_at`` (the fraction held by the top 1, 4, 16).
    """
    from memlab import tasks
    fast = fast_mode() if fast is None else fast
    cfg = personalization_config("adam", None, fast=fast)
    torch.manual_seed(0)
    model = load_init(build_model(cfg), cfg.init_from)
    data = tasks.get(cfg.task).data(cfg)
    batch = data.collate(data.train[:batch_size])
    model.train()
    model(*batch).backward()
    rows = []
    for name, p in model.named_parameters():
        if p.dim() < 2 or p.numel() < min_size or p.grad is None or "embed" in name:
            continue
        g = p.grad.detach().reshape(p.shape[0], -1).double()            # (m, n)
        sv = torch.linalg.svdvals(g)                                      # (min(m, n),)
        energy = (sv ** 2).cumsum(0) / (sv ** 2).sum()
        rows.append({"name": name, "shape": tuple(g.shape),
                     "sv": (sv / sv[0]).tolist(),
                     "energy_rank_90": int((energy < 0.9).sum()) + 1,
                     "energy_at": {r: float(energy[min(r, len(sv)) - 1]) for r in (1, 4, 16)}})
    return rows


def memory_vs_rank(m: int = 1024, n: int = 1024, ranks: Iterable[int] = (1, 2, 4, 8, 16, 32, 64),
                   batch: int = 8, device: str = "cpu") -> List[Dict[str, Any]]:
    """Gradient + Adam-state bytes of one m x n weight (nn.Linear without bias), measured.

    For torch Adam and LowRankAdam at each rank: one warm-up step, then a step inside a
    ``MemoryMeter``; ``measured_bytes`` is the live gradients + optimizer state at its end (what
    persists between steps; torch Adam adds a 4-byte step-counter tensor). ``predicted_bytes``:
    Adam 3 m n, low rank 3 r (m + n) fp32 numbers (gradients and two moments of A and B; a rank
    >= min(m, n) is full: exactly Adam). ``ratio``: measured / Adam's measured;
    ``predicted_ratio`` = r (m + n) / (m n).
    """
    from memlab.lowrank import LowRankAdam
    rows = []
    x = torch.randn(batch, n, device=device)                              # (B, n)
    for r in (None, *ranks):
        torch.manual_seed(0)
        lin = torch.nn.Linear(n, m, bias=False).to(device)
        opt = (torch.optim.Adam(lin.parameters(), lr=1e-3) if r is None else
               LowRankAdam(lin, lr=1e-3, rank=r, min_size=0, seed=0))

        def step():
            opt.zero_grad(set_to_none=True)
            lin(x).square().mean().backward()                             # (B, m) -> scalar
            opt.step()

        step()
        with MemoryMeter(device, model=lin, optimizer=opt, inputs=(x,)) as meter:
            step()
            now = meter.now()
        measured = now["gradients"] + now["optimizer"]
        full = r is None or r >= min(m, n)        # full rank: one m x n factor, exactly Adam
        k = m * n if full else r * (m + n)
        rows.append({"method": "adam" if r is None else "lowrank-adam", "rank": r,
                     "measured_bytes": measured, "predicted_bytes": 4 * 3 * k,
                     "predicted_ratio": k / (m * n)})
    adam = rows[0]["measured_bytes"]
    for row in rows:
        row["ratio"] = row["measured_bytes"] / adam
    return rows
