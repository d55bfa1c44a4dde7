"""The sample-wise machinery of :mod:`memlab.pruned`: run a loss one group of samples at a time,
its gradients w.r.t. the encoder and predictor outputs and the parameters computed in forward
(or, for ``reduction="none"``, recomputed in backward) and handed to autograd."""

from __future__ import annotations

from typing import List, Optional

import torch

from memlab._rng import capture_rng as _capture_rng
from memlab._samplewise import _RecomputeLoss, _StoredGradLoss, keep_grads
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
                gs = torch.autograd.grad(costs, inputs, weights[idx].to(costs.dtype),
                                         allow_unused=True)
                keep_grads(gs, enc_grad, (idx, slice(0, tg)), pred_grad, idx, param_grads)
                del gs                       # the group's enc/pred gradients: stored now
        if losses is None:
            losses = costs.new_empty(B)                                           # (B,)
        losses[idx] = costs.detach()
        if stats is not None:
            stats.setdefault("chunks", []).append(list(group))
    param_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, param_grads)]
    return losses, enc_grad, pred_grad, param_grads


def _params_of(*modules) -> list:
    """The trainable parameters of ``modules``, each once (a joiner may hold the simple
    projections it is given beside: a parameter listed twice got its gradient twice)."""
    out, seen = [], set()
    for m in modules:
        for p in (m.parameters() if hasattr(m, "parameters") else ()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _samplewise(group_fn, enc_out, pred_out, enc_lengths, groups, params, reduction, stats,
                record=None):
    """(the groups' losses reduced and attached to the graph, per-sample losses (B,) detached).
    ``record``: a hook called after the forward pass over the groups, before a "none"
    reduction's backward runs them again (group_fn can stop recording what it keeps)."""
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
        def rerun(enc, pred, w, want_enc, want_pred, ps):
            return _run_groups(group_fn, enc, pred, enc_lengths, groups, w, want_enc, want_pred,
                               ps, None)[1:]
        return _RecomputeLoss.apply(losses, (rerun, rng), enc_out, pred_out, *params), losses
    B = enc_out.shape[0]
    weights = torch.full((B,), 1.0 / B if reduction == "mean" else 1.0, dtype=torch.float64,
                         device=enc_out.device)                                   # (B,) cast per group
    losses, eg, pg, param_grads = _run_groups(*args, weights, want_enc, want_pred, params, stats)
    if record is not None:
        record()
    value = _StoredGradLoss.apply(_reduce(losses, reduction), (eg, pg, param_grads), enc_out,
                               pred_out, *params)
    return value, losses


