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

What a run trains on comes from its task (``memlab.tasks``: data, model, loss of a batch,
evaluation, random batches, defaults); how it saves memory comes from the techniques it chooses,
one per kind (``memlab.techniques``: model arguments, optimizer, checks, hooks of the step;
step-level techniques such as precision and accumulation in ``memlab.steps``). ``train_step``
is the one training step (Experiment, ``estimate_config`` and the benches use it); a step is
one optimizer step, however many micro-batches it runs. ``peak_record`` the one rule for a
run's peak.

``MEMLAB_FAST=1`` (``memlab.fast_mode()``) shrinks ``Config.for_task`` defaults to a few seconds
of work (tests, CI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from memlab import fast_mode  # noqa: F401  (the one reader of MEMLAB_FAST; kept importable here)
from memlab import tasks
from memlab import techniques as tech
from memlab.memory import Estimate, MemoryMeter, estimate
# kept importable from here (older code and notebooks): they live in memlab.tasks
from memlab.tasks import SpeakerNet  # noqa: F401
from memlab.tasks import asr_data as _asr_data  # noqa: F401
from memlab.tasks import batches as _batches  # noqa: F401
from memlab.tasks import materialise as _materialise  # noqa: F401
from memlab.tasks import speaker_data as _speaker_data  # noqa: F401

TASKS = tasks.names()
MODELS = {name: tasks.get(name).models for name in TASKS}
# kinds that are Config fields of their own (public API); every other kind lives in
# Config.techniques
FIELD_KINDS = ("memory", "optimizer", "loss")


def _is_real(v) -> bool:
    """A real number that is not a bool (True is an int to Python, not a size to a learner)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


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
    memory: str = "vanilla"           # technique of kind "memory"
    optimizer: str = "adam"           # technique of kind "optimizer"
    loss: str = "batched"             # technique of kind "loss" (asr)
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
    # kind -> technique name for every other registered kind (memlab.techniques.kinds());
    # a kind not named gets its default. {"memory": ...} etc. set the fields above.
    techniques: Dict[str, str] = field(default_factory=dict)
    dev_fold: Optional[int] = None    # asr: train on 3/4 of the training split, evaluate on
    #                                   quarter dev_fold % 4 of it (choosing without the test set)
    max_chunk_bytes: Optional[int] = None  # asr, sample-wise losses: bytes of one group's
    #                                   logits + gradient, the method's one knob (None: 64 MiB)
    frontend: Optional[str] = None    # asr: "conv" (None: two stride-2 conv layers) | "stack"
    #                                   (4 frames stacked into a Linear) | "context" (240 ms conv)
    frontend_channels: Optional[int] = None  # asr: channels of the conv front end (None: 32)
    output: Optional[str] = None      # asr: joiner output "linear" (None) | "factored"
    #                                   (syllables: each token's row = onset + nucleus + its own)
    dropout: Optional[float] = None   # asr: encoder dropout (None: 0.1); its masks are
    #                                   activations too (half of a lean sample-wise step's)
    # data-parallel runs (memlab.parallel): "none" | "ddp" | "fsdp2" on nproc ranks, the global
    # batch split across them; sync_bn: BatchNorm statistics of the global batch
    parallel: str = "none"
    nproc: int = 1
    sync_bn: bool = False

    def __post_init__(self):
        if isinstance(self.techniques, dict):
            self.techniques = dict(self.techniques)
            for kind in FIELD_KINDS:
                if kind in self.techniques:
                    name = self.techniques.pop(kind)
                    if getattr(self, kind) not in (name, type(self).__dataclass_fields__[
                            kind].default):
                        raise ValueError(f"techniques[{kind!r}]={name!r} contradicts "
                                         f"{kind}={getattr(self, kind)!r}")
                    setattr(self, kind, name)

    @classmethod
    def for_task(cls, task: str = "speaker", **overrides) -> "Config":
        """Defaults that train in about a minute on a laptop CPU (seconds with MEMLAB_FAST=1)."""
        base: Dict[str, Any] = {"task": task}
        base.update(tasks.get(task).defaults(fast_mode(), overrides))
        base.update(overrides)
        return cls(**base)

    @classmethod
    def scenario(cls, name: str, **overrides) -> "Config":
        """The configuration of the named scenario (``memlab.scenarios``: sizes chosen so that
        its technique's regime is reached), with ``overrides`` (any field or kind)."""
        from memlab import scenarios
        return scenarios.config(name, **overrides)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    @property
    def model_name(self) -> str:
        return self.model or tasks.get(self.task).models[0]

    def choice(self, kind: str) -> str:
        """The technique name this Config chooses for ``kind`` (its default when unnamed)."""
        if kind in FIELD_KINDS:
            return getattr(self, kind)
        return self.techniques.get(kind, tech.default(kind))

    def choices(self) -> Dict[str, str]:
        """kind -> technique name, for every registered kind."""
        return {kind: self.choice(kind) for kind in tech.kinds()}

    def chosen(self) -> Dict[str, "tech.Technique"]:
        """kind -> Technique, for every kind that applies to the task (validated)."""
        return {kind: tech.get(kind, self.choice(kind), self.task) for kind in tech.kinds()
                if tech.applies(kind, self.task)}

    @property
    def label(self) -> str:
        """A short human name for tables and legends."""
        task = tasks.get(self.task)
        opt = self.optimizer
        if "rank" in self.optimizer_kwargs:
            opt += f" r{self.optimizer_kwargs['rank']}"
        front, back = [], []
        for kind in tech.kinds():      # the task's own kinds always, others when not default
            if kind == "optimizer" or not tech.applies(kind, self.task):
                continue
            name = self.choice(kind)
            where = task.label_kinds.get(kind, "back" if name != tech.default(kind) else None)
            (front if where == "front" else back if where == "back" else []).append(name)
        parts = [self.model_name, *front, f"d{self.depth}" if self.blocks is None else
                 "x".join(map(str, self.blocks)), f"w{self.width}", f"B{self.batch_size}", opt,
                 *back]
        if self.adapt_speaker is not None:
            parts.append(f"spk{self.adapt_speaker}")
        return " ".join(parts)

    def validate(self) -> "Config":
        """Raise a clear ValueError/TypeError for bad values; returns self."""
        task = tasks.get(self.task)          # ValueError naming the tasks
        if self.model_name not in task.models:
            raise ValueError(f"model must be one of {task.models} for task={self.task!r}, "
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
        if self.dev_fold is not None:
            if isinstance(self.dev_fold, bool) or not isinstance(self.dev_fold, int):
                raise TypeError(f"dev_fold must be None or an int, got "
                                f"{type(self.dev_fold).__name__} ({self.dev_fold!r})")
            if self.dev_fold < 0:
                raise ValueError(f"dev_fold must be >= 0, got {self.dev_fold}")
        for name, owners in tasks.options().items():
            if getattr(self, name) is not None and self.task not in owners:
                where = " or ".join(f"task={t!r}" for t in owners)
                raise ValueError(f"{name} applies to {where} only, got task={self.task!r}")
        if not isinstance(self.techniques, dict):
            raise TypeError(f"techniques must be a dict of kind -> name, got "
                            f"{type(self.techniques).__name__} ({self.techniques!r})")
        for kind in self.techniques:
            if kind not in tech.kinds():
                raise ValueError(f"techniques: kind must be one of {tech.kinds()}, got {kind!r}")
        chosen = self.chosen()               # ValueError naming the kind and its choices
        tech.step_hooks(chosen.values())     # two techniques replacing one hook: ValueError
        task.validate(self)
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
        for t in chosen.values():            # combinations and devices a technique refuses
            if t.check is not None:
                t.check(self)
        from memlab import parallel         # ddp / fsdp2: modes, ranks and what they refuse
        parallel.validate(self)
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
    host_peak: Optional[int] = None        # host bytes allocated in the step (CUDA: offload)
    timeline: Optional[Dict[str, list]] = None          # MemoryMeter.timeline_arrays()
    metrics: Optional[Dict[str, float]] = None          # accuracy/eer/min_dcf or ter
    final: bool = False                    # last record of the run (stopped or finished)
    ranks: Optional[List[Dict[str, Any]]] = None        # ddp/fsdp2: every rank's memory

    def as_dict(self, timeline: bool = False) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if not timeline:
            d.pop("timeline")
        return d


# ----------------------------------------------------------------------------- model, optimizer
def model_args(cfg: Config) -> Dict[str, Any]:
    """Keyword arguments the chosen techniques add to the task's model constructor."""
    args: Dict[str, Any] = {}
    for t in cfg.chosen().values():
        args.update(t.model_kwargs(cfg.task))
    return args


def build_model(cfg: Config, num_classes: Optional[int] = None) -> nn.Module:
    """The model a Config describes (speaker: SpeakerNet, asr: Transducer)."""
    return tasks.get(cfg.task).build_model(cfg, num_classes, **model_args(cfg))


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
    """The optimizer of the chosen "optimizer" technique (lr: Config.lr or its default_lr), or
    what a technique's ``build_optimizer`` hook builds from that factory (step in backward)."""
    entry = tech.get("optimizer", cfg.optimizer, cfg.task)
    lr = cfg.lr if cfg.lr is not None else entry.options.get("default_lr", 1e-3)

    def make(module: nn.Module) -> torch.optim.Optimizer:
        return entry.factory(module, lr=lr, weight_decay=cfg.weight_decay,
                             **dict(cfg.optimizer_kwargs))
    hook = tech.step_hooks(cfg.chosen().values()).get("build_optimizer")
    return hook.build_optimizer(model, make) if hook is not None else make(model)


# ----------------------------------------------------------------------------- the training step
LossFn = Callable[[nn.Module, tuple], torch.Tensor]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple, loss_fn: LossFn,
               techniques: Sequence["tech.Technique"] = (),
               state: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    """The one training step (its hooks: ``memlab.techniques.base``). zero_grad; inside every
    technique's step context, for each (micro-batch, share) of ``split_batch``: forward + loss
    inside every forward context, ``backward(loss * share)``; then ``optimizer_step``. Returns
    the batch's loss (the shares' sum), detached (no ``.item()``: fake tensors). ``state``: a
    dict kept by the caller across the steps of one run (e.g. the fp16 gradient scaler)."""
    hooks = tech.step_hooks(techniques)
    optimizer.zero_grad(set_to_none=True)
    info = tech.StepInfo(model, optimizer, batch, {} if state is None else state)
    parts = hooks["split_batch"].split_batch(batch) if "split_batch" in hooks else [(batch, 1.0)]
    total = None
    with contextlib.ExitStack() as stack:
        for t in techniques:
            stack.enter_context(t.context(info))
        for micro, share in parts:
            with contextlib.ExitStack() as forward:
                for t in techniques:
                    forward.enter_context(t.forward(info))
                loss = loss_fn(model, micro)
            loss = loss if share == 1 else loss * share     # summed: the full batch's mean loss
            if "backward" in hooks:
                hooks["backward"].backward(loss, info)
            else:
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
            del loss                                        # the graph is gone; so is its root
    if "optimizer_step" in hooks:
        hooks["optimizer_step"].optimizer_step(info)
    else:
        optimizer.step()
    return total


def training_step(cfg: Config) -> Callable[[nn.Module, torch.optim.Optimizer, tuple],
                                           torch.Tensor]:
    """``step(model, optimizer, batch)``: ``train_step`` with ``cfg``'s task loss, its chosen
    techniques and one state dict for the run (what Experiment, estimate_config and the benches
    run)."""
    loss_fn = tasks.get(cfg.task).loss
    chosen = list(cfg.chosen().values())
    state: Dict[str, Any] = {}

    def step(model, optimizer, batch):
        return train_step(model, optimizer, batch, loss_fn, chosen, state)
    return step


def peak_record(records: Sequence[Record], skip_first: bool = False) -> Optional[Record]:
    """The one rule for a run's peak: the metered record with the highest peak, the latest on
    ties. ``skip_first``: the steady state, steps after step 1 (optimizer state allocated before
    the step starts; step 1 only when no later step was metered). None without metered steps."""
    metered = [r for r in records if r.metered and r.peak is not None]
    if skip_first:
        metered = [r for r in metered if r.step > 1] or metered
    return max(reversed(metered), key=lambda r: r.peak) if metered else None


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

    def __new__(cls, config=None, *args, **kwargs):
        if cls is Experiment and getattr(config, "parallel", "none") != "none":
            from memlab.parallel import ParallelExperiment   # one rank of a ddp / fsdp2 run
            cls = ParallelExperiment
        return super().__new__(cls)

    def __init__(self, config: Config):
        if not isinstance(config, Config):
            raise TypeError(f"config must be a memlab.lab.Config, got {type(config).__name__}")
        self.config = config.validate()
        self.task = tasks.get(self.config.task)
        self.data: Optional[tasks.TaskData] = None       # set when run() starts
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
        self.task = tasks.get(cfg.task)
        torch.manual_seed(cfg.seed)
        dev = torch.device(cfg.device)
        self.data = self.task.data(cfg)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(dev)
        if cfg.init_from is not None:
            load_init(self.model, cfg.init_from)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = _schedule(cfg, self.optimizer)
        self._step = training_step(cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        train = self.data.train
        self._stream = tasks.batches(train, min(cfg.batch_size, len(train)), self.data.collate,
                                     gen)

    # the splits under their older names
    _train = property(lambda self: self.data.train)
    _test = property(lambda self: self.data.evaluation["test"])
    _heldout = property(lambda self: self.data.evaluation["heldout"])
    _unseen = property(lambda self: self.data.evaluation["unseen"])
    _collate = property(lambda self: self.data.collate)

    def _to_device(self, batch):
        dev = torch.device(self.config.device)
        return tuple(t.to(dev) for t in batch)

    def _loss(self, batch) -> torch.Tensor:
        return self.task.loss(self.model, batch)

    def _train_step(self, batch) -> float:
        return float(self._step(self.model, self.optimizer, batch))

    # -- evaluation
    def evaluate(self) -> Dict[str, float]:
        """The task's metrics (speaker: accuracy, EER, minDCF; asr: TER), in eval mode."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self.task.evaluate(model, self.data, self.config.device)
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
                rec.device_peak, rec.host_peak = meter.device_peak, meter.host_peak
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

    ``frames`` defaults to ``seconds * 100`` (10 ms fbank frames; ASR: with ``target_len``, the
    lengths a real batch of the config's corpus pads to, ``Task.padded_batch``); for the
    paper-scale what-if,
    e.g. wespeaker ResNet34 at batch 128 x 200 frames::

        estimate_config(Config(blocks=(3, 4, 6, 3), width=32, embed_dim=256, batch_size=128),
                        frames=200, num_classes=1211)

    ``parallel="ddp"|"fsdp2"`` with ``nproc=N``: the memory *per rank* (a ``RankEstimate``,
    rank 0's): the local step at ``batch_size / N`` (which must divide), parameters, gradients
    and optimizer state full under DDP (its gradient buckets are the gradients) and this rank's
    shards under FSDP2, plus the parameters FSDP2 all-gathers (the root's, and a block and the
    next one's at a time); the model and how it is measured: ``memlab._per_rank``.
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
    if frames is None and target_len is None:     # ASR: what a real batch pads to
        from memlab._per_rank import local_batch
        padded = tasks.get(cfg.task).padded_batch(
            cfg, local_batch(B, cfg.nproc) if cfg.parallel != "none" else B)
        if padded is not None:
            T, target_len = padded

    if cfg.parallel != "none":               # what each of nproc ranks needs (B / nproc each)
        from memlab._per_rank import estimate_per_rank
        return estimate_per_rank(cfg, B, T, steps, num_classes, target_len)
    task, step = tasks.get(cfg.task), training_step(cfg)

    def setup():
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=num_classes)
        opt = build_optimizer(cfg, model)
        return (model, opt, *task.random_batch(cfg, B, T, num_classes, target_len))

    def run(model, opt, *batch):
        step(model, opt, batch)

    return estimate(run, setup, steps=steps, device=cfg.device)
