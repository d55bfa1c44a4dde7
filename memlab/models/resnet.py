"""ResNet speaker-embedding extractor (wespeaker style) with four memory strategies.

References:
    He et al. 2016, "Deep Residual Learning for Image Recognition" (BasicBlock).
    Wang et al. 2023, "Wespeaker" (arXiv 2210.17016): ResNet34 on 80-dim fbank, 6.63 M params.
    Gomez et al. 2017, "The Reversible Residual Network" (arXiv 1707.04585).
    Liu & Qian 2024, "Memory-Efficient Training for Deep Speaker Embedding Learning in Speaker
    Verification" (arXiv 2412.01195): partially and fully reversible ResNets / DF-ResNets.

Architecture (``memory="vanilla"``): the (B, T, F) fbank is a 1-channel image (B, 1, F, T);
conv3x3 stem (1 -> width), four stages of BasicBlocks with ``width * (1, 2, 4, 8)`` channels
and strides (1, 2, 2, 2) (the first block of a strided stage has a 1x1 conv shortcut),
statistics pooling over time of the (channels x freq) map, Linear -> ``embed_dim``.

Memory strategies (``memory=``):

* ``"vanilla"``: ordinary autograd; every block keeps its activations.
* ``"checkpoint"``: ``torch.utils.checkpoint`` (non-reentrant) around every BasicBlock: only each
  block's input is kept; the block is recomputed in backward (running BN statistics are still
  updated once).
* ``"reversible"`` (partially reversible): inside a stage, the stride-1 blocks become additive
  couplings ``y1 = x1 + F(x2), y2 = x2 + G(y1)`` run by a ``ReversibleSequence``; the first,
  strided block of stages 2-4 stays an ordinary BasicBlock (its activations are stored).
* ``"reversible-full"``: every block is a coupling and the transitions are invertible too: the
  previous stage's output (C channels) is split, its first half is set aside (``FactorOut``)
  and its second half (C/2) goes through ``InvertibleDownsample`` (space-to-depth 2x2:
  C/2 -> 2C channels at half the resolution), so channels double and resolution halves as in
  the vanilla net, with no parameters in the transition.

Choice of F and G (parameter parity). A BasicBlock at C channels has two 3x3 convs C -> C
(18 C^2 weights). In a coupling F and G each see half the channels; each is a BasicBlock-like
residual function ``conv3x3(C/2 -> h), BN, ReLU, conv3x3(h -> C/2), BN`` with inner width
``h`` chosen so that F + G have the parameter count of the block they replace: ``h = C``
(18 h C = 18 C^2). In the fully reversible net the first coupling of stages 2-4 also absorbs
the parameters of the strided BasicBlock it replaces (``h ~ 7C/9``). The ReLU that a BasicBlock
applies after its residual addition is dropped in a coupling (it would not be invertible).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from memlab.models.common import (Blocks, FactorOut, SpeakerBackbone, check_int_tuple,
                                  halve, solve_width, splits_channels)
from memlab.reversible import AdditiveCoupling, InvertibleDownsample, ReversibleSequence

__all__ = ["ResNet", "BasicBlock", "HalfBasic", "basic_coupling", "MEMORY"]


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x)); 1x1 conv shortcut when the shape
    changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))              # (B, Cout, H/s, W/s)
        out = self.bn2(self.conv2(out))                       # (B, Cout, H/s, W/s)
        return self.relu(out + self.shortcut(x))              # (B, Cout, H/s, W/s)


class HalfBasic(nn.Sequential):
    """The residual function of a reversible BasicBlock: conv3x3(cin -> hidden), BN, ReLU,
    conv3x3(hidden -> cout), BN (cin, cout: a half of the stage's channels)."""

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__(conv3x3(cin, hidden), nn.BatchNorm2d(hidden), nn.ReLU(),
                         conv3x3(hidden, cout), nn.BatchNorm2d(cout))


def basic_coupling(channels: int, hidden: int) -> AdditiveCoupling:
    """A reversible BasicBlock at ``channels``: F and G are ``HalfBasic`` at half width."""
    c1, c2 = (channels + 1) // 2, channels // 2               # x.chunk(2, dim=1) sizes
    return AdditiveCoupling(f=HalfBasic(c2, hidden, c1), g=HalfBasic(c1, hidden, c2))


def _coupling_width(channels: int, target_params: int) -> int:
    return solve_width(lambda h: basic_coupling(channels, h), target_params)


def _basic_params(cin: int, cout: int, stride: int) -> int:
    n = 9 * cin * cout + 9 * cout * cout + 4 * cout
    if stride != 1 or cin != cout:
        n += cin * cout + 2 * cout
    return n


# ----------------------------------------------------------------------------- memory strategies
# A stage builder: (cin, c, n, stride) -> the stage's module (n blocks, cin -> c channels).
def vanilla_stage(cin: int, c: int, n: int, stride: int, checkpoint: bool = False) -> nn.Module:
    blocks = [BasicBlock(cin, c, stride)] + [BasicBlock(c, c) for _ in range(n - 1)]
    return Blocks(blocks, checkpoint=checkpoint)


def checkpoint_stage(cin: int, c: int, n: int, stride: int) -> nn.Module:
    return vanilla_stage(cin, c, n, stride, checkpoint=True)


@splits_channels
def reversible_stage(cin: int, c: int, n: int, stride: int) -> nn.Module:
    h = _coupling_width(c, _basic_params(c, c, 1))
    parts: List[nn.Module] = []
    n_rev = n
    if not (stride == 1 and cin == c):      # ordinary strided transition block
        parts.append(BasicBlock(cin, c, stride))
        n_rev -= 1
    if n_rev:
        parts.append(ReversibleSequence([basic_coupling(c, h) for _ in range(n_rev)]))
    return nn.Sequential(*parts)


@splits_channels
def reversible_full_stage(cin: int, c: int, n: int, stride: int) -> nn.Module:
    h = _coupling_width(c, _basic_params(c, c, 1))
    if stride == 1 and cin == c:
        return ReversibleSequence([basic_coupling(c, h) for _ in range(n)])
    if stride != 2 or c != 2 * cin:
        raise ValueError(f"memory='reversible-full' needs stages that double the channels "
                         f"with stride 2, got {cin} -> {c} with stride {stride}")
    h0 = _coupling_width(c, _basic_params(cin, c, stride))   # absorbs the transition
    layers = [InvertibleDownsample(), basic_coupling(c, h0)]
    layers += [basic_coupling(c, h) for _ in range(n - 1)]
    return nn.Sequential(FactorOut(), ReversibleSequence(layers))


# memory= name -> stage builder (the model's own table; a builder callable works too)
MEMORY = {"vanilla": vanilla_stage, "checkpoint": checkpoint_stage,
          "reversible": reversible_stage, "reversible-full": reversible_full_stage}


class ResNet(SpeakerBackbone):
    """ResNet speaker-embedding extractor; ``forward(x (B, T, feat_dim)) -> (B, embed_dim)``.

    Args:
        num_blocks: BasicBlocks per stage; (3, 4, 6, 3) is ResNet34, (2, 2, 2, 2) ResNet18,
            (3, 4, 23, 3) ResNet101 in the wespeaker naming.
        width: channels of the first stage (stages have width x (1, 2, 4, 8)); must be even for
            the reversible strategies (the couplings split channels in halves).
        feat_dim: fbank bins (frequency axis of the image).
        embed_dim: size of the speaker embedding.
        memory: "vanilla" | "checkpoint" | "reversible" | "reversible-full" (module docstring;
            the names of ``MEMORY``), or a stage builder ``(cin, c, n, stride) -> nn.Module``.
    """

    strides = (1, 2, 2, 2)

    def __init__(self, num_blocks: Sequence[int] = (3, 4, 6, 3), width: int = 32,
                 feat_dim: int = 80, embed_dim: int = 256, memory: str = "vanilla"):
        super().__init__()
        self.num_blocks = check_int_tuple("num_blocks", num_blocks, 4)
        self._check_sizes(width, feat_dim, embed_dim, memory, MEMORY)

        self.stem = nn.Sequential(conv3x3(1, width), nn.BatchNorm2d(width), nn.ReLU())
        stages: List[nn.Module] = []
        cin, freq = width, feat_dim
        for i, (n, s) in enumerate(zip(self.num_blocks, self.strides)):
            c = width * 2 ** i
            stages.append(self.make_stage(cin, c, n, s))
            cin, freq = c, (halve(freq) if s == 2 else freq)
        self.stages = nn.ModuleList(stages)
        self._build_head(cin, freq, embed_dim)

    def extra_repr(self) -> str:
        return (f"num_blocks={self.num_blocks}, width={self.width}, feat_dim={self.feat_dim}, "
                f"embed_dim={self.embed_dim}, memory={self.memory!r}")
