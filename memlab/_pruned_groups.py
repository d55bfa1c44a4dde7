"""The sample-wise machinery of :mod:`memlab.pruned`: run a loss one group of samples at a time,
its gradients w.r.t. the encoder and predictor outputs and the parameters computed in forward
(or, for ``reduction="none"``, recomputed in backward) and handed to autograd."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.autograd.function import once_differentiable

from memlab._rng import capture_rng as _capture_rng, replay_rng as _replay_rng
from memlab.transducer import _reduce


def _run_groups(group_fn, enc_out, pred_out, enc_lengths, groups, weights, want_enc, want_pred,
                params, stats):
    """Losses (B,) and, if ``weights`` (B,) is given, grads of sum_b w_b loss_b w.r.t. enc_out,
    pred_out and params (None where not wanted). ``group_fn(e (n, Tg, H), p (n, U+1, H), idx,
    Tg)`` -> the group's losses (n,), with their graph; one group's band exists at a time."""
    B = enc_out.shape[0]
    grad = weights is not None
    enc_grad = torch.zeros_like(enc_out) if grad and want_enc else None           # (B, T, H)
    pred_grad = torch.zeros_like(pred_out) if grad and want_pred else None        # (B, U+1, H)
    param_grads: List[Optional[torch.Tensor]] = [None] * len(params)
    losses = None
    t_len = enc_lengths.tolist()
    enc_d, pred_d = enc_out.detach(), pred_out.detach()
    for group in groups:
        idx = torch.tensor(group, device=enc_out.device)                          # (n,)
        tg = max(t_len[i] for i in group)
        with torch.enable_grad() if grad else torch.no_grad():
            e = enc_d[idx, :tg].requires_grad_(grad and want_enc)                 # (n, Tg, H)
            p = pred_d[idx].requires_grad_(grad and want_pred)                    # (n, U+1, H)
            costs = group_fn(e, p, idx, tg)                                       # (n,)
            if grad:
                inputs = ([e] if want_enc else []) + ([p] if want_pred else []) + list(params)
                gs = list(torch.autograd.grad(costs, inputs, weights[idx].to(costs.dtype),
                                              allow_unused=True))
                if want_enc:
                    g = gs.pop(0)
                    if g is not None:
                        enc_grad[idx, :tg] = g.to(enc_grad.dtype)
                if want_pred:
                    g = gs.pop(0)
                    if g is not None:
                        pred_grad[idx] = g.to(pred_grad.dtype)
                for j, g in enumerate(gs):
                    if g is not None:
                        param_grads[j] = g if param_grads[j] is None else param_grads[j].add_(g)
        if losses is None:
            losses = costs.new_empty(B)                                           # (B,)
        losses[idx] = costs.detach()
        if stats is not None:
            stats.setdefault("chunks", []).append(list(group))
    param_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, param_grads)]
    return losses, enc_grad, pred_grad, param_grads


class _StoredGrads(torch.autograd.Function):
    """A reduced loss whose gradients were computed in forward: backward scales them."""

    @staticmethod
    def forward(ctx, value, stored, enc_out, pred_out, *params):
        enc_grad, pred_grad, param_grads = stored
        ctx.has = (enc_grad is not None, pred_grad is not None)
        ctx.save_for_backward(*[g for g in (enc_grad, pred_grad) if g is not None], *param_grads)
        return value.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        saved = list(ctx.saved_tensors)
        enc_grad = saved.pop(0) * grad_output if ctx.has[0] else None
        pred_grad = saved.pop(0) * grad_output if ctx.has[1] else None
        return (None, None, enc_grad, pred_grad, *[g * grad_output for g in saved])


class _Recompute(torch.autograd.Function):
    """reduction="none": per-sample weights arrive in backward, so the groups are recomputed there
    (replaying the forward's RNG state, so a dropout joiner draws the same masks)."""

    @staticmethod
    def forward(ctx, losses, spec, enc_out, pred_out, *params):
        ctx.spec = spec
        ctx.save_for_backward(enc_out, pred_out, *params)
        return losses.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        enc_out, pred_out, *params = ctx.saved_tensors
        group_fn, el, groups, rng = ctx.spec
        with _replay_rng(rng, enc_out.device):
            _, eg, pg, param_grads = _run_groups(
                group_fn, enc_out, pred_out, el, groups, grad_output,
                ctx.needs_input_grad[2], ctx.needs_input_grad[3], params, None)
        return (None, None, eg, pg, *param_grads)


def _params_of(*modules) -> list:
    return [p for m in modules for p in (m.parameters() if hasattr(m, "parameters") else ())
            if p.requires_grad]


def _samplewise(group_fn, enc_out, pred_out, enc_lengths, groups, params, reduction, stats,
                record=None):
    """(the groups' losses reduced and attached to the graph, per-sample losses (B,) detached).
    ``record``: a hook called after the forward pass over the groups (it reads what group_fn
    kept), before a "none" reduction's backward recomputes them."""
    want_enc, want_pred = enc_out.requires_grad, pred_out.requires_grad
    need = torch.is_grad_enabled() and (want_enc or want_pred or bool(params))
    args = (group_fn, enc_out, pred_out, enc_lengths, groups)
    if not need or reduction == "none":
        rng = _capture_rng(enc_out.device) if need else None  # backward replays it: same masks
        losses = _run_groups(*args, None, False, False, [], stats)[0]
        if record is not None:
            record()
        if not need:
            return _reduce(losses, reduction), losses
        spec = (group_fn, enc_lengths, groups, rng)
        return _Recompute.apply(losses, spec, enc_out, pred_out, *params), losses
    B = enc_out.shape[0]
    weights = torch.full((B,), 1.0 / B if reduction == "mean" else 1.0, dtype=torch.float64,
                         device=enc_out.device)                                   # (B,) cast per group
    losses, eg, pg, param_grads = _run_groups(*args, weights, want_enc, want_pred, params, stats)
    if record is not None:
        record()
    value = _StoredGrads.apply(_reduce(losses, reduction), (eg, pg, param_grads), enc_out,
                               pred_out, *params)
    return value, losses


