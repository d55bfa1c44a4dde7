"""DF-ResNet (depth-first ResNet) speaker-embedding extractor with four memory strategies.

References:
    Liu, Chen & Qian 2022, "DF-ResNet: Boosting Speaker Verification Performance with
    Depth-First Design" (Interspeech 2022): depth (3, 3, 9, 3) = DF-ResNet56 ... (3, 8, 63, 3) =
    DF-ResNet233; many cheap inverted-bottleneck blocks in the third stage.
    Sandler et al. 2018, "MobileNetV2" (arXiv 1801.04381): inverted bottleneck with depthwise conv.
    Liu & Qian 2024, arXiv 2412.01195: reversible DF-ResNets for memory-efficient training.

Architecture (``memory="vanilla"``): (B, T, F) fbank -> (B, 1, F, T); conv3x3 stem (1 -> width)
+ BN + ReLU; four stages with ``width * (1, 2, 4, 8)`` channels; between stages a separate
downsampling layer (conv3x3 stride 2, C -> 2C, BN, ReLU); each block is an inverted bottleneck
``x + BN(conv1x1(ReLU(BN(dwconv3x3(ReLU(BN(conv1x1(x))))))))`` with expansion 4
(C -> 4C -> depthwise -> C); statistics pooling; Linear -> ``embed_dim``.

Memory strategies (``memory=``), as for ``memlab.models.resnet.ResNet``:

* ``"vanilla"``, ``"checkpoint"`` (one ``torch.utils.checkpoint`` per block);
* ``"reversible"`` (partially reversible): every block of a stage becomes an additive coupling
  in a ``ReversibleSequence``; the strided downsampling layers stay ordinary;
* ``"reversible-full"``: the downsampling layers are replaced by ``FactorOut`` (keep the second
  channel half, C/2) + ``InvertibleDownsample`` (space-to-depth: C/2 -> 2C at half resolution)
  inside the next stage's ``ReversibleSequence``.

Choice of F and G (parameter parity). A block at C channels has 4C^2 + 36C + 4C^2 weights. In a
coupling F and G each see C/2 channels; each is the same inverted bottleneck
``conv1x1(C/2 -> e), BN, ReLU, dwconv3x3(e), BN, ReLU, conv1x1(e -> C/2), BN`` with inner width
``e`` chosen so that F + G match the block: ``e ~ 4C`` (an expansion of 8 relative to the half
width), the same FLOPs per position. In the fully reversible net the first coupling of stages
2-4 also absorbs the parameters of the downsampling convolution it replaces (``e ~ 6.25C``).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from memlab.models.common import (Blocks, FactorOut, SpeakerBackbone, check_int_tuple,
                                  halve, solve_width, splits_channels)
from memlab.reversible import AdditiveCoupling, InvertibleDownsample, ReversibleSequence

__all__ = ["DFResNet", "DFBlock", "HalfDF", "df_coupling", "DEPTHS", "MEMORY"]

# Named depths of the DF-ResNet paper.
DEPTHS = {"DF-ResNet56": (3, 3, 9, 3), "DF-ResNet110": (3, 5, 27, 3),
          "DF-ResNet179": (3, 8, 45, 3), "DF-ResNet233": (3, 8, 63, 3)}


class HalfDF(nn.Sequential):
    """Inverted bottleneck residual function: conv1x1(cin -> hidden), BN, ReLU, depthwise 3x3,
    BN, ReLU, conv1x1(hidden -> cout), BN."""

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))


class DFBlock(nn.Module):
    """``x + HalfDF(C, expansion*C, C)(x)``: the ordinary DF-ResNet block."""

    def __init__(self, channels: int, expansion: int = 4):
        super().__init__()
        self.body = HalfDF(channels, expansion * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)                               # (B, C, H, W)


def downsample(cin: int, cout: int) -> nn.Sequential:
    """The ordinary transition between stages: conv3x3 stride 2, BN, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


