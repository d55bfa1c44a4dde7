"""Replaying a forward call in backward: RNG state, BatchNorm statistics, autocast state.

References:
- A. Gomez, M. Ren, R. Urtasun, R. Grosse, "The Reversible Residual Network", arXiv 1707.04585:
  backward recomputes each block's F/G from a reconstructed input, so the recomputation must
  see what forward saw.
- S. Ioffe, C. Szegedy, "Batch Normalization", arXiv 1502.03167: in training the batch
  statistics normalize, and the running buffers are updated once per forward call.

Why a module of its own: ``memlab._reversible_autograd`` recomputes every F/G (or whole layer)
once with grad; this module holds what makes that recomputation equal to forward and free of
side effects -- the same dropout masks (recorded and restored RNG state), batch statistics
without a second update of the running buffers (``frozen_running_stats``, and the recorded
statistics of plain ``nn.BatchNorm*d`` on CPU, ``_BatchNormReplay``), and forward's autocast
state -- bundled per call in ``_Unit``. Nothing here knows about couplings.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from memlab._rng import capture_rng as _capture_rng, replay_rng as _replay_rng  # noqa: F401

__all__ = ["frozen_running_stats"]


# ----------------------------------------------------------------------------- RNG, BatchNorm
def _has_dropout(m: nn.Module) -> bool:
    return any(isinstance(s, (_DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout))
               for s in m.modules())


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
# (the on/off switch, _REUSE_BN_STATS, is read in memlab._reversible_autograd)
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


# ----------------------------------------------------------------------------- autocast
def _autocast(dev_type: str, dtype, enabled: bool):
    """``torch.autocast`` for device types that have it; a no-op context otherwise."""
    if not torch.amp.is_autocast_available(dev_type):
        return contextlib.nullcontext()
    if dtype is None:
        return torch.autocast(dev_type, enabled=enabled)
    return torch.autocast(dev_type, dtype=dtype, enabled=enabled)


def _autocast_on(dev_type: str) -> bool:
    return torch.amp.is_autocast_available(dev_type) and torch.is_autocast_enabled(dev_type)
