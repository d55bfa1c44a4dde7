"""Tasks: what a run trains on and how it is judged. One object per task, registered by name.

A task owns its data (train / evaluation splits, collate), the model a Config describes, the
loss of a batch, the evaluation, a random batch of any size (estimate, sweeps) and its default
hyper-parameters (``Config.for_task``, fast mode included). The lab, the CLI, the dashboard and
the benches ask the task instead of branching on its name:

* ``SpeakerTask`` ("speaker"): ResNet / DF-ResNet embedding + AAM-softmax on synthetic speakers;
  accuracy on held-out utterances, EER and minDCF on unseen speakers.
* ``AsrTask`` ("asr"): a small Transducer on synthetic token utterances (``TokenCorpus``, or
  ``SyllableCorpus`` for vocabularies of hundreds: ``asr_corpus``); token error rate.

Batches: ``(feats, lengths, labels)`` (speaker) and ``(feats, feat_lengths, targets,
target_lengths)`` (asr) from the data; ``random_batch`` gives the same shapes filled with noise
(speaker: ``(feats, labels)``, the nets crop to fixed lengths and never read ``lengths``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from memlab import fast_mode
from memlab import techniques

# Config.for_task in fast mode (MEMLAB_FAST=1): a few seconds of work (tests, CI)
FAST = dict(steps=6, eval_every=3, measure_every=3, num_speakers=6, utts_per_speaker=4,
            eval_speakers=4, seconds=1.0, num_utts=24, eval_utts=6, batch_size=4)


def require_same(given: Optional[str], expected: str, name: str, kind: str = "scenario") -> None:
    """Refuse a user's ``--task`` (``given``; None: not given) that contradicts the ``kind``
    ``name`` (e.g. scenario 'deep-speaker', a speaker scenario)."""
    if given is not None and given != expected:
        raise ValueError(f"task: {kind} {name!r} is a {expected} {kind}, got --task {given}")


# ----------------------------------------------------------------------------- data helpers
def materialise(ds) -> List[dict]:
    return [ds[i] for i in range(len(ds))]


def batches(items: List[dict], batch_size: int, collate, generator: Optional[torch.Generator],
            shuffle: bool = True, drop_last: bool = True) -> Iterator[tuple]:
    """Endless (shuffle=True) or single-pass stream of collated batches."""
    n = len(items)
    while True:
        order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
        stop = n - (n % batch_size) if (drop_last and n >= batch_size) else n
        for i in range(0, stop, batch_size):
            yield collate([items[j] for j in order[i:i + batch_size]])
        if not shuffle:
            return


def _float32_synthesis(build):
    """Cached corpora are synthesized with float32 as torch's default dtype, whatever the
    caller's default is: the same arguments then always give the same utterances (the cache is
    shared by every run in the process; a float64 default changes the random draws)."""
    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            return build(*args, **kwargs)
        finally:
            torch.set_default_dtype(before)
    return wrapper


@functools.lru_cache(maxsize=8)
@_float32_synthesis
def speaker_data(num_speakers, utts, eval_speakers, seconds, seed):
    """Train, held-out (same speakers) and unseen-speaker utterances (cached)."""
    from memlab.data import SpeakerCorpus
    train = SpeakerCorpus(num_speakers, utts, seconds=seconds, seed=seed)
    heldout = SpeakerCorpus(num_speakers, max(2, utts // 4), seconds=seconds, seed=seed + 7919)
    unseen = SpeakerCorpus(eval_speakers, max(4, utts // 3), seconds=seconds, seed=seed + 104729,
                           speaker_offset=10_000)
    return materialise(train), materialise(heldout), materialise(unseen)


# the ASR corpora: "tokens" (memlab.data.TokenCorpus: up to 63 distinct sounds, 3-8 per
# utterance) and "syllables" (memlab.data.SyllableCorpus: up to 320 onset x nucleus syllables,
# utterances of Config.seconds)
ASR_CORPORA = ("tokens", "syllables")


def asr_corpus(cfg) -> str:
    """The ASR corpus a Config trains on: ``cfg.corpus`` when the Config has that field, else
    "syllables" for a vocabulary larger than TokenCorpus's (64) and "tokens" otherwise."""
    from memlab.data.synth import MAX_VOCAB_SIZE
    name = getattr(cfg, "corpus", None)
    if name is None:
        return "syllables" if cfg.vocab_size > MAX_VOCAB_SIZE else "tokens"
    if name not in ASR_CORPORA:
        raise ValueError(f"corpus must be one of {ASR_CORPORA}, got {name!r}")
    return name


