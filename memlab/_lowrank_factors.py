"""The factors of LowRankAdam: W_eff = W + A @ B, how they attach to a module, which weights get them.

References:
- M. Gooneratne et al., "Low-rank Gradient Approximation for Memory-Efficient On-device Training
  of Deep Neural Network", ICASSP 2020, arXiv 2001.08885: the low-rank parameterisation as a
  vehicle for the gradient, folded back into the full weight.
- E. Hu et al., "LoRA", arXiv 2106.09685: A = 0 at the start, so training starts from the
  unchanged model.

Why a module of its own: this is the model side of ``memlab.lowrank`` -- what the optimizer
attaches to the model and finds in it, none of which steps or keeps optimizer state:

- ``LowRankDelta``: A (m, r) and B (r, n) for one weight viewed as (m, n) = (shape[0], rest);
  a parametrization for attach="parametrize" (forward(W) = W + A @ B).
- ``_SideHook`` with ``_linear_side`` / ``_conv_side``: the forward hook of attach="hook",
  y = x W^T + (x B^T) A^T without forming A @ B.
- ``_Target``, ``_candidates``, ``_select``: which weights of a model are adapted (the
  ``modules=`` / ``min_size=`` rules of ``LowRankAdam``), and the record of each one.
- ``_release_lstm_weights``: drops nn.LSTM's cached W_eff after forward.

The optimizer (``memlab.lowrank.LowRankAdam``: the step, merges, remove, state_dict) is built on
these; the module docstring there explains the method and its memory figures.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SUPPORTED = (nn.Linear, nn.LSTM) + _CONVS
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ----------------------------------------------------------------------------- the factors
class LowRankDelta(nn.Module):
    """Delta = A @ B for one weight of shape `shape` viewed as (m, n) = (shape[0], rest).

    A is (m, r) and starts at zero, B is (r, n) random. With r >= min(m, n) one factor is the
    identity and stored as None (B = I: A is (m, n); A = I: B is (m, n)) and the other starts at
    zero. As a parametrization (attach="parametrize"), forward(W) returns W + Delta.
    """

    def __init__(self, shape, rank, device=None, dtype=torch.float32, generator=None):
        super().__init__()
        self.shape = torch.Size(shape)
        self.m, self.n = self.shape[0], math.prod(self.shape[1:])
        self.full = rank >= min(self.m, self.n)
        self.rank = min(self.m, self.n) if self.full else rank
        kw = dict(device=device, dtype=dtype)
        if self.full and self.n <= self.m:
            self.A = nn.Parameter(torch.zeros(self.m, self.n, **kw))         # (m, n), B = I
            self.register_parameter("B", None)
        elif self.full:
            self.register_parameter("A", None)                              # A = I
            self.B = nn.Parameter(torch.zeros(self.m, self.n, **kw))         # (m, n)
        else:
            self.A = nn.Parameter(torch.zeros(self.m, self.rank, **kw))      # (m, r)
            self.B = nn.Parameter(torch.empty(self.rank, self.n, **kw))      # (r, n)
            self.redraw(generator)

    @torch.no_grad()
    def redraw(self, generator=None):
        """B <- orthonormal rows times sqrt(n / r) (entries of variance 1/r), drawn on the CPU."""
        if self.full:
            return
        self.B.copy_(self.draw(generator))                                  # (r, n)

    @torch.no_grad()
    def draw(self, generator=None):
        """A new B in float64 (r, n): orthonormal rows times sqrt(n / r), drawn on the CPU."""
        g = torch.randn(self.n, self.rank, generator=generator, dtype=torch.float64)  # (n, r)
        q, _ = torch.linalg.qr(g)                                           # (n, r) orthonormal
        return (q.T * math.sqrt(self.n / self.rank)).to(self.B.device)      # (r, n)

    def delta(self):
        if self.A is None:
            return self.B                                                   # (m, n)
        if self.B is None:
            return self.A                                                   # (m, n)
        return self.A @ self.B                                              # (m, n)

    def trained(self):
        return [p for p in (self.A, self.B) if p is not None]

    def forward(self, W):
        if self.full or W.dtype != self.A.dtype:
            return W + self.delta().view(W.shape).to(W.dtype)               # (same as W)
        Wm = W.view(self.m, self.n)                                         # (m, n)
        return torch.addmm(Wm, self.A, self.B).view(W.shape)                # one m x n tensor

    def extra_repr(self):
        return f"shape={tuple(self.shape)}, rank={self.rank}{', full' if self.full else ''}"


def _cast(p, x):
    return p if p.dtype == x.dtype or not x.is_floating_point() else p.to(x.dtype)


def _linear_side(f: LowRankDelta, x):
    """(x B^T) A^T without forming A @ B; identity factors are skipped."""
    h = x if f.B is None else F.linear(x, _cast(f.B, x))                    # (..., r) or (..., m)
    return h if f.A is None else F.linear(h, _cast(f.A, h))                 # (..., m)


def _conv_side(conv, f: LowRankDelta, x):
    """conv(x, A @ B as a kernel) = 1x1-conv(conv(x, B as r kernels), A)."""
    kshape = f.shape[1:]                                                    # (in, *k)
    if f.A is None or f.B is None:
        return conv._conv_forward(x, _cast(f.delta(), x).view(f.shape), None)
    h = conv._conv_forward(x, _cast(f.B, x).view(f.rank, *kshape), None)   # (B, r, *L)
    a = _cast(f.A, h).view(f.m, f.rank, *([1] * (len(kshape) - 1)))         # (m, r, 1...)
    return _CONV_FN[len(kshape) - 1](h, a)                                  # (B, m, *L)


class _SideHook:
    """Forward hook of attach="hook": out + the side path through module.lowrank_<name>.

    A class rather than a closure so that copy.deepcopy / pickling of the model keep working
    (the factors are looked up on the module that runs, not captured).
    """

    def __init__(self, name):
        self.name = name

    def __call__(self, module, args, out):
        f = getattr(module, f"lowrank_{self.name}")
        x = args[0]
        side = _linear_side(f, x) if isinstance(module, nn.Linear) else _conv_side(module, f, x)
        return out + side


# ----------------------------------------------------------------------------- bookkeeping
@dataclass(eq=False)
class _Target:
    """One adapted weight."""
    module: nn.Module
    name: str                   # "weight", "weight_ih_l0", ...
    qualname: str               # "encoder.lstm.weight_ih_l0"
    requires_grad: bool         # to restore on remove()
    attach: str | None = None   # "hook" | "parametrize" | None (svd variant)
    factors: LowRankDelta | None = None
    handles: list = field(default_factory=list)

    @property
    def weight(self):
        if self.attach == "parametrize":
            return self.module.parametrizations[self.name].original
        return getattr(self.module, self.name)

    def matrix(self):
        w = self.weight
        return w.view(w.shape[0], -1)                                       # (m, n)


_NEVER = (nn.Embedding, nn.EmbeddingBag, parametrize.ParametrizationList, LowRankDelta)


def _candidates(module):
    """Names of the weight matrices that `module` itself owns (not its children's).

    Linear / Conv: "weight"; LSTM: weight_ih_l0, weight_hh_l0, ...; any other module: every
    parameter of its own with two or more dimensions (nn.MultiheadAttention's in_proj_weight, or
    q/k/v_proj_weight when kdim/vdim differ; a bare nn.Parameter matrix of a custom module).
    Embedding tables are left out (their gradient touches only the rows looked up), and so are
    the tensors inside parametrizations (including our own factors).
    """
    if isinstance(module, nn.LSTM):
        return [n for n in module._flat_weights_names if n.startswith("weight_")]
    if isinstance(module, _SUPPORTED):
        return ["weight"]
    if isinstance(module, _NEVER):
        return []
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]


def _select(model, modules, min_size):
    """[(qualname of module, module, weight name)] for the weights to adapt."""
    if modules is not None:
        if isinstance(modules, (str, type)):
            modules = [modules]
        if not isinstance(modules, (list, tuple)) or not all(
                isinstance(e, (str, type)) for e in modules):
            raise TypeError("modules must be None or a list of module-name patterns (str) or "
                            f"module types, got {modules!r}")
    out, hits = [], {}
    uses = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[p] = uses.get(p, 0) + 1
    for qual, mod in model.named_modules():
        names = _candidates(mod)
        if not names:
            continue
        if modules is not None:
            matched = [e for e in modules if (isinstance(e, type) and isinstance(mod, e)) or
                       (isinstance(e, str) and fnmatch.fnmatchcase(qual, e))]
            if not matched:
                continue
            for e in matched:
                hits[e if isinstance(e, str) else e.__name__] = True
        for name in names:
            w = getattr(mod, name)
            if (not isinstance(w, nn.Parameter) or w.dim() < 2 or not w.requires_grad
                    or not w.is_floating_point() or not w.is_contiguous()
                    or w.numel() < min_size or uses.get(w, 0) > 1
                    or parametrize.is_parametrized(mod, name)):
                continue
            out.append((qual, mod, name))
    if modules is not None:
        missing = [e if isinstance(e, str) else e.__name__ for e in modules
                   if (e if isinstance(e, str) else e.__name__) not in hits]
        if missing:
            names = [q for q, m in model.named_modules() if _candidates(m)]
            raise ValueError(f"modules: no module with a weight matrix matches {missing}; "
                             f"candidates are {names}")
    return out


def _release_lstm_weights(lstm, args, output):
    """Forward hook: forget the LSTM's cached W_eff so it is freed with the autograd graph."""
    params = {n for n in lstm._flat_weights_names if parametrize.is_parametrized(lstm, n)}
    lstm._flat_weights = [None if n in params else w
                          for n, w in zip(lstm._flat_weights_names, lstm._flat_weights)]
