"""Plumbing shared by the speaker backbones (ResNet, DF-ResNet) and their memory variants.

* ``choose``: a constructor argument resolved in the model's own ``{name: builder}`` table
  (``memory=`` of the speaker nets, ``loss=`` of the transducer); ``check_features``: input
  validation with clear errors.
* ``Blocks``: a run of blocks, optionally one ``torch.utils.checkpoint`` per block (the
  "checkpoint" memory strategy), with BatchNorm running statistics updated once per step even
  though checkpointing runs each block's forward twice.
* ``FactorOut``: the channel bookkeeping of the fully reversible variants (keep one half).
* ``solve_width``: pick the inner width of a reversible block's F/G so that its parameter
  count matches the ordinary block it replaces.
* ``SpeakerBackbone``: (B, T, F) fbank -> (B, 1, F, T) image -> stem -> stages -> statistics
  pooling -> Linear -> (B, embed_dim), as in wespeaker (wenet-e2e/wespeaker).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from memlab.models.heads import StatsPool

def choose(arg: str, value, table: Dict[str, Callable]) -> Tuple[str, Callable]:
    """``(name, builder)`` for ``value``: a name in the model's own ``table`` or a builder
    callable (a technique of one's own). Never a fallback: an unknown name is a ValueError
    naming the argument and the choices."""
    if callable(value) and not isinstance(value, str):
        return getattr(value, "__name__", type(value).__name__), value
    if not isinstance(value, str):
        raise TypeError(f"{arg} must be a str, one of {tuple(table)}, or a builder callable, "
                        f"got {type(value).__name__}")
    if value not in table:
        raise ValueError(f"{arg} must be one of {tuple(table)} (or a builder callable), "
                         f"got {value!r}")
    return value, table[value]


def splits_channels(builder: Callable) -> Callable:
    """Mark a stage builder whose couplings split the channels in halves (even width)."""
    builder.splits_channels = True
    return builder


def check_int_tuple(name: str, value, length: int, minimum: int = 1) -> Tuple[int, ...]:
    try:
        vals = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of {length} ints, got {value!r}") from None
    if len(vals) != length or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum
                                  for v in vals):
        raise ValueError(f"{name} must be {length} ints >= {minimum}, got {value!r}")
    return vals


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_features(x, feat_dim: int) -> None:
    """``x`` must be a floating (B, T, feat_dim) tensor with B, T >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, T, {feat_dim}), "
                        f"got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != feat_dim or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must have shape (B, T, feat_dim={feat_dim}) fbank frames, "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def solve_width(make: Callable[[int], nn.Module], target: int) -> int:
    """The inner width ``h`` whose ``make(h)`` has the parameter count closest to ``target``.

    The count of a conv block is affine in its inner width, so two probes give the line.
    """
    p1, p2 = count_params(make(1)), count_params(make(2))
    slope = p2 - p1
    h = 1 + (target - p1) / slope
    return max(1, int(round(h)))


class _Recompute:
    """Call ``block`` as a checkpoint function: the first call (forward) updates BatchNorm
    running statistics, later calls (the recomputation in backward) do not.

    During the recomputation each BatchNorm gets ``momentum=0`` (running = 1 * running +
    0 * batch, an exact no-op) and its ``num_batches_tracked`` is put back afterwards. Unlike
    ``track_running_stats=False`` this keeps the op's signature, so checkpoint's check that the
    recomputation saved the same tensors as the forward still passes.
    """

    def __init__(self, block: nn.Module, norms):
        self.block, self.norms, self.calls = block, norms, 0

    def __call__(self, x):
        self.calls += 1
        if self.calls == 1:
            return self.block(x)
        changed = [m for m in self.norms if m.training and m.track_running_stats]
        saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None
                  else None) for m in changed]
        for m in changed:
            m.momentum = 0.0
        try:
            return self.block(x)
        finally:
            for m, (mom, nbt) in zip(changed, saved):
                m.momentum = mom
                if nbt is not None:
                    m.num_batches_tracked.copy_(nbt)


class Blocks(nn.Module):
    """Blocks run one after another; ``checkpoint=True`` recomputes each block in backward."""

    def __init__(self, blocks: Sequence[nn.Module], checkpoint: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.checkpoint = bool(checkpoint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_ckpt = self.checkpoint and torch.is_grad_enabled()
        for b in self.blocks:
            if use_ckpt:
                norms = [m for m in b.modules() if isinstance(m, _BatchNorm)]
                x = checkpoint(_Recompute(b, norms), x, use_reentrant=False)
            else:
                x = b(x)
        return x

    def extra_repr(self) -> str:
        return f"checkpoint={self.checkpoint}"


class FactorOut(nn.Module):
    """Keep the second channel half ``(B, C, H, W) -> (B, C/2, H, W)``; the first half is set
    aside (multi-scale factor-out, Dinh et al. 2017 Real NVP) and does not reach the embedding.

    Followed by ``InvertibleDownsample`` (C/2 -> 2C channels at half resolution) this halves the
    number of elements, exactly as the vanilla stride-2 transition does (C x H x W ->
    2C x H/2 x W/2). In a fully reversible backbone the input is the output of the previous
    stage's ``ReversibleSequence``, which keeps that tensor for its backward anyway: setting half
    aside costs no extra memory, and everything the next stage needs can be rebuilt from its own
    output. The second half is kept because it is ``x2 + G(y1)`` of the last coupling, so it
    depends on every F and G of the stage (keeping ``y1`` would leave the last G unused). Side
    effect: the bias of the last BatchNorm in F can get (near-)zero gradient in stages whose
    ``y1`` is factored out, like a conv bias in front of a BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(2, dim=1)[1]                            # (B, C/2, H, W)


class SpeakerBackbone(nn.Module):
    """Shared forward: fbank (B, T, F) -> embedding (B, embed_dim). Subclasses build the parts:
    ``self.stem``, ``self.stages`` (ModuleList), ``self.pool``, ``self.embedding``."""

    feat_dim: int
    memory: str

    def _check_sizes(self, width, feat_dim, embed_dim, memory, table) -> None:
        """Validate and store the constructor arguments every speaker backbone shares;
        ``memory`` is resolved in the subclass's ``table`` (``self.make_stage``)."""
        self.width = check_positive_int("width", width)
        self.feat_dim = check_positive_int("feat_dim", feat_dim)
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.memory, self.make_stage = choose("memory", memory, table)
        if getattr(self.make_stage, "splits_channels", False) and width % 2:
            raise ValueError(f"width must be even for memory={memory!r} (couplings split the "
                             f"channels in halves), got {width}")

    def _build_head(self, channels: int, freq: int, embed_dim: int) -> None:
        self.pool = StatsPool()
        self.pool_dim = 2 * channels * freq
        self.embedding = nn.Linear(self.pool_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features(x, self.feat_dim)
        x = x.transpose(1, 2).unsqueeze(1)                     # (B, 1, F, T)
        x = self.stem(x)                                       # (B, C1, F, T)
        for stage in self.stages:
            x = stage(x)                                       # (B, Ci, F/2^i, T/2^i)
        x = self.pool(x)                                       # (B, 2*C4*F4)
        return self.embedding(x)                               # (B, embed_dim)

    def num_params(self) -> int:
        """Parameters of the embedding extractor (the classification head, e.g. ``AAMSoftmax``,
        is a separate module and not counted, as in the wespeaker model tables)."""
        return count_params(self)


def halve(n: int) -> int:
    """Output size of a stride-2 3x3 conv with padding 1 (and of ``InvertibleDownsample``)."""
    return (n + 1) // 2
