"""The fp32-state step of many small tensors at once: the tensors below ``min_8bit_size`` keep
fp32 states and follow torch's update exactly (:func:`memlab.optim._sgd8bit_step` /
``_adam8bit_step`` on fp32 states). Run one tensor at a time from Python that step cost ~30 us a
tensor (a DF-ResNet233 has ~480 such tensors: BatchNorm weights and biases, small convolutions),
more than the whole fused fp32 Adam step of the model. Here the same torch operations, in the
same order with the same scalars, run as ``torch._foreach_*`` calls over the list, which on CPU
apply the single-tensor operation to each tensor in C++: the same bits (tests compare them).
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor


def usable(p: Tensor, grad: Tensor, states, fake: bool = False) -> bool:
    """A CPU float32 parameter, gradient and fp32 states (plain tensors, no subclass; with
    ``fake``, the fake tensors of ``memlab.memory.estimate`` as well: parameter, gradient and
    states all fake, so the estimate sees the foreach ops' temporaries as the real run)."""
    from memlab._optim_state import _is_fake
    ts = (grad, *states)
    plain = all(type(t) is Tensor for t in ts) or (
        fake and _is_fake(p) and all(_is_fake(t) for t in ts))
    return (plain and p.device.type == "cpu" and p.dtype == torch.float32
            and grad.dtype == torch.float32 and not grad.is_sparse
            and grad.layout == torch.strided
            and all(s.dtype == torch.float32 and s.device.type == "cpu"
                    and s.shape == p.shape for s in states))


def _grads(ps: List[Tensor], gs: List[Tensor], maximize: bool, weight_decay: float,
           decoupled: bool, lr: float) -> List[Tensor]:
    if maximize:
        gs = torch._foreach_neg(gs)                               # g = -g
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)        # p.mul_(1 - lr * wd)
        else:
            gs = torch._foreach_add(gs, ps, alpha=weight_decay)   # g.add(p, alpha=wd)
    return gs


def adam(items, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
         decoupled: bool, maximize: bool) -> None:
    """items: (p, grad, exp_avg, exp_avg_sq, step) with fp32 states, updated in place."""
    ps = [it[0] for it in items]
    gs = _grads(ps, [it[1] for it in items], maximize, weight_decay, decoupled, lr)
    ms, vs = [it[2] for it in items], [it[3] for it in items]
    torch._foreach_lerp_(ms, gs, 1 - beta1)                       # m.lerp_(g, 1 - beta1)
    torch._foreach_mul_(vs, beta2)                                # v.mul_(beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)          # .addcmul_(g, g, 1 - beta2)
    roots = torch._foreach_sqrt(vs)                               # v.sqrt()
    torch._foreach_div_(roots, [(1 - beta2 ** it[4]) ** 0.5 for it in items])
    torch._foreach_add_(roots, eps)                               # denom
    torch._foreach_addcdiv_(ps, ms, roots, [-(lr / (1 - beta1 ** it[4])) for it in items])


def sgd(items, *, lr: float, momentum: float, dampening: float, weight_decay: float,
        nesterov: bool, maximize: bool) -> None:
    """items: (p, grad, momentum buffer or None, first) with fp32 buffers, updated in place."""
    ps = [it[0] for it in items]
    gs = _grads(ps, [it[1] for it in items], maximize, weight_decay, False, lr)
    if momentum == 0:
        torch._foreach_add_(ps, gs, alpha=-lr)                    # p.add_(g, alpha=-lr)
        return
    first = [k for k, it in enumerate(items) if it[3]]
    rest = [k for k, it in enumerate(items) if not it[3]]
    if first:
        torch._foreach_copy_([items[k][2] for k in first], [gs[k] for k in first])
    if rest:
        bs = [items[k][2] for k in rest]
        torch._foreach_mul_(bs, momentum)
        torch._foreach_add_(bs, [gs[k] for k in rest], alpha=1 - dampening)
    bufs = [it[2] for it in items]
    step = torch._foreach_add(gs, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(ps, step, alpha=-lr)
