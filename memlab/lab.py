"""The lab: a Config becomes an Experiment, which trains a real model and yields one Record a step.

    from memlab.lab import Config, Experiment
    for record in Experiment(Config(task="speaker", optimizer="adam8bit")).run():
        print(record.step, record.loss, record.peak, record.metrics)

Every ``measure_every`` steps (and on step 1) the step runs inside a ``MemoryMeter``; those
records carry the peak, the breakdown by category and the timeline of live bytes through
forward, backward and the optimizer step. The other steps run without the meter, so their
``seconds`` are honest step times. Every ``eval_every`` steps (and at the end) the model is
evaluated: speaker task -> accuracy on held-out utterances of the training speakers, EER and
minDCF on unseen speakers; ASR task -> token error rate with greedy decoding.

``MEMLAB_FAST=1`` shrinks ``Config.for_task`` defaults to a few seconds of work (tests, CI).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from memlab import registry
from memlab.memory import Estimate, MemoryMeter, estimate

TASKS = ("speaker", "asr")
MODELS = {"speaker": ("resnet", "dfresnet"), "asr": ("transducer",)}


def _is_real(v) -> bool:
    """A real number that is not a bool (True is an int to Python, not a size to a learner)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def fast_mode() -> bool:
    """True when MEMLAB_FAST is set to something other than '' or '0'."""
    return os.environ.get("MEMLAB_FAST", "") not in ("", "0")


