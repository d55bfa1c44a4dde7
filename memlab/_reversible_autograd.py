"""The memory-saving autograd function of ``ReversibleSequence``.

References:
- A. Gomez, M. Ren, R. Urtasun, R. Grosse, "The Reversible Residual Network", arXiv 1707.04585:
  backward walks the blocks from last to first, rebuilding each block's input from its output.
- Z. Liu, Y. Qian, "Memory-Efficient Training for Deep Speaker Embedding Learning in Speaker
  Verification", arXiv 2412.01195: the partially and fully reversible speaker ResNets.

Why a module of its own: ``_ReversibleFunction`` is the one place where the saving happens --
forward runs the layers without a graph and saves only the chain's output; backward
reconstructs ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)`` block by block, recomputing one F or G at a
time with grad (steps 1-4 of the ``memlab.reversible`` docstring, which also states the memory
behaviour). It sits between the layers (``memlab._reversible_layers``) and the replay helpers
(``memlab._reversible_replay``) below, and the container (``memlab.reversible``) above.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, List, Optional

import torch
from torch.autograd.function import once_differentiable

from memlab._reversible_layers import (AdditiveCoupling, _call, _coupling_name, _half_out,
                                       _halves, _invert)
from memlab._reversible_replay import _Unit, _autocast, _autocast_on, _capture_rng

if TYPE_CHECKING:
    from memlab.reversible import ReversibleSequence

# Reuse forward's BatchNorm statistics in the recomputation (see memlab._reversible_replay);
# read on every forward. A switch for A/B timing and tests.
_REUSE_BN_STATS = True


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
