"""Invertible layers of a reversible chain: the additive coupling and space-to-depth downsampling.

References:
- L. Dinh, D. Krueger, Y. Bengio, "NICE", arXiv 1410.8516: the additive coupling
  ``y1 = x1 + F(x2); y2 = x2 + G(y1)``, inverted exactly by subtracting in reverse order.
- J.-H. Jacobsen, A. Smeulders, E. Oyallon, "i-RevNet", arXiv 1802.07088: an invertible
  space-to-depth downsampling, so that a stage transition is reversible too.

Why a module of its own: these are the user-facing building blocks (imported from
``memlab.reversible``, which re-exports them); the container that trains a chain of them without
storing activations (``memlab.reversible.ReversibleSequence``) and its autograd function
(``memlab._reversible_autograd``) sit above. Also here: the checks that turn a shape or dtype
mistake inside a coupling into a ``ReversibleLayerError`` naming the layer, shared by the
layers' own forward/inverse, the container and the autograd function.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Optional, Tuple

import torch
import torch.nn.functional as F_
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from memlab._reversible_replay import frozen_running_stats

__all__ = ["AdditiveCoupling", "InvertibleDownsample", "ReversibleLayerError"]


# ----------------------------------------------------------------------------- layers
class AdditiveCoupling(nn.Module):
    """``y1 = x1 + f(x2); y2 = x2 + g(y1)`` on the two channel halves of ``x`` (dim 1).

    The halves are ``x.chunk(2, dim=1)``: for an odd channel count the first half has one
    channel more, so ``f`` maps the second half's channels to the first's and ``g`` back.
    ``f`` and ``g`` may be any shape-preserving modules (per half); they never need an inverse.
    """

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        if not isinstance(f, nn.Module) or not isinstance(g, nn.Module):
            raise TypeError(f"f and g must be nn.Modules, got {type(f).__name__} and "
                            f"{type(g).__name__}")
        self.f = f
        self.g = g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = _halves(x, "x")                           # (B, C1, ...), (B, C2, ...)
        fx = _call(self, "f", self.f, x2, "x2", "x")
        y1 = x1 + _half_out(self, "f", fx, x2, x1, ("x2", "x1"))           # (B, C1, ...)
        gy = _call(self, "g", self.g, y1, "y1", "x")
        y2 = x2 + _half_out(self, "g", gy, y1, x2, ("y1", "x2"))           # (B, C2, ...)
        return torch.cat([y1, y2], dim=1)                  # (B, C, ...)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The input of ``forward``. Leaves the buffers alone: BatchNorm running statistics are
        neither used nor updated in training mode (batch statistics, as forward used)."""
        y1, y2 = _halves(y, "y")
        with _buffers_kept(self):
            gy = _call(self, "g", self.g, y1, "y1", "y")
            x2 = y2 - _half_out(self, "g", gy, y1, y2, ("y1", "y2"))           # (B, C2, ...)
            fx = _call(self, "f", self.f, x2, "x2", "y")
            x1 = y1 - _half_out(self, "f", fx, x2, y1, ("x2", "y1"))           # (B, C1, ...)
        return torch.cat([x1, x2], dim=1)                  # (B, C, ...)


class ReversibleLayerError(ValueError):
    """A layer of a reversible chain could not take its input, or a coupling's ``f``/``g``
    returned a tensor of the wrong shape. The message starts with the layer (``layers[i] (Class)``
    inside a ``ReversibleSequence``) and says what was expected and what was received."""

    def __init__(self, message: str, layer: nn.Module, where: Optional[str] = None):
        super().__init__(f"{where or type(layer).__name__}: {message}")
        self.layer, self.where, self.detail = layer, where, message

    def located(self, where: str) -> "ReversibleLayerError":
        return ReversibleLayerError(self.detail, self.layer, where)


def _call(layer: nn.Module, fn: str, module, inp: torch.Tensor, inp_name: str, arg: str,
          where: Optional[str] = None, call=None):
    """``module(inp)`` (or ``call()``); an error of torch on the way (a channel count or dtype the
    module cannot take) becomes a ReversibleLayerError naming the layer, its input's shape and
    the argument ``arg`` it came from. Out-of-memory errors pass unchanged."""
    try:
        return module(inp) if call is None else call()
    except ReversibleLayerError:
        raise
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError, NotImplementedError) as e:
        raise ReversibleLayerError(
            f"{fn} cannot take {inp_name} of shape {tuple(inp.shape)} and dtype {inp.dtype} "
            f"(from the argument {arg}): {type(e).__name__}: {e}", layer, where) from e


def _half_out(coupling: nn.Module, fn: str, out, inp: torch.Tensor, like: torch.Tensor,
              names: Tuple[str, str], where: Optional[str] = None) -> torch.Tensor:
    """Check that ``fn`` (``"f"`` or ``"g"``) mapped half ``inp`` to a tensor shaped like ``like``
    (the half it is added to) and return it; otherwise a ValueError saying which coupling, what
    shape was expected and what came back (instead of a broadcast error deep in torch)."""
    if isinstance(out, torch.Tensor) and out.shape == like.shape:
        return out
    got = (f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
           else f"a {type(out).__name__}")
    msg = (f"{fn} must map {names[0]} of shape {tuple(inp.shape)} to a tensor of the shape of "
           f"{names[1]}, {tuple(like.shape)}, got {got}")
    c1, c2 = (like.shape[1], inp.shape[1]) if fn == "f" else (inp.shape[1], like.shape[1])
    if c1 != c2:
        msg += (f"; with an odd channel count ({c1 + c2}) the halves (x.chunk(2, dim=1)) have "
                f"{c1} and {c2} channels, so f must map {c2} channels to {c1} and g {c1} to {c2}")
    raise ReversibleLayerError(msg, coupling, where)