@dataclass
class Config:
    """Everything that defines one run. Sizes are the knobs a learner turns."""
    task: str = "speaker"             # "speaker" | "asr"
    model: Optional[str] = None       # speaker: "resnet" | "dfresnet"; asr: "transducer"
    depth: int = 1                    # blocks per stage (speaker) / encoder layers (asr)
    width: int = 8                    # base channels (speaker) / encoder dim (asr)
    blocks: Optional[Tuple[int, ...]] = None  # per-stage blocks; overrides depth (speaker)
    embed_dim: int = 64               # speaker embedding size
    batch_size: int = 32
    steps: int = 150
    lr: Optional[float] = None        # None: the optimizer's registered default
    weight_decay: float = 0.0
    memory: str = "vanilla"           # registry "memory"
    optimizer: str = "adam"           # registry "optimizer"
    loss: str = "batched"             # registry "loss" (asr)
    optimizer_kwargs: Dict[str, Any] = field(default_factory=dict)
    num_speakers: int = 24            # training speakers (speaker task)
    utts_per_speaker: int = 24
    eval_speakers: int = 12           # unseen speakers for EER
    seconds: float = 1.0              # utterance length (speaker task)
    vocab_size: int = 12              # tokens incl. blank (asr)
    num_utts: int = 600               # training utterances (asr)
    eval_utts: int = 60
    eval_every: int = 50
    measure_every: int = 10
    seed: int = 0
    device: str = "cpu"
    budget: Optional[int] = None      # bytes: metered steps raise MemoryBudgetExceeded past it
    warmup: float = 0.1               # fraction of steps with linear LR warm-up, then cosine
    eval_at_start: bool = False       # yield a step-0 record with the untrained model's metrics
    init_from: Optional[str] = None   # state-dict file loaded into the model before training
    adapt_speaker: Optional[int] = None  # asr: train and test on this one synthetic speaker only

    @classmethod
    def for_task(cls, task: str = "speaker", **overrides) -> "Config":
        """Defaults that train in about a minute on a laptop CPU (seconds with MEMLAB_FAST=1)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        base: Dict[str, Any] = {"task": task}
        if task == "asr":
            # width 128, 300 steps: TER 0.35 on unseen utterances (an empty transcript scores
            # 1.0); the Adam-family lr 6e-3 was chosen by a small sweep (see the ASR notes)
            base.update(width=128, depth=2, batch_size=16, steps=300, eval_every=50,
                        optimizer="adam")
            if overrides.get("optimizer", "adam") in ("adam", "adamw", "adam8bit", "adamw8bit",
                                                      "lowrank-adam"):
                base["lr"] = 6e-3
        if fast_mode():
            base.update(steps=6, eval_every=3, measure_every=3, num_speakers=6,
                        utts_per_speaker=4, eval_speakers=4, seconds=1.0, num_utts=24,
                        eval_utts=6, batch_size=4)
            if task == "asr":
                base.update(width=32, depth=1)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    @property
    def model_name(self) -> str:
        return self.model or MODELS[self.task][0]

    @property
    def label(self) -> str:
        """A short human name for tables and legends."""
        parts = [self.model_name, f"d{self.depth}" if self.blocks is None else
                 "x".join(map(str, self.blocks)), f"w{self.width}", f"B{self.batch_size}",
                 self.optimizer]
        if self.optimizer == "lowrank-adam" and "rank" in self.optimizer_kwargs:
            parts[-1] += f" r{self.optimizer_kwargs['rank']}"
        if self.task == "speaker":
            parts.insert(1, self.memory)
        else:
            parts.append(self.loss)
        if self.adapt_speaker is not None:
            parts.append(f"spk{self.adapt_speaker}")
        return " ".join(parts)

    def validate(self) -> "Config":
        """Raise a clear ValueError/TypeError for bad values; returns self."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.model_name not in MODELS[self.task]:
            raise ValueError(f"model must be one of {MODELS[self.task]} for task={self.task!r}, "
                             f"got {self.model!r}")
        for name in ("depth", "width", "embed_dim", "batch_size", "steps", "num_speakers",
                     "utts_per_speaker", "eval_speakers", "vocab_size", "num_utts", "eval_utts",
                     "eval_every", "measure_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} ({v!r})")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.num_speakers < 2 or self.eval_speakers < 2:
            raise ValueError(f"num_speakers and eval_speakers must be >= 2, got "
                             f"{self.num_speakers} and {self.eval_speakers}")
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 (blank + 2 tokens), got {self.vocab_size}")
        if self.blocks is not None:
            if not (isinstance(self.blocks, (tuple, list)) and len(self.blocks) == 4
                    and all(isinstance(b, int) and b >= 1 for b in self.blocks)):
                raise ValueError(f"blocks must be 4 ints >= 1, got {self.blocks!r}")
        if not (_is_real(self.seconds) and 0.3 <= self.seconds <= 60):
            raise ValueError(f"seconds must be between 0.3 and 60, got {self.seconds!r}")
        if self.lr is not None and not (_is_real(self.lr) and math.isfinite(self.lr)
                                        and self.lr > 0):
            raise ValueError(f"lr must be a positive, finite number or None, got {self.lr!r}")
        if not (_is_real(self.weight_decay) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got "
                             f"{self.weight_decay!r}")
        if not (_is_real(self.warmup) and 0 <= self.warmup < 1):
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if self.budget is not None and not (_is_real(self.budget) and math.isfinite(self.budget)
                                            and self.budget > 0):
            raise ValueError(f"budget must be a positive, finite number of bytes or None, got "
                             f"{self.budget!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__} ({self.seed!r})")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not isinstance(self.optimizer_kwargs, dict):
            raise TypeError(f"optimizer_kwargs must be a dict, got "
                            f"{type(self.optimizer_kwargs).__name__} ({self.optimizer_kwargs!r})")
        if self.init_from is not None:
            if not isinstance(self.init_from, (str, os.PathLike)):
                raise TypeError(f"init_from must be None or a path to a state-dict file, got "
                                f"{type(self.init_from).__name__} ({self.init_from!r})")
            if not os.path.isfile(self.init_from):
                raise ValueError(f"init_from must name an existing state-dict file, got "
                                 f"{os.fspath(self.init_from)!r} (no such file)")
        if self.adapt_speaker is not None:
            if isinstance(self.adapt_speaker, bool) or not isinstance(self.adapt_speaker, int):
                raise TypeError(f"adapt_speaker must be None or an int speaker id, got "
                                f"{type(self.adapt_speaker).__name__} ({self.adapt_speaker!r})")
            if self.adapt_speaker < 0:
                raise ValueError(f"adapt_speaker must be >= 0, got {self.adapt_speaker}")
            if self.task != "asr":
                raise ValueError(f"adapt_speaker applies to task='asr' only, got "
                                 f"task={self.task!r}")
        registry.get("memory", self.memory, self.task)
        registry.get("optimizer", self.optimizer, self.task)
        if self.task == "asr":
            registry.get("loss", self.loss, self.task)
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must name a torch device, got {self.device!r}") from e
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:index]', got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={self.device!r} but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible")
        return self


