"""Reversible blocks: backpropagation that rebuilds activations instead of storing them.

The idea (Gomez et al. 2017, "The Reversible Residual Network", arXiv 1707.04585)
-------------------------------------------------------------------------------
An ordinary residual block ``y = x + F(x)`` must keep ``x`` and the insides of ``F`` until
backward, so a stage of ``N`` blocks keeps ``N`` sets of activations: memory grows with depth.
An *additive coupling* (Dinh et al. 2014, NICE) splits the channels in two halves and updates
one half from the other::

    y1 = x1 + F(x2)            x2 = y2 - G(y1)
    y2 = x2 + G(y1)            x1 = y1 - F(x2)        (the inverse, exact up to rounding)

so a block's input can be recomputed from its output. ``ReversibleSequence`` runs a chain of
such blocks in forward *without* recording anything and keeps only the chain's final output.
In backward it walks the blocks from last to first; for each coupling it

1. recomputes ``G(y1)`` with grad and back-propagates ``dy2`` through it (grads of G's
   parameters, and the part of ``dy1`` that flows through G),
2. reconstructs ``x2 = y2 - G(y1)`` from the value it just computed,
3. recomputes ``F(x2)`` with grad and back-propagates ``dy1`` through it,
4. reconstructs ``x1 = y1 - F(x2)``, and hands ``(x1, x2)`` and ``(dx1, dx2)`` to the previous
   block.

F and G each run once in forward and once (with grad) in backward: about 4/3 of the compute of
ordinary training (forward 1 + backward 2 becomes forward 1 + recompute 1 + backward 2).

Memory behaviour
----------------
Between forward and backward the sequence holds its output and nothing else (plus, only when a
block contains dropout, one RNG state of a few KiB per F/G call, and per BatchNorm call its batch
mean and inverse std). During backward it holds the saved output, the current halves and their
gradients, and the recorded graph of *one* F or G at a time; each half (``y2`` once ``x2`` is
rebuilt, ``dy1``/``dy2`` once folded into the new gradients) is dropped as soon as it is used up,
and the first block does not rebuild ``x1`` unless the input needs a gradient. Activation memory of a stage is therefore independent of its depth; with ordinary autograd
it is linear in depth, and with ``torch.utils.checkpoint`` per block it is linear in depth with a
smaller slope (one stored input per block). Liu & Qian 2024 ("Memory-Efficient Training for
Deep Speaker Embedding Learning in Speaker Verification", arXiv 2412.01195) apply this to
ResNet and DF-ResNet speaker encoders; see ``memlab.models.resnet`` / ``dfresnet``.

What is taken care of
---------------------
* Dropout inside F/G: the CPU (and, for CUDA inputs, the CUDA) RNG state before each F/G call
  is recorded and restored for the recomputation, so the masks are the same as in forward and
  the gradients equal ordinary autograd's. By default this is done only for blocks that contain
  a dropout module (``preserve_rng_state=None``); ``True`` forces it for every block (use it
  when F/G call ``torch.rand`` & co. directly), ``False`` turns it off.
* BatchNorm inside F/G: the recomputation must normalize with the *batch* statistics (as forward
  did) but must not update ``running_mean``/``running_var``/``num_batches_tracked`` a second
  time. For plain ``nn.BatchNorm1d/2d/3d`` on CPU (fp32/fp64, no autocast) forward records the
  batch mean and inverse std that ``native_batch_norm`` computes anyway (2 x C numbers per call)
  and the recomputation normalizes with them (one pass instead of a statistics pass plus a
  normalization pass; computing the statistics is most of a training-mode BatchNorm's cost on a
  CPU) and back-propagates with the ordinary training-mode BatchNorm backward. Every other
  ``_BatchNorm`` in training mode is switched to ``track_running_stats=False`` for the
  recomputation, which makes it use batch statistics and leave its buffers alone.
* Autocast: the autocast state of forward is re-entered for the recomputation; the carried
  tensors (the two halves) stay in fp32 -- a reduced-precision input is upcast on entry -- and
  the reconstruction subtractions run with autocast disabled, so rounding errors do not pile up
  in bf16/fp16 through a deep stage.
* Storage safety: nothing the caller passed in is modified or freed; the sequence only drops
  references to tensors it created itself. Its output is saved for backward, so an in-place
  change of the output by the caller is caught by autograd's version check.
* The input need not require grad (parameter gradients are still computed), and under
  ``torch.no_grad()`` the blocks simply run.
* Gradients are returned through the autograd graph (the parameters are inputs of the autograd
  Function), so ``loss.backward()`` accumulates into ``.grad`` as usual and
  ``torch.autograd.grad`` works too. Double backward is not supported.
* Forward hooks of F/G fire again during the recomputation (as with checkpointing).

Invertible downsampling
-----------------------
A strided convolution throws information away, so a RevNet keeps ordinary (non-reversible)
blocks at the stage transitions and stores their activations ("partially reversible").
``InvertibleDownsample`` is a space-to-depth permutation (as in i-RevNet, Jacobsen et al. 2018,
arXiv 1802.07088): ``(B, C, H, W) -> (B, 4C, H/2, W/2)`` with no parameters and an exact inverse,
so it can sit inside a ``ReversibleSequence`` and a whole stage including its transition is
reversible ("fully reversible"). How the models bring 4C back to the stage width is documented
in ``InvertibleDownsample`` and ``memlab.models.resnet``.

Where the code lives
--------------------
This module holds the container, ``ReversibleSequence``, and re-exports the rest of the public
API: the layers (``AdditiveCoupling``, ``InvertibleDownsample``, ``ReversibleLayerError``) from
``memlab._reversible_layers``; the memory-saving autograd function from
``memlab._reversible_autograd``; the RNG / BatchNorm / autocast replay of the recomputation
(``frozen_running_stats``) from ``memlab._reversible_replay``.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from memlab._reversible_autograd import _ReversibleFunction
from memlab._reversible_layers import (AdditiveCoupling, InvertibleDownsample,
                                       ReversibleLayerError, _buffers_kept, _call, _check_input,
                                       _coupling_name, _half_out, _halves, _invert)
from memlab._reversible_replay import (_BatchNormReplay, _Unit, _autocast,  # noqa: F401
                                       _autocast_on, frozen_running_stats)
# (_BatchNormReplay: re-exported, tests reach it as memlab.reversible._BatchNormReplay)

__all__ = ["AdditiveCoupling", "InvertibleDownsample", "ReversibleSequence",
           "ReversibleLayerError", "frozen_running_stats"]


# ----------------------------------------------------------------------------- container
class ReversibleSequence(nn.Module):
    """A chain of invertible layers trained without storing their activations.

    Args:
        layers: ``AdditiveCoupling`` blocks and/or other invertible modules (anything with an
            ``inverse(y)`` method, e.g. ``InvertibleDownsample``). Couplings get the efficient
            backward described in the module docstring; other layers are inverted with
            ``inverse`` and then recomputed with grad.
        preserve_rng_state: ``None`` (default) replays the RNG for blocks that contain a dropout
            module, ``True`` for every block, ``False`` never.

    ``forward(x)`` returns the same values as running the layers one after another (to
    rounding); in training it keeps only its output for backward. ``inverse(y)`` runs the
    layers backwards (no grad).

    Example::

        blocks = [AdditiveCoupling(f=conv_block(16), g=conv_block(16)) for _ in range(32)]
        stage = ReversibleSequence(blocks)          # x: (B, 32, H, W) -> (B, 32, H, W)
    """

    def __init__(self, layers: Iterable[nn.Module], preserve_rng_state: Optional[bool] = None):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("layers must hold at least one invertible module, got none")
        for i, m in enumerate(layers):
            if not isinstance(m, nn.Module):
                raise TypeError(f"layers[{i}] must be an nn.Module, got {type(m).__name__}")
            if not isinstance(m, AdditiveCoupling) and not callable(getattr(m, "inverse", None)):
                raise TypeError(f"layers[{i}] must be an AdditiveCoupling or have an inverse() "
                                f"method, got {type(m).__name__}")
        if preserve_rng_state not in (None, True, False):
            raise ValueError(f"preserve_rng_state must be None, True or False, "
                             f"got {preserve_rng_state!r}")
        self.layers = nn.ModuleList(layers)
        self.preserve_rng_state = preserve_rng_state
        self._units_cache = None

    @property
    def _units(self) -> List[Tuple[_Unit, ...]]:
        # Built on first use and rebuilt when the parameters (or their requires_grad flags)
        # change, so that module surgery after construction is picked up.
        # (one walk over the modules: this runs on every training forward)
        mods = list(self.modules())
        key = (tuple(map(id, mods)),
               tuple((id(p), p.requires_grad) for m in mods for p in m._parameters.values()
                     if p is not None))
        if self._units_cache is None or self._units_cache[0] != key:
            units = [(_Unit(m.f), _Unit(m.g)) if isinstance(m, AdditiveCoupling) else (_Unit(m),)
                     for m in self.layers]
            self._units_cache = (key, units)
        return self._units_cache[1]

    @staticmethod
    def _grad_params(units) -> List[nn.Parameter]:
        seen, out = set(), []
        for layer_units in units:
            for u in layer_units:
                for p in u.params:
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, "x")
        if x.dtype in (torch.float16, torch.bfloat16) and _autocast_on(x.device.type):
            x = x.float()            # carry the halves in fp32 under autocast
        if not torch.is_grad_enabled():
            return self._plain(x)
        units = self._units
        params = self._grad_params(units)
        if not (x.requires_grad or params):
            return self._plain(x)
        return _ReversibleFunction.apply(x, self, units, self.preserve_rng_state, *params)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            try:
                x = _call(layer, "the layer", layer, x, "its input", "x")
            except ReversibleLayerError as e:
                if e.layer is not layer or e.where is not None:
                    raise
                raise e.located(_coupling_name(i, layer)) from e.__cause__
        return x

    @torch.no_grad()
    def inverse(self, y: torch.Tensor, sizes: Optional[Sequence] = None) -> torch.Tensor:
        """Reconstruct the input from the output (``sizes``: spatial input sizes per layer,
        needed only for an ``InvertibleDownsample`` that saw odd sizes).

        The model is left as it was: in training mode BatchNorms normalize with batch statistics
        (as forward did) without updating their running buffers, and any other buffer a layer
        changes is restored."""
        _check_input(y, "y")
        if sizes is not None:
            if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__") \
                    or len(sizes) != len(self.layers):
                raise ValueError(f"sizes must be None or hold one entry per layer "
                                 f"({len(self.layers)}), got {sizes!r}")
        dev_type = y.device.type
        if y.dtype in (torch.float16, torch.bfloat16) and _autocast_on(dev_type):
            y = y.float()
        with _buffers_kept(self):    # an inverse must not change the model (BN buffers & co.)
            for i in range(len(self.layers) - 1, -1, -1):
                layer = self.layers[i]
                if isinstance(layer, AdditiveCoupling):
                    where = _coupling_name(i, layer)
                    y1, y2 = _halves(y, "y")
                    gy = _call(layer, "g", layer.g, y1, "y1", "y", where)
                    gy = _half_out(layer, "g", gy, y1, y2, ("y1", "y2"), where)
                    with _autocast(dev_type, None, False):
                        x2 = y2 - gy.to(y2.dtype)
                    fx = _call(layer, "f", layer.f, x2, "x2", "y", where)
                    fx = _half_out(layer, "f", fx, x2, y1, ("x2", "y1"), where)
                    with _autocast(dev_type, None, False):
                        x1 = y1 - fx.to(y1.dtype)
                    y = torch.cat([x1, x2], dim=1)
                else:
                    size = sizes[i] if sizes is not None else None
                    y = _call(layer, "its inverse", None, y, "its input", "y",
                              _coupling_name(i, layer), call=lambda: _invert(layer, y, size))
        return y

    def extra_repr(self) -> str:
        return f"preserve_rng_state={self.preserve_rng_state}"