def _coupling_name(i: int, layer: nn.Module) -> str:
    return f"layers[{i}] ({type(layer).__name__})"


@contextlib.contextmanager
def _buffers_kept(module: nn.Module):
    """Run the body without changing ``module``'s buffers.

    BatchNorms in training mode normalize with batch statistics and leave their running buffers
    alone (``frozen_running_stats``); any other buffer that the body changes in place or
    replaces is put back bit for bit (only those whose version counter moved are copied back,
    so a buffer saved for a pending backward is not touched).
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    frozen = {id(b) for m in norms if m.training and m.track_running_stats
              for b in m._buffers.values() if b is not None}
    saved = [(m, name, b, b._version, b.clone())
             for m in module.modules() for name, b in m._buffers.items()
             if b is not None and id(b) not in frozen]
    try:
        with frozen_running_stats(norms):
            yield
    finally:
        with torch.no_grad():
            for m, name, b, version, copy in saved:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                if b._version != version:
                    b.copy_(copy)


class InvertibleDownsample(nn.Module):
    """Space-to-depth 2x2: ``(B, C, H, W) -> (B, 4C, ceil(H/2), ceil(W/2))``, exactly invertible.

    Channel bookkeeping (the order of ``torch.nn.functional.pixel_unshuffle``): output channel
    ``4*c + 2*i + j`` at position ``(h, w)`` holds input channel ``c`` at ``(2h + i, 2w + j)``.
    So the four channels ``4c .. 4c+3`` are the four sub-pixel phases of input channel ``c``,
    and the first half of the output channels (``0 .. 2C-1``) holds all phases of the first
    ``C/2`` input channels.

    Odd sizes: an odd ``H`` (or ``W``) is zero-padded by one row (column) at the bottom (right)
    first, matching the ``ceil(H/2)`` output size of a stride-2, padding-1 3x3 convolution.
    The padding is an injection, not a bijection: ``inverse(y, size=(H, W))`` crops it off again
    (``ReversibleSequence`` records the sizes in forward and passes them), and the padded
    positions simply carry zeros into the next stage.

    To change the channel count in a fully reversible network, the models split the previous
    stage's output in two halves first, keep one half aside (it is the sequence output that is
    stored anyway) and downsample the other: ``C/2 -> 4 * C/2 = 2C`` channels, the doubling of
    an ordinary ResNet stage (see ``memlab.models.resnet``).
    """

    factor = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % 2 or W % 2:
            x = F_.pad(x, (0, W % 2, 0, H % 2))            # (B, C, H+H%2, W+W%2)
        if x.numel() == 0:           # pixel_unshuffle returns empty inputs unchanged
            B, C, H, W = x.shape
            return (x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)
                    .reshape(B, 4 * C, H // 2, W // 2))
        return F_.pixel_unshuffle(x, 2)                    # (B, 4C, ceil(H/2), ceil(W/2))

    def inverse(self, y: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The input of ``forward``: pixel shuffle, then crop to ``size=(H, W)`` if given."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if y.dim() != 4 or y.shape[1] % 4:
            raise ValueError(f"y must be 4-D (B, 4C, H', W') with a channel count divisible by 4, "
                             f"got shape {tuple(y.shape)}")
        if y.numel() == 0:           # pixel_shuffle returns empty inputs unchanged
            B, C4, H2, W2 = y.shape
            x = (y.reshape(B, C4 // 4, 2, 2, H2, W2).permute(0, 1, 4, 2, 5, 3)
                 .reshape(B, C4 // 4, 2 * H2, 2 * W2))
        else:
            x = F_.pixel_shuffle(y, 2)                     # (B, C, 2H', 2W')
        if size is not None:
            try:
                H, W = (operator.index(v) for v in size)
            except (TypeError, ValueError):
                raise TypeError(f"size must be a pair of ints (H, W) or None, got {size!r}") from None
            if H > x.shape[-2] or W > x.shape[-1] or H < x.shape[-2] - 1 or W < x.shape[-1] - 1:
                raise ValueError(f"size must be within one of {tuple(x.shape[-2:])}, got {size}")
            x = x[..., :H, :W]
        return x


def _check_input(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() and x.layout == torch.strided):
        raise TypeError(f"{name} must be a dense floating-point tensor, got dtype {x.dtype} "
                        f"and layout {x.layout}")


def _halves(x: torch.Tensor, name: str):
    _check_input(x, name)
    if x.dim() < 2 or x.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 channels in dim 1 to be split in halves, "
                         f"got shape {tuple(x.shape)}")
    return x.chunk(2, dim=1)


def _invert(layer: nn.Module, y: torch.Tensor, size) -> torch.Tensor:
    if isinstance(layer, InvertibleDownsample):
        return layer.inverse(y, size=size)
    return layer.inverse(y)