@dataclass
class Record:
    """One training step. Memory fields are set on metered steps, metrics on evaluation steps."""
    step: int
    loss: float
    seconds: float                         # wall time of the step (meter overhead included if metered)
    lr: float
    metered: bool = False
    peak: Optional[int] = None             # bytes at the step's peak
    breakdown: Optional[Dict[str, int]] = None          # by category at the peak
    category_peaks: Optional[Dict[str, int]] = None     # each category's own maximum
    device_peak: Optional[int] = None      # torch.cuda.max_memory_allocated (CUDA only)
    timeline: Optional[Dict[str, list]] = None          # MemoryMeter.timeline_arrays()
    metrics: Optional[Dict[str, float]] = None          # accuracy/eer/min_dcf or ter
    final: bool = False                    # last record of the run (stopped or finished)

    def as_dict(self, timeline: bool = False) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if not timeline:
            d.pop("timeline")
        return d


# ----------------------------------------------------------------------------- data (cached)
@functools.lru_cache(maxsize=8)
def _speaker_data(num_speakers, utts, eval_speakers, seconds, seed):
    from memlab.data import SpeakerCorpus
    train = SpeakerCorpus(num_speakers, utts, seconds=seconds, seed=seed)
    heldout = SpeakerCorpus(num_speakers, max(2, utts // 4), seconds=seconds, seed=seed + 7919)
    unseen = SpeakerCorpus(eval_speakers, max(4, utts // 3), seconds=seconds, seed=seed + 104729,
                           speaker_offset=10_000)
    return _materialise(train), _materialise(heldout), _materialise(unseen)


@functools.lru_cache(maxsize=8)
def _asr_data(num_utts, eval_utts, vocab_size, seed, speaker=None):
    """Train / test utterances of the default speakers, or (speaker=id) of that one speaker."""
    from memlab.data import TokenCorpus
    who = {} if speaker is None else {"speaker_offset": speaker, "num_speakers": 1}
    train = TokenCorpus(num_utts, vocab_size=vocab_size, seed=seed, **who)
    test = TokenCorpus(eval_utts, vocab_size=vocab_size, seed=seed + 104729, **who)
    return _materialise(train), _materialise(test)


def _materialise(ds) -> List[dict]:
    return [ds[i] for i in range(len(ds))]


def _batches(items: List[dict], batch_size: int, collate, generator: torch.Generator,
             shuffle: bool = True, drop_last: bool = True):
    """Endless (shuffle=True) or single-pass stream of collated batches."""
    n = len(items)
    while True:
        order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
        stop = n - (n % batch_size) if (drop_last and n >= batch_size) else n
        for i in range(0, stop, batch_size):
            yield collate([items[j] for j in order[i:i + batch_size]])
        if not shuffle:
            return


# ----------------------------------------------------------------------------- models
class SpeakerNet(nn.Module):
    """Embedding backbone + AAM-softmax head; forward returns (loss, logits)."""

    def __init__(self, backbone: nn.Module, embed_dim: int, num_classes: int):
        super().__init__()
        from memlab.models import AAMSoftmax
        self.backbone = backbone
        self.head = AAMSoftmax(embed_dim, num_classes, margin=0.2, scale=32.0)

    def forward(self, feats, labels):
        emb = self.backbone(feats)                 # (B, E)
        return self.head(emb, labels)              # loss, logits (B, C)


def build_model(cfg: Config, num_classes: Optional[int] = None) -> nn.Module:
    """The model a Config describes (speaker: SpeakerNet, asr: Transducer)."""
    if cfg.task == "speaker":
        from memlab.models import DFResNet, ResNet
        blocks = tuple(cfg.blocks) if cfg.blocks is not None else (cfg.depth,) * 4
        if cfg.model_name == "resnet":
            backbone = ResNet(num_blocks=blocks, width=cfg.width, embed_dim=cfg.embed_dim,
                              memory=cfg.memory)
        else:
            backbone = DFResNet(depths=blocks, width=cfg.width, embed_dim=cfg.embed_dim,
                                memory=cfg.memory)
        return SpeakerNet(backbone, cfg.embed_dim, num_classes or cfg.num_speakers)
    from memlab.models import Transducer
    return Transducer(cfg.vocab_size, enc_dim=cfg.width, enc_layers=cfg.depth,
                      pred_dim=cfg.width, joint_dim=cfg.width, loss=cfg.loss)


def load_init(model: nn.Module, path) -> nn.Module:
    """Load the state dict saved at ``path`` (``torch.load(..., weights_only=True)``) into model.

    The file must hold exactly the model's keys and shapes (a model trained with
    ``lowrank-adam`` is saved after ``optimizer.remove()``, which folds the factors in).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the argument named
        raise ValueError(f"init_from: could not load a state dict from {os.fspath(path)!r} "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"init_from: {os.fspath(path)!r} holds a {type(state).__name__}, "
                         f"expected a state dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"init_from: {os.fspath(path)!r} does not fit the model of this Config "
                         f"(check task, width, depth, vocab_size): {e}") from e
    if missing or unexpected:
        raise ValueError(f"init_from: {os.fspath(path)!r} does not fit the model of this Config "
                         f"(check task, width, depth, vocab_size): missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    return model


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    entry = registry.get("optimizer", cfg.optimizer, cfg.task)
    lr = cfg.lr if cfg.lr is not None else entry.options.get("default_lr", 1e-3)
    return entry.factory(model, lr=lr, weight_decay=cfg.weight_decay, **dict(cfg.optimizer_kwargs))


def _schedule(cfg: Config, opt) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(cfg.warmup * cfg.steps))

    def factor(step):  # step counts from 0
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, cfg.steps - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------- experiment
class Experiment:
    """Trains the model a Config describes; ``run()`` yields a Record per step.

    ``stop()`` (from any thread) ends the run after the current step; the last record has
    ``final=True`` and carries the final evaluation.
    """

    def __init__(self, config: Config):
        if not isinstance(config, Config):
            raise TypeError(f"config must be a memlab.lab.Config, got {type(config).__name__}")
        self.config = config.validate()
        self._stop = threading.Event()
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.records: List[Record] = []

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # -- set-up
    def _setup(self):
        cfg = self.config
        torch.manual_seed(cfg.seed)
        dev = torch.device(cfg.device)
        if cfg.task == "speaker":
            from memlab.data import collate_speaker
            self._train, self._heldout, self._unseen = _speaker_data(
                cfg.num_speakers, cfg.utts_per_speaker, cfg.eval_speakers, float(cfg.seconds),
                cfg.seed)
            self._collate = collate_speaker
        else:
            from memlab.data import collate_asr
            self._train, self._test = _asr_data(cfg.num_utts, cfg.eval_utts, cfg.vocab_size,
                                                cfg.seed, cfg.adapt_speaker)
            self._collate = collate_asr
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(dev)
        if cfg.init_from is not None:
            load_init(self.model, cfg.init_from)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = _schedule(cfg, self.optimizer)
        gen = torch.Generator().manual_seed(cfg.seed)
        self._stream = _batches(self._train, min(cfg.batch_size, len(self._train)),
                                self._collate, gen)

    def _to_device(self, batch):
        dev = torch.device(self.config.device)
        return tuple(t.to(dev) for t in batch)

    def _loss(self, batch) -> torch.Tensor:
        if self.config.task == "speaker":
            feats, _lengths, labels = batch
            loss, _logits = self.model(feats, labels)
            return loss
        feats, feat_lengths, targets, target_lengths = batch
        return self.model(feats, feat_lengths, targets, target_lengths)

    def _train_step(self, batch) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(batch)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Speaker: accuracy (held-out utterances), EER and minDCF (unseen speakers). ASR: TER."""
        from memlab import metrics
        cfg, model = self.config, self.model
        was_training = model.training
        model.eval()
        try:
            if cfg.task == "speaker":
                correct = total = 0
                for feats, _l, labels in _batches(self._heldout, 64, self._collate, None,
                                                  shuffle=False, drop_last=False):
                    feats, labels = self._to_device((feats, labels))
                    _loss, logits = model(feats, labels)
                    correct += int((logits.argmax(-1) == labels).sum())
                    total += len(labels)
                embs, spk = [], []
                for feats, _l, labels in _batches(self._unseen, 64, self._collate, None,
                                                  shuffle=False, drop_last=False):
                    e = model.backbone(feats.to(cfg.device))
                    embs.append(nn.functional.normalize(e.float(), dim=-1).cpu())
                    spk.append(labels)
                emb, spk = torch.cat(embs), torch.cat(spk)
                scores = emb @ emb.T                                     # (N, N) cosine
                iu = torch.triu_indices(len(spk), len(spk), offset=1)
                s = scores[iu[0], iu[1]]
                lab = (spk[iu[0]] == spk[iu[1]]).long()
                return {"accuracy": correct / max(1, total),
                        "eer": metrics.eer(s.numpy(), lab.numpy()),
                        "min_dcf": metrics.min_dcf(s.numpy(), lab.numpy(), p_target=0.01)}
            refs, hyps = [], []
            for feats, fl, targets, tl in _batches(self._test, 32, self._collate, None,
                                                   shuffle=False, drop_last=False):
                out = model.greedy_decode(feats.to(cfg.device), fl.to(cfg.device))
                hyps.extend(out)
                refs.extend(t[:n].tolist() for t, n in zip(targets, tl.tolist()))
            return {"ter": metrics.token_error_rate(refs, hyps)}
        finally:
            model.train(was_training)

    # -- the loop
    def run(self) -> Iterator[Record]:
        cfg = self.config
        self._setup()
        self.records = []
        dev = torch.device(cfg.device)
        if cfg.eval_at_start:
            rec = Record(step=0, loss=float("nan"), seconds=0.0,
                         lr=self.optimizer.param_groups[0]["lr"], metrics=self.evaluate())
            self.records.append(rec)
            yield rec
        for step in range(1, cfg.steps + 1):
            batch = self._to_device(next(self._stream))
            metered = step == 1 or step % cfg.measure_every == 0
            lr = self.optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            if metered:
                with MemoryMeter(dev, model=self.model, optimizer=self.optimizer, inputs=batch,
                                 budget=cfg.budget) as meter:
                    loss = self._train_step(batch)
            else:
                loss = self._train_step(batch)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            self.scheduler.step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; lower lr "
                                         f"(now {lr:g}) or check the configuration")
            final = step == cfg.steps or self._stop.is_set()
            rec = Record(step=step, loss=loss, seconds=seconds, lr=lr, metered=metered,
                         final=final)
            if metered:
                rec.peak, rec.breakdown = meter.peak, meter.breakdown()
                rec.category_peaks = meter.category_peaks()
                rec.device_peak = meter.device_peak
                rec.timeline = meter.timeline_arrays(max_points=400)
            if final or step % cfg.eval_every == 0:
                rec.metrics = self.evaluate()
            self.records.append(rec)
            yield rec
            if final:
                return

    def estimate(self, batch_size: Optional[int] = None, frames: Optional[int] = None,
                 steps: int = 1) -> Estimate:
        """Peak and breakdown of one training step on fake tensors (no data, no memory)."""
        return estimate_config(self.config, batch_size=batch_size, frames=frames, steps=steps)


def estimate_config(cfg: Config, batch_size: Optional[int] = None, frames: Optional[int] = None,
                    steps: int = 1, num_classes: Optional[int] = None,
                    target_len: Optional[int] = None) -> Estimate:
    """What one training step of ``cfg`` needs, measured on fake tensors.

    ``frames`` defaults to ``seconds * 100`` (10 ms fbank frames); for the paper-scale what-if,
    e.g. wespeaker ResNet34 at batch 128 x 200 frames::

        estimate_config(Config(blocks=(3, 4, 6, 3), width=32, embed_dim=256, batch_size=128),
                        frames=200, num_classes=1211)
    """
    cfg.validate()
    for name, v in (("batch_size", batch_size), ("frames", frames), ("num_classes", num_classes),
                    ("target_len", target_len)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be None or an int, got {type(v).__name__} ({v!r})")
        if v < 1:
            raise ValueError(f"{name} must be None (the config's) or >= 1, got {v}")
    B = cfg.batch_size if batch_size is None else int(batch_size)
    T = int(round(cfg.seconds * 100)) if frames is None else int(frames)
    num_classes = None if num_classes is None else int(num_classes)
    target_len = None if target_len is None else int(target_len)

    def setup():
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=num_classes)
        opt = build_optimizer(cfg, model)
        feats = torch.randn(B, T, 80)
        if cfg.task == "speaker":
            labels = torch.randint(0, num_classes or cfg.num_speakers, (B,))
            return model, opt, feats, labels
        U = target_len or max(2, T // 25)
        targets = torch.randint(1, cfg.vocab_size, (B, U))
        return (model, opt, feats, torch.full((B,), T, dtype=torch.long), targets,
                torch.full((B,), U, dtype=torch.long))

    def step(model, opt, *batch):
        opt.zero_grad(set_to_none=True)
        if cfg.task == "speaker":
            loss, _ = model(*batch)
        else:
            loss = model(*batch)
        loss.backward()
        opt.step()

    return estimate(step, setup, steps=steps, device=cfg.device)
