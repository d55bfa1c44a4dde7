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
"""

from __future__ import annotations

import contextlib
import operator
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F_
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["AdditiveCoupling", "InvertibleDownsample", "ReversibleSequence",
           "ReversibleLayerError", "frozen_running_stats"]


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


# ----------------------------------------------------------------------------- helpers
def _has_dropout(m: nn.Module) -> bool:
    return any(isinstance(s, (_DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout))
               for s in m.modules())


def _capture_rng(device: torch.device):
    """RNG state(s) that a module call on ``device`` may consume."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay_rng(state, device: torch.device):
    """Run the body with the recorded RNG state; restore the current one afterwards."""
    if state is None:
        yield
        return
    cpu, cuda = state
    devices = [device] if cuda is not None else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


@contextlib.contextmanager
def frozen_running_stats(norms: Iterable[_BatchNorm]):
    """Batch statistics as in training, but leave the running buffers untouched.

    ``norms``: BatchNorm modules. Switching ``track_running_stats`` off for the duration makes
    ``_BatchNorm.forward`` normalize with batch statistics and pass no running buffers to
    ``F.batch_norm``. (It changes which tensors the op saves, so ``torch.utils.checkpoint``,
    which checks that, needs another trick: see ``memlab.models.common``.)
    """
    norms = list(norms)
    for i, m in enumerate(norms):
        if not isinstance(m, _BatchNorm):
            raise TypeError(f"norms[{i}] must be a BatchNorm module (_BatchNorm), got "
                            f"{type(m).__name__}")
    changed = [m for m in norms if m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _params(m: nn.Module) -> List[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


# BatchNorm with the forward's batch statistics. A BatchNorm in training mode normalizes with the
# mean and variance of its input batch; computing them is most of its cost on a CPU (several
# times the cost of the normalization itself). The reconstructed input of the recomputation
# equals the forward's up to rounding, so the recomputation may reuse the forward's statistics
# (two vectors of C numbers per call, as ``native_batch_norm`` returns them for its own backward)
# instead of computing them again. Its backward is the training-mode BatchNorm backward (the
# statistics' dependence on the input included), i.e. what ordinary autograd computes from the
# same saved statistics. Only for the plain ``nn.BatchNorm1d/2d/3d`` classes on CPU tensors of
# fp32/fp64 without autocast, where ``F.batch_norm`` runs ``native_batch_norm`` itself (so the
# output and the running-buffer update are bit-identical to the module's own forward); anything
# else (subclasses, CUDA/cuDNN, autocast, reduced precision) takes the ordinary path.
_REUSE_BN_STATS = True          # switch for A/B timing and tests
_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _bn_fast_ok(m: _BatchNorm, x: torch.Tensor) -> bool:
    w = m._parameters.get("weight")          # (not through Module.__getattr__: per call)
    return (m.training and x.device.type == "cpu" and x.layout == torch.strided
            and x.dtype in (torch.float32, torch.float64) and m.eps > 0
            and x.numel() > x.shape[1]      # more than one value per channel
            and (w is None or w.dtype == x.dtype))


def _bn_capture(m: _BatchNorm, store: list):
    """A stand-in for ``m.forward`` (training mode) that also records the batch statistics."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _bn_fast_ok(m, x):
            return type(m).forward(m, x)
        m._check_input_dim(x)
        factor = 0.0 if m.momentum is None else m.momentum        # as _BatchNorm.forward
        track = m.track_running_stats
        if track and m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
        out, mean, invstd = torch.native_batch_norm(
            x, m.weight, m.bias, m.running_mean if track else None,
            m.running_var if track else None, True, factor, m.eps)
        store.append((m, mean, invstd))
        return out

    return forward


def _bn_replay(m: _BatchNorm, queue: list):
    """A stand-in for ``m.forward`` in the recomputation: normalize with the recorded statistics
    (in call order); without a usable record, the ordinary forward with frozen buffers."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if queue and m.training:
            mean, invstd = queue.pop(0)
            if mean.dtype == x.dtype and mean.device == x.device and mean.shape[0] == x.shape[1]:
                return _BatchNormReplay.apply(x, m.weight, m.bias, mean, invstd, m.eps)
        with frozen_running_stats([m]):
            return type(m).forward(m, x)

    return forward


class _BatchNormReplay(torch.autograd.Function):
    """Training-mode BatchNorm with given batch statistics ``mean``, ``invstd`` (per channel)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, eps):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        alpha = invstd if weight is None else invstd * weight            # (C,)
        beta = -mean * alpha if bias is None else bias - mean * alpha    # (C,)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, invstd)
        return torch.addcmul(beta.view(shape), x, alpha.view(shape))     # x * alpha + beta

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[1], need[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, mask)
        return (gx if need[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                None, None, None)


@contextlib.contextmanager
def _swapped_forwards(swaps):
    """Temporarily replace ``module.forward`` (an instance attribute, so hooks still run)."""
    for m, fn in swaps:
        m.__dict__["forward"] = fn
    try:
        yield
    finally:
        for m, _ in swaps:
            m.__dict__.pop("forward", None)


class _Unit:
    """One function call that the backward recomputes: a coupling's f or g, or a whole layer."""

    __slots__ = ("module", "params", "has_params", "norms", "plain_norms", "stochastic")

    def __init__(self, module: nn.Module):
        self.module = module
        self.params = _params(module)
        self.has_params = any(True for _ in module.parameters())
        self.norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
        # BatchNorms whose statistics the recomputation can reuse (see _BatchNormReplay)
        self.plain_norms = [m for m in self.norms
                            if type(m) in _PLAIN_BN and "forward" not in m.__dict__]
        self.stochastic = _has_dropout(module)

    def run(self, x: torch.Tensor, stats: Optional[list]) -> torch.Tensor:
        """The forward call (no grad); records BatchNorm statistics into ``stats`` if given."""
        if stats is None or not self.plain_norms:
            return self.module(x)
        swaps = [(m, _bn_capture(m, stats)) for m in self.plain_norms if m.training]
        with _swapped_forwards(swaps):
            return self.module(x)

    def recompute(self, x: torch.Tensor, rng, device,
                  stats: Optional[list]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(leaf input that requires grad, output with its graph)."""
        swaps, norms = [], self.norms
        if stats:
            queues: dict = {}
            for m, mean, invstd in stats:
                queues.setdefault(m, []).append((mean, invstd))
            swaps = [(m, _bn_replay(m, q)) for m, q in queues.items()]
            norms = [m for m in norms if m not in queues]   # the stand-ins freeze their own
        # Only the contexts that have something to do are entered (this runs per F/G call).
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            if rng is not None:
                stack.enter_context(_replay_rng(rng, device))
            if norms:
                stack.enter_context(frozen_running_stats(norms))
            if swaps:
                stack.enter_context(_swapped_forwards(swaps))
            x = x.detach().requires_grad_(True)
            return x, self.module(x)


# ----------------------------------------------------------------------------- autograd
class _ReversibleFunction(torch.autograd.Function):
    """Forward without a graph, keep the output; backward reconstructs block by block."""

    @staticmethod
    def forward(ctx, x, seq: "ReversibleSequence", units, rng_mode, *params):
        device = x.device
        dev_type = device.type
        ctx.seq, ctx.units, ctx.params = seq, units, params
        ctx.device = device
        if torch.amp.is_autocast_available(dev_type):
            ctx.autocast = (dev_type, torch.is_autocast_enabled(dev_type),
                            torch.get_autocast_dtype(dev_type))
        else:
            ctx.autocast = (dev_type, False, None)
        # BatchNorm statistics are recorded (and reused in backward) only without autocast
        keep_stats = not ctx.autocast[1] and dev_type == "cpu" and _REUSE_BN_STATS
        rngs: List[object] = []      # per unit call, None where not recorded
        stats: List[object] = []     # per unit call, recorded BatchNorm statistics or None
        sizes: List[object] = []     # per layer, the input's spatial size for non-couplings

        def run(unit: _Unit, inp, layer, fn, inp_name, where):
            want = rng_mode if rng_mode is not None else unit.stochastic
            rngs.append(_capture_rng(device) if want else None)
            st = [] if keep_stats and unit.plain_norms else None
            stats.append(st)
            return _call(layer, fn, None, inp, inp_name, "x", where,
                         call=lambda: unit.run(inp, st))

        h: object = x                # a tensor, or a (half1, half2) pair between couplings
        for i, (layer, lu) in enumerate(zip(seq.layers, units)):
            if isinstance(layer, AdditiveCoupling):
                x1, x2 = h if isinstance(h, tuple) else _halves(h, "x")
                where = _coupling_name(i, layer)
                fx = run(lu[0], x2, layer, "f", "x2", where)
                y1 = x1 + _half_out(layer, "f", fx, x2, x1, ("x2", "x1"), where)   # (B, C1, ...)
                gy = run(lu[1], y1, layer, "g", "y1", where)
                y2 = x2 + _half_out(layer, "g", gy, y1, x2, ("y1", "x2"), where)   # (B, C2, ...)
                h = (y1, y2)
                sizes.append(None)
            else:
                if isinstance(h, tuple):
                    h = torch.cat(h, dim=1)
                sizes.append(tuple(h.shape[2:]))
                h = run(lu[0], h, layer, "the layer", "its input", _coupling_name(i, layer))
        out = torch.cat(h, dim=1) if isinstance(h, tuple) else h
        if out is x:                 # an identity-like last layer: never hand back the input
            out = x.clone()
        ctx.rngs = rngs
        ctx.stats = stats
        ctx.sizes = sizes
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        seq: ReversibleSequence = ctx.seq
        device = ctx.device
        dev_type, ac_enabled, ac_dtype = ctx.autocast
        params = ctx.params
        grads = {id(p): None for p in params}
        need_x = ctx.needs_input_grad[0]
        rngs, stats = ctx.rngs, ctx.stats

        def add(ps, gs):
            for p, g in zip(ps, gs):
                if g is not None:
                    k = id(p)
                    grads[k] = g if grads[k] is None else grads[k] + g

        # The reconstruction subtractions run in fp32 with autocast off; when forward ran
        # without autocast there is nothing to switch (and no context to enter per block).
        if ac_enabled or _autocast_on(dev_type):
            outer = _autocast(dev_type, ac_dtype, ac_enabled)
            exact = lambda: _autocast(dev_type, None, False)        # noqa: E731
        else:
            outer = contextlib.nullcontext()
            exact = contextlib.nullcontext
        call = len(rngs)
        h, dh = y.detach(), dy       # carried state and its gradient
        del y, dy                    # only h/dh keep them alive from here on
        with outer:
            for i in range(len(seq.layers) - 1, -1, -1):
                layer, units = seq.layers[i], ctx.units[i]
                first = i == 0
                if isinstance(layer, AdditiveCoupling):
                    uf, ug = units
                    call -= 2
                    y1, y2 = h if isinstance(h, tuple) else _halves(h, "y")
                    dy1, dy2 = dh if isinstance(dh, tuple) else dh.chunk(2, dim=1)
                    del h, dh        # from here on each map is freed as soon as it is done
                    # G: recompute once with grad, backprop dy2 into y1 and G's parameters.
                    y1_, gy = ug.recompute(y1, rngs[call + 1], device, stats[call + 1])
                    res = torch.autograd.grad(gy, [y1_] + ug.params, dy2.to(gy.dtype),
                                              allow_unused=True)
                    del y1_
                    add(ug.params, res[1:])
                    with exact():
                        x2 = y2 - gy.detach().to(y2.dtype)     # (B, C2, ...) fp32 reconstruction
                    del gy, y2
                    dy1 = _acc(res[0], dy1, dy2)               # dL/dy1 in total
                    del res
                    # F: recompute once with grad, backprop dy1 into x2 and F's parameters.
                    want_x = need_x or not first
                    x2_, fx = uf.recompute(x2, rngs[call], device, stats[call])
                    inputs = ([x2_] if want_x else []) + uf.params
                    res = torch.autograd.grad(fx, inputs, dy1.to(fx.dtype), allow_unused=True)
                    del x2_
                    dx2 = None
                    if want_x:
                        dx2 = _acc(res[0], dy2, dy1)
                        res = res[1:]
                    del dy2
                    add(uf.params, res)
                    del res
                    x1 = None
                    if want_x:   # the first block's input is needed only for its gradient
                        with exact():
                            x1 = y1 - fx.detach().to(y1.dtype)     # (B, C1, ...)
                    del fx, y1
                    h, dh = (x1, x2), (dy1, dx2)
                    del x1, x2, dy1, dx2
                else:
                    (u,) = units
                    call -= 1
                    if isinstance(h, tuple):
                        h = torch.cat(h, dim=1)
                        dh = torch.cat(dh, dim=1)
                    # Parameter-free layers invert with grad mode on (nothing requires grad, so
                    # no graph): the reconstruction is an activation, not a gradient.
                    grad_mode = torch.enable_grad() if not u.has_params else torch.no_grad()
                    with grad_mode, _autocast(dev_type, None, False):
                        x = _invert(layer, h.detach(), ctx.sizes[i])
                    del h
                    x_, out = u.recompute(x, rngs[call], device, stats[call])
                    want_x = need_x or not first
                    inputs = ([x_] if want_x else []) + u.params
                    if inputs:
                        res = torch.autograd.grad(out, inputs, dh.to(out.dtype),
                                                  allow_unused=True)
                    else:
                        res = ()
                    del dh, out, x_
                    if want_x:
                        dx = res[0] if res[0] is not None else torch.zeros_like(x)
                        res = res[1:]
                    else:
                        dx = None
                    add(u.params, res)
                    del res
                    h, dh = x, dx
                    del x, dx
        dx = None
        if need_x:
            dx = torch.cat(dh, dim=1) if isinstance(dh, tuple) else dh
        return (dx, None, None, None) + tuple(grads[id(p)] for p in params)


def _acc(fresh: Optional[torch.Tensor], other: torch.Tensor, *keep: torch.Tensor):
    """``fresh + other``, computed in place into ``fresh`` (a gradient that autograd.grad just
    returned) so that no extra buffer is allocated -- unless ``fresh`` shares its storage with
    ``other`` or with a tensor in ``keep`` (a gradient can be passed through unchanged, e.g. by
    an identity F), in which case a new tensor is returned."""
    if fresh is None:
        return other
    ptr = fresh.untyped_storage()._cdata
    if (fresh.dtype == other.dtype and fresh.shape == other.shape
            and all(t is None or t.untyped_storage()._cdata != ptr for t in (other,) + keep)):
        return fresh.add_(other)
    return fresh + other


def _autocast(dev_type: str, dtype, enabled: bool):
    """``torch.autocast`` for device types that have it; a no-op context otherwise."""
    if not torch.amp.is_autocast_available(dev_type):
        return contextlib.nullcontext()
    if dtype is None:
        return torch.autocast(dev_type, enabled=enabled)
    return torch.autocast(dev_type, dtype=dtype, enabled=enabled)


def _autocast_on(dev_type: str) -> bool:
    return torch.amp.is_autocast_available(dev_type) and torch.is_autocast_enabled(dev_type)


def _invert(layer: nn.Module, y: torch.Tensor, size) -> torch.Tensor:
    if isinstance(layer, InvertibleDownsample):
        return layer.inverse(y, size=size)
    return layer.inverse(y)


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