def df_coupling(channels: int, hidden: int) -> AdditiveCoupling:
    """A reversible DF block at ``channels``: F and G are ``HalfDF`` at half width."""
    c1, c2 = (channels + 1) // 2, channels // 2
    return AdditiveCoupling(f=HalfDF(c2, hidden, c1), g=HalfDF(c1, hidden, c2))


def _block_params(c: int) -> int:
    return 8 * c * c + 9 * 4 * c + 2 * (4 * c) * 2 + 2 * c   # 2 conv1x1, dw3x3, 3 BN


def _down_params(cin: int, cout: int) -> int:
    return 9 * cin * cout + 2 * cout


def _coupling_width(c: int, target: int) -> int:
    return solve_width(lambda e: df_coupling(c, e), target)


# ----------------------------------------------------------------------------- memory strategies
# A stage builder: (cin, c, n, first) -> the stage's module (first: no downsampling before it).
def vanilla_stage(cin: int, c: int, n: int, first: bool, checkpoint: bool = False) -> nn.Module:
    blocks = Blocks([DFBlock(c) for _ in range(n)], checkpoint=checkpoint)
    return blocks if first else nn.Sequential(downsample(cin, c), blocks)


def checkpoint_stage(cin: int, c: int, n: int, first: bool) -> nn.Module:
    return vanilla_stage(cin, c, n, first, checkpoint=True)


@splits_channels
def reversible_stage(cin: int, c: int, n: int, first: bool) -> nn.Module:
    e = _coupling_width(c, _block_params(c))
    seq = ReversibleSequence([df_coupling(c, e) for _ in range(n)])
    return seq if first else nn.Sequential(downsample(cin, c), seq)


@splits_channels
def reversible_full_stage(cin: int, c: int, n: int, first: bool) -> nn.Module:
    e = _coupling_width(c, _block_params(c))
    if first:
        return ReversibleSequence([df_coupling(c, e) for _ in range(n)])
    e0 = _coupling_width(c, _block_params(c) + _down_params(cin, c))
    layers = [InvertibleDownsample(), df_coupling(c, e0)]
    layers += [df_coupling(c, e) for _ in range(n - 1)]
    return nn.Sequential(FactorOut(), ReversibleSequence(layers))


# memory= name -> stage builder (the model's own table; a builder callable works too)
MEMORY = {"vanilla": vanilla_stage, "checkpoint": checkpoint_stage,
          "reversible": reversible_stage, "reversible-full": reversible_full_stage}


class DFResNet(SpeakerBackbone):
    """DF-ResNet speaker-embedding extractor; ``forward(x (B, T, feat_dim)) -> (B, embed_dim)``.

    Args:
        depths: blocks per stage; (3, 3, 9, 3) is DF-ResNet56, (3, 8, 63, 3) DF-ResNet233
            (see ``DEPTHS``).
        width: channels of the first stage (stages have width x (1, 2, 4, 8)); even for the
            reversible strategies.
        feat_dim: fbank bins. embed_dim: size of the speaker embedding.
        memory: "vanilla" | "checkpoint" | "reversible" | "reversible-full" (``MEMORY``), or a
            stage builder ``(cin, c, n, first) -> nn.Module``.
    """

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), width: int = 32, feat_dim: int = 80,
                 embed_dim: int = 256, memory: str = "vanilla"):
        super().__init__()
        self.depths = check_int_tuple("depths", depths, 4)
        self._check_sizes(width, feat_dim, embed_dim, memory, MEMORY)

        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages: List[nn.Module] = []
        cin, freq = width, feat_dim
        for i, n in enumerate(self.depths):
            c = width * 2 ** i
            stages.append(self.make_stage(cin, c, n, i == 0))
            cin, freq = c, (freq if i == 0 else halve(freq))
        self.stages = nn.ModuleList(stages)
        self._build_head(cin, freq, embed_dim)

    def extra_repr(self) -> str:
        return (f"depths={self.depths}, width={self.width}, feat_dim={self.feat_dim}, "
                f"embed_dim={self.embed_dim}, memory={self.memory!r}")