@functools.lru_cache(maxsize=8)
@_float32_synthesis
def asr_data(num_utts, eval_utts, vocab_size, seed, speaker=None, corpus="tokens",
             seconds=4.0):
    """Train / test utterances of the default speakers, or (speaker=id) of that one speaker;
    ``corpus`` one of ``ASR_CORPORA`` (``seconds``: utterance length of "syllables")."""
    from memlab.data import SyllableCorpus, TokenCorpus
    who = {} if speaker is None else {"speaker_offset": speaker, "num_speakers": 1}
    if corpus == "syllables":
        make = functools.partial(SyllableCorpus, vocab_size=vocab_size, seconds=seconds, **who)
    elif corpus == "tokens":
        make = functools.partial(TokenCorpus, vocab_size=vocab_size, **who)
    else:
        raise ValueError(f"corpus must be one of {ASR_CORPORA}, got {corpus!r}")
    train = make(num_utts, seed=seed)
    test = make(eval_utts, seed=seed + 104729)
    return materialise(train), materialise(test)


@functools.lru_cache(maxsize=32)
def _padded_batch(corpus, num_utts, vocab_size, seed, speaker, seconds, batch_size,
                  samples=64, max_utts=512):
    from memlab.data import SyllableCorpus, TokenCorpus
    who = {} if speaker is None else {"speaker_offset": speaker, "num_speakers": 1}
    if corpus == "syllables":
        data = SyllableCorpus(num_utts, vocab_size=vocab_size, seconds=seconds, seed=seed,
                              cache=False, **who)
    else:
        data = TokenCorpus(num_utts, vocab_size=vocab_size, seed=seed, cache=False, **who)
    g = torch.Generator().manual_seed(0)
    pool = torch.randperm(num_utts, generator=g)[:max_utts].tolist()
    lengths = torch.tensor([data.lengths(i) for i in pool])                 # (n, 2)
    picks = torch.randint(len(pool), (samples, batch_size), generator=g)
    padded = lengths[picks].amax(dim=1)                                       # (samples, 2)
    cells = padded[:, 0] * (padded[:, 1] + 1)
    frames, tokens = padded[cells.argsort()[samples // 2]].tolist()
    return int(frames), int(tokens)


DEV_FOLDS = 4


def dev_split(items: List[dict], fold: int) -> Tuple[List[dict], List[dict]]:
    """(train, dev): fold ``fold`` of ``DEV_FOLDS`` (utterances [fold k, (fold + 1) k) with
    k = len // 4) is the dev set, the rest trains."""
    fold %= DEV_FOLDS
    k = max(1, len(items) // DEV_FOLDS)
    lo = min(fold * k, len(items) - k)
    return items[:lo] + items[lo + k:], items[lo:lo + k]


@dataclass
class TaskData:
    """A run's utterances: ``train`` and the named evaluation splits, and how to batch them."""
    train: List[dict]
    evaluation: Dict[str, List[dict]]
    collate: Callable[[List[dict]], tuple]


# ----------------------------------------------------------------------------- tasks
class Task:
    """What every task provides; subclasses fill in the details."""

    name: str = ""
    models: Tuple[str, ...] = ()          # Config.model choices, the first is the default
    metrics: Tuple[str, ...] = ()         # what evaluate() returns
    headline: str = ""                    # the metric a table shows before training too
    note: str = ""                        # one line under the CLI's table
    options: Tuple[str, ...] = ()         # Config fields that only this task reads (None elsewhere)
    label_kinds: Dict[str, str] = {}      # technique kinds always named in labels: "front"|"back"
    staged: bool = False                  # depth per stage (Config.blocks) rather than Config.depth

    def defaults(self, fast: bool, overrides: Dict[str, Any]) -> Dict[str, Any]:
        """Config fields of ``Config.for_task`` (before ``overrides`` are applied)."""
        return dict(FAST) if fast else {}

    def validate(self, cfg) -> None:
        """Task-specific checks of a Config (ValueError/TypeError naming the field)."""

    def train_set_size(self, cfg) -> int:
        raise NotImplementedError

    def data(self, cfg) -> TaskData:
        raise NotImplementedError

    def build_model(self, cfg, num_classes: Optional[int] = None, **model_args) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: TaskData, device) -> Dict[str, float]:
        raise NotImplementedError

    def random_batch(self, cfg, batch_size: int, frames: int, num_classes: Optional[int] = None,
                     target_len: Optional[int] = None, device=None) -> tuple:
        raise NotImplementedError

    def padded_batch(self, cfg, batch_size: int) -> Optional[Tuple[int, int]]:
        """(frames, target length) a training batch of ``cfg``'s data pads to, for estimates of
        a real step; None: the task's batches are ``seconds`` long (fixed-length crops)."""
        return None

    def corpus(self, num_speakers: int, utts: int, seconds: float, vocab_size: int, seed: int):
        """The synthetic corpus ``memlab data`` writes."""
        raise NotImplementedError

    @torch.no_grad()
    def mean_loss(self, model: nn.Module, items: List[dict], collate, device,
                  batch_size: int = 8) -> float:
        """Mean loss per utterance of ``items`` (eval mode), e.g. on a dev split."""
        was = model.training
        model.eval()
        try:
            total, count = 0.0, 0
            for batch in batches(items, batch_size, collate, None, shuffle=False,
                                 drop_last=False):
                k = int(batch[0].shape[0])
                total += float(self.loss(model, tuple(t.to(device) for t in batch))) * k
                count += k
            return total / count
        finally:
            model.train(was)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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


class SpeakerTask(Task):
    name = "speaker"
    models = ("resnet", "dfresnet")
    metrics = ("accuracy", "eer", "min_dcf")
    headline = "eer"
    note = ("eer: equal error rate on unseen speakers (chance = 0.5); accuracy: held-out "
            "utterances of training speakers; bytes at the peak of a metered step")
    label_kinds = {"memory": "front"}
    staged = True

    def train_set_size(self, cfg) -> int:
        return cfg.num_speakers * cfg.utts_per_speaker

    def data(self, cfg) -> TaskData:
        from memlab.data import collate_speaker
        train, heldout, unseen = speaker_data(cfg.num_speakers, cfg.utts_per_speaker,
                                              cfg.eval_speakers, float(cfg.seconds), cfg.seed)
        return TaskData(train, {"heldout": heldout, "unseen": unseen}, collate_speaker)

    def build_model(self, cfg, num_classes: Optional[int] = None, **model_args) -> nn.Module:
        from memlab.models import DFResNet, ResNet
        blocks = tuple(cfg.blocks) if cfg.blocks is not None else (cfg.depth,) * 4
        net, arg = {"resnet": (ResNet, "num_blocks"), "dfresnet": (DFResNet, "depths")}[
            cfg.model_name]
        backbone = net(**{arg: blocks}, width=cfg.width, embed_dim=cfg.embed_dim, **model_args)
        return SpeakerNet(backbone, cfg.embed_dim, num_classes or cfg.num_speakers)

    def loss(self, model, batch):
        feats, labels = batch[0], batch[-1]        # (B, T, F), (B,); lengths unused
        loss, _logits = model(feats, labels)
        return loss

    @torch.no_grad()
    def evaluate(self, model, data, device):
        from memlab import metrics
        correct = total = 0
        for feats, _l, labels in batches(data.evaluation["heldout"], 64, data.collate, None,
                                         shuffle=False, drop_last=False):
            feats, labels = feats.to(device), labels.to(device)
            _loss, logits = model(feats, labels)
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        embs, spk = [], []
        for feats, _l, labels in batches(data.evaluation["unseen"], 64, data.collate, None,
                                         shuffle=False, drop_last=False):
            e = model.backbone(feats.to(device))
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

    def random_batch(self, cfg, batch_size, frames, num_classes=None, target_len=None,
                     device=None):
        feats = torch.randn(batch_size, frames, 80, device=device)           # (B, T, F)
        labels = torch.randint(0, num_classes or cfg.num_speakers, (batch_size,),
                               device=device)                                # (B,)
        return feats, labels

    def corpus(self, num_speakers, utts, seconds, vocab_size, seed):
        from memlab.data import SpeakerCorpus
        return SpeakerCorpus(num_speakers, utts, seconds=seconds, seed=seed)


# the joiner's output layer: "linear" (None) or "factored" (syllables: W[v] = R[v] + onset row +
# nucleus row, memlab.models.transducer.Joiner)
OUTPUTS = (None, "linear", "factored")


class AsrTask(Task):
    name = "asr"
    models = ("transducer",)
    metrics = ("ter",)
    headline = "ter"
    note = "ter: token error rate with greedy decoding (untrained_ter: before training)"
    options = ("adapt_speaker", "dev_fold", "max_chunk_bytes", "frontend", "frontend_channels",
               "output", "dropout")
    label_kinds = {"loss": "back"}

    def validate(self, cfg) -> None:
        from memlab.models.transducer import FRONTENDS
        if cfg.frontend is not None and cfg.frontend not in FRONTENDS:
            raise ValueError(f"frontend must be None or one of {FRONTENDS}, got {cfg.frontend!r}")
        if cfg.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {cfg.output!r}")
        if cfg.output == "factored" and asr_corpus(cfg) != "syllables":
            from memlab.data.synth import MAX_VOCAB_SIZE
            raise ValueError(f"output='factored' needs the syllable corpus (vocab_size > "
                             f"{MAX_VOCAB_SIZE}), got vocab_size={cfg.vocab_size}")
        if cfg.dropout is not None and (isinstance(cfg.dropout, bool) or not isinstance(
                cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0):
            raise ValueError(f"dropout must be None or a number in [0, 1), got {cfg.dropout!r}")
        for name in ("max_chunk_bytes", "frontend_channels"):
            v = getattr(cfg, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be None or an int, got {type(v).__name__} ({v!r})")
            if v < 1:
                raise ValueError(f"{name} must be None or >= 1, got {v}")

    def defaults(self, fast, overrides):
        # width 128, 300 steps: TER 0.35 on unseen utterances (an empty transcript scores 1.0)
        base: Dict[str, Any] = dict(width=128, depth=2, batch_size=16, steps=300, eval_every=50,
                                    optimizer="adam")
        name = overrides.get("optimizer", "adam")
        if isinstance(name, str) and name in techniques.names("optimizer"):
            lr = techniques.get("optimizer", name).options.get("task_lr", {}).get(self.name)
            if lr is not None:            # e.g. the Adam family's 6e-3 (a small sweep)
                base["lr"] = lr
        if fast:
            base.update(FAST, width=32, depth=1)
        return base

    def train_set_size(self, cfg) -> int:
        return cfg.num_utts

    def data(self, cfg) -> TaskData:
        from memlab.data import collate_asr
        self._check_corpus(cfg)
        corpus = asr_corpus(cfg)
        train, test = asr_data(cfg.num_utts, cfg.eval_utts, cfg.vocab_size, cfg.seed,
                               cfg.adapt_speaker, corpus, float(cfg.seconds))
        if cfg.dev_fold is not None:      # choose hyper-parameters without the test split
            train, test = dev_split(train, cfg.dev_fold)
        return TaskData(train, {"test": test}, collate_asr)

    def build_model(self, cfg, num_classes=None, **model_args):
        from memlab.models import Transducer
        extra = {k: getattr(cfg, k, None)
                 for k in ("max_chunk_bytes", "frontend", "frontend_channels", "dropout")}
        if cfg.output == "factored":
            from memlab.data import syllable_factors
            extra["output_factors"] = syllable_factors(cfg.vocab_size)
        return Transducer(cfg.vocab_size, enc_dim=cfg.width, enc_layers=cfg.depth,
                          pred_dim=cfg.width, joint_dim=cfg.width,
                          **{k: v for k, v in extra.items() if v is not None}, **model_args)

    def loss(self, model, batch):
        return model(*batch)                       # feats, feat_lengths, targets, target_lengths

    @torch.no_grad()
    def evaluate(self, model, data, device):
        from memlab import metrics
        refs, hyps = [], []
        for feats, fl, targets, tl in batches(data.evaluation["test"], 32, data.collate, None,
                                              shuffle=False, drop_last=False):
            hyps.extend(model.greedy_decode(feats.to(device), fl.to(device)))
            refs.extend(t[:n].tolist() for t, n in zip(targets, tl.tolist()))
        return {"ter": metrics.token_error_rate(refs, hyps)}

    def random_batch(self, cfg, batch_size, frames, num_classes=None, target_len=None,
                     device=None):
        from memlab.memory import host_tensor, real_tensors
        feats = torch.randn(batch_size, frames, 80, device=device)           # (B, T, F)
        U = target_len or max(2, frames // 25)
        # lengths and targets are host tensors: the losses read their values, and under
        # estimate (fake tensors) these keep them
        with real_tensors():
            g = torch.Generator().manual_seed(0)
            targets = torch.randint(1, cfg.vocab_size, (batch_size, U), generator=g)  # (B, U)
            feat_lengths = torch.full((batch_size,), frames, dtype=torch.long)
            target_lengths = torch.full((batch_size,), U, dtype=torch.long)
        return (feats, host_tensor(feat_lengths, device=device), host_tensor(targets, device=device),
                host_tensor(target_lengths, device=device))

    def padded_batch(self, cfg, batch_size):
        """A batch pads to its longest utterance and longest transcript: the median (by lattice
        cells, frames x (tokens + 1)) over 64 random batches of the training corpus's lengths
        (read off the utterance plans, nothing synthesised). None where the corpus cannot be
        built (a vocabulary larger than the corpora's: a what-if model)."""
        from memlab.data.syllables import MAX_SYLLABLE_VOCAB
        if cfg.vocab_size > MAX_SYLLABLE_VOCAB:
            return None
        return _padded_batch(asr_corpus(cfg), cfg.num_utts, cfg.vocab_size, cfg.seed,
                             cfg.adapt_speaker, float(cfg.seconds), int(batch_size))

    @staticmethod
    def _check_corpus(cfg):
        """Only where data is built: a model (estimate, random batches) may be larger than the
        synthetic corpora's vocabulary."""
        from memlab.data.syllables import MAX_SYLLABLE_VOCAB
        if asr_corpus(cfg) == "syllables" and cfg.vocab_size > MAX_SYLLABLE_VOCAB:
            raise ValueError(f"vocab_size must be <= {MAX_SYLLABLE_VOCAB} to train on the "
                             f"syllable corpus (320 syllables + blank), got {cfg.vocab_size}")

    def corpus(self, num_speakers, utts, seconds, vocab_size, seed):
        from memlab.data import SyllableCorpus, TokenCorpus
        from memlab.data.synth import MAX_VOCAB_SIZE
        if vocab_size > MAX_VOCAB_SIZE:          # more tokens than distinct sounds: syllables
            return SyllableCorpus(utts * num_speakers, vocab_size=vocab_size, seconds=seconds,
                                  seed=seed)
        return TokenCorpus(utts * num_speakers, vocab_size=vocab_size, seed=seed)


# ----------------------------------------------------------------------------- registry
_TASKS: Dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if not isinstance(task, Task) or not task.name:
        raise TypeError(f"task must be a memlab.tasks.Task with a name, got {task!r}")
    _TASKS[task.name] = task
    return task


def names() -> Tuple[str, ...]:
    return tuple(_TASKS)


def get(name: str) -> Task:
    """The task registered as ``name``; a ValueError naming the choices otherwise."""
    if not isinstance(name, str) or name not in _TASKS:
        raise ValueError(f"task must be one of {names()}, got {name!r}")
    return _TASKS[name]


def options() -> Dict[str, Tuple[str, ...]]:
    """Config field -> the tasks that read it (fields only some tasks have)."""
    out: Dict[str, Tuple[str, ...]] = {}
    for t in _TASKS.values():
        for o in t.options:
            out[o] = out.get(o, ()) + (t.name,)
    return out


register_task(SpeakerTask())
register_task(AsrTask())
