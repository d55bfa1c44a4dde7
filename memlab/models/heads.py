"""Speaker-embedding heads: statistics pooling and the additive angular margin softmax.

* Statistics pooling (Snyder et al. 2018, x-vectors): the mean and the standard deviation over
  time of every (channel, frequency) feature turn a variable-length map into a fixed vector.
* AAM-softmax / ArcFace (Deng et al. 2019, arXiv 1801.07698): the target class's angle gets a
  margin ``m`` added, ``cos(theta + m)``, and cosines are scaled by ``s`` before cross-entropy.
  The fall-back for ``theta + m > pi`` (``cos(theta) - m * sin(m)``) keeps the target logit
  monotone in theta, as in the wespeaker recipes.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StatsPool", "AAMSoftmax"]


class StatsPool(nn.Module):
    """``(B, C, F, T) -> (B, 2*C*F)``: mean and std over time of the flattened channels x freq.

    The standard deviation uses the population variance (no Bessel correction) plus ``eps`` so
    that a single frame (``T = 1`` after downsampling) gives a finite value.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1, 2)                                   # (B, C*F, T)
        mean = x.mean(dim=-1)                                 # (B, C*F)
        var = x.var(dim=-1, correction=0)                     # (B, C*F)
        std = torch.sqrt(var.clamp_min(0) + self.eps)         # (B, C*F)
        return torch.cat([mean, std], dim=-1)                 # (B, 2*C*F)


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax loss.

    Args:
        embed_dim: size of the embeddings.
        num_classes: number of training speakers.
        margin: angular margin ``m`` in radians (0.2 as in wespeaker).
        scale: logit scale ``s``.

    ``forward(emb (B, D), labels (B,) int64) -> (loss scalar, cosine (B, C))``; the cosines are
    the logits *without* margin and scale: their argmax is the prediction (for accuracy) and
    they are the scores a verification back-end compares.
    """

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.2, scale: float = 32.0):
        super().__init__()
        for name, v in (("embed_dim", embed_dim), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not (0.0 <= float(margin) < math.pi / 2):
            raise ValueError(f"margin must be in [0, pi/2) radians, got {margin!r}")
        if not float(scale) > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.margin, self.scale = float(margin), float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))   # (C, D)
        nn.init.xavier_uniform_(self.weight)
        self._cos_m, self._sin_m = math.cos(self.margin), math.sin(self.margin)
        self._th = math.cos(math.pi - self.margin)            # theta + m > pi beyond this cosine
        self._mm = math.sin(math.pi - self.margin) * self.margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[1] != self.embed_dim:
            got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"emb must have shape (B, {self.embed_dim}), got {got}")
        if (not isinstance(labels, torch.Tensor) or labels.dim() != 1
                or labels.shape[0] != emb.shape[0]):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must have shape ({emb.shape[0]},), got {got}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
        cosine = F.linear(F.normalize(emb.float(), dim=1),
                          F.normalize(self.weight.float(), dim=1))             # (B, C)
        sine = torch.sqrt((1.0 - cosine * cosine).clamp(0.0, 1.0))           # (B, C)
        phi = cosine * self._cos_m - sine * self._sin_m                      # cos(theta + m)
        phi = torch.where(cosine > self._th, phi, cosine - self._mm)         # (B, C)
        one_hot = F.one_hot(labels.long(), self.num_classes).to(torch.bool)  # (B, C)
        logits = torch.where(one_hot, phi, cosine) * self.scale              # (B, C)
        loss = F.cross_entropy(logits, labels.long())
        return loss, cosine

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, "
                f"margin={self.margin}, scale={self.scale}")
