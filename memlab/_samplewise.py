"""The machinery of :func:`memlab.transducer.samplewise_rnnt_loss`: run the joiner, the loss
and its gradient one chunk (a sample or a small group) at a time, and hand the stored gradients
to autograd.

For each chunk the joiner builds the chunk's logits (N, T, U+1, V);
:func:`memlab._lattice.chunk_loss` computes the losses and writes d loss / d logits into the
same buffer (when nothing in the joiner's graph saved its output: otherwise into a second
buffer, as large); the gradient is back-propagated through the joiner at once, and only the
gradients w.r.t. the chunk's enc_out and pred_out slices (no V axis) and the joiner's parameters
are kept.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
from torch.autograd.function import once_differentiable

from memlab._lattice import chunk_loss
from memlab._rng import capture_rng as _capture_rng, replay_rng as _replay_rng  # noqa: F401


def _joiner_params(joiner) -> List[torch.nn.Parameter]:
    params = getattr(joiner, "parameters", None)
    if params is None:
        return []
    return [p for p in params() if p.requires_grad]


def _may_overwrite(logits: torch.Tensor) -> bool:
    """Whether the gradient may overwrite the joiner's output: a non-leaf, contiguous tensor
    that spans its whole storage (a reshape of the last matmul's output is fine; a view of a
    leaf, e.g. of a parameter, is not), and no node of the joiner's graph saved (a view of) it for
    backward (e.g. a joiner ending in tanh or log_softmax saves its output)."""
    if logits.grad_fn is None or not logits.is_contiguous():
        return False
    base = logits._base
    if base is not None and (base.grad_fn is None or base.dtype != logits.dtype          # a view
                             or base.numel() != logits.numel() or not base.is_contiguous()):
        return False                       # of a leaf (a parameter?), or not a plain reshape
    st = logits.untyped_storage()
    if logits.storage_offset() != 0 or st.nbytes() != logits.numel() * logits.element_size():
        return False
    from memlab._estimate import _ESTIMATE_MODE
    # which storage: its data pointer; inside estimate (fake storages, no data) the object
    key = (lambda s: s._cdata) if _ESTIMATE_MODE else (lambda s: s.data_ptr())
    ptr, seen, stack = key(st), set(), [logits.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        saved = []
        for name in dir(fn):
            if name.startswith("_saved_"):
                try:
                    saved.append(getattr(fn, name))
                except Exception:  # noqa: BLE001  (freed or not a tensor): not ours
                    pass
        try:
            saved.extend(getattr(fn, "saved_tensors", None) or ())   # custom Functions
        except Exception:  # noqa: BLE001
            return False
        for v in saved:
            for t in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(t, torch.Tensor) and key(t.untyped_storage()) == ptr:
                    return False
        stack.extend(f for f, _ in fn.next_functions)
    return True


def keep_grads(gs, enc_grad, enc_at, pred_grad, pred_at, param_grads) -> None:
    """Store one chunk's gradients: ``gs`` = (enc grad if enc_grad is not None, pred grad if
    pred_grad is not None, *param grads) into enc_grad[enc_at], pred_grad[pred_at] and summed
    into param_grads (a list, None where nothing yet)."""
    gs = list(gs)
    for full, at in ((enc_grad, enc_at), (pred_grad, pred_at)):
        if full is not None:
            g = gs.pop(0)
            if g is not None:
                full[at] = g.to(full.dtype)
    for j, g in enumerate(gs):
        if g is not None:
            param_grads[j] = g if param_grads[j] is None else param_grads[j].add_(g)


def _run_chunks(joiner, enc_out, pred_out, targets, enc_lengths, target_lengths, blank, chunks,
                weights: Optional[torch.Tensor], want_enc: bool, want_pred: bool,
                params: List[torch.Tensor], stats: Optional[Dict]):
    """Loss of every sample and, if ``weights`` (B,) is given, the gradient of sum_i w_i loss_i.

    Returns (losses (B,), enc_grad (B, T, H_enc) or None, pred_grad (B, U+1, H_pred) or None,
    [grad of each param] or []). At most one group's logits (and their gradient) exist at once.
    """
    B = enc_out.shape[0]
    grad = weights is not None
    losses = None
    enc_grad = torch.zeros_like(enc_out) if grad and want_enc else None       # (B, T, H_enc)
    pred_grad = torch.zeros_like(pred_out) if grad and want_pred else None    # (B, U+1, H_pred)
    param_grads: List[Optional[torch.Tensor]] = [None] * len(params)
    enc_d, pred_d = enc_out.detach(), pred_out.detach()
    t_len, u_len = enc_lengths.tolist(), target_lengths.tolist()
    ctx = torch.enable_grad() if grad else torch.no_grad()
    for chunk in chunks:
        idx = torch.tensor(chunk, device=enc_out.device)                       # (N,)
        tg, ug = max(t_len[i] for i in chunk), max(u_len[i] for i in chunk)
        with ctx:
            e = enc_d[idx, :tg].requires_grad_(grad and want_enc)              # (N, Tg, H_enc)
            p = pred_d[idx, :ug + 1].requires_grad_(grad and want_pred)        # (N, Ug+1, H_pred)
            logits = joiner(e, p)                                              # (N, Tg, Ug+1, V)
            if logits.dim() != 4 or tuple(logits.shape[:3]) != (len(chunk), tg, ug + 1):
                raise ValueError(f"joiner must map enc_out (N, T, H) and pred_out (N, U+1, H) to "
                                 f"logits (N, T, U+1, V); for inputs {tuple(e.shape)} and "
                                 f"{tuple(p.shape)} it returned {tuple(logits.shape)}")
            lg = logits.detach()                                                # (N, Tg, Ug+1, V)
            args = (targets[idx, :ug], enc_lengths[idx], target_lengths[idx], blank)
            if grad:
                in_place = _may_overwrite(logits)
                out = lg if in_place else torch.empty_like(lg)   # d loss / d logits
                costs = chunk_loss(lg, *args, weights=weights[idx], out=out)     # (N,)
                inputs = ([e] if want_enc else []) + ([p] if want_pred else []) + list(params)
                root, g_root = logits, out
                if in_place and logits._base is not None:
                    # a reshape of the last op's output (nn.Linear on 4-D input): after the
                    # in-place write autograd would rebuild the view's grad_fn as an as_strided
                    # copy into a new zero tensor, so back-propagate from the base instead
                    root = logits._base
                    g_root = out.view(root.shape)
                gs = torch.autograd.grad(root, inputs, grad_outputs=g_root, allow_unused=True)
                del root, g_root
                del out
                if stats is not None:
                    stats.setdefault("in_place", []).append(in_place)
            else:
                costs = chunk_loss(lg, *args)                                    # (N,)
            costs = costs.to(lg.dtype)
            del logits, lg
            if grad:
                keep_grads(gs, enc_grad, (idx, slice(0, tg)), pred_grad,
                           (idx, slice(0, ug + 1)), param_grads)
        if losses is None:
            losses = costs.new_empty(B)                                        # (B,)
        losses[idx] = costs.detach()
        if stats is not None:
            stats.setdefault("chunks", []).append(list(chunk))
            stats.setdefault("chunk_shapes", []).append((len(chunk), tg, ug + 1))
    param_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, param_grads)]
    return losses, enc_grad, pred_grad, param_grads


def _stored_backward(ctx, grad_output):
    saved = list(ctx.saved_tensors)
    enc_grad = saved.pop(0) * grad_output if ctx.has_enc else None
    pred_grad = saved.pop(0) * grad_output if ctx.has_pred else None
    param_grads = [g * grad_output for g in saved]
    return (None, None, enc_grad, pred_grad, *param_grads)


class _StoredGradLoss(torch.autograd.Function):
    """Hands out gradients computed in forward: d out / d input = grad_output * stored gradient.

    Inputs: (value, (enc_grad, pred_grad, param_grads), enc_out, pred_out, *joiner params), where
    ``value`` is the already reduced (scalar) loss, so grad_output is a scalar.
    """

    @staticmethod
    def forward(ctx, value, stored, enc_out, pred_out, *params):
        enc_grad, pred_grad, param_grads = stored
        ctx.has_enc, ctx.has_pred = enc_grad is not None, pred_grad is not None
        ctx.save_for_backward(*([enc_grad] if ctx.has_enc else []),
                              *([pred_grad] if ctx.has_pred else []), *param_grads)
        return value.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        return _stored_backward(ctx, grad_output)


class _EagerJoinerLoss(_StoredGradLoss):
    """Like _StoredGradLoss, but the joiner's gradients were already added to ``.grad``."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if bool((grad_output != 1).any()):
            warnings.warn("samplewise_rnnt_loss(accumulate_joiner_grads=True): the joiner's "
                          "gradients were accumulated in forward for grad_output = 1; the "
                          f"incoming grad_output {float(grad_output):g} (loss scaling?) reaches "
                          "only the encoder and predictor", stacklevel=2)
        return _stored_backward(ctx, grad_output)


class _RecomputeLoss(torch.autograd.Function):
    """reduction="none": per-sample weights are known only in backward, so recompute there.

    Inputs: (losses (B,), (rerun, rng), enc_out, pred_out, *params): ``rerun(enc_out, pred_out,
    weights (B,), want_enc, want_pred, params)`` runs the chunks again and returns (enc_grad,
    pred_grad, param_grads) of sum_b w_b loss_b; ``rng`` is the RNG state before the forward's joiner
    calls, which the recomputation replays (as the reversible blocks do), so a stochastic
    joiner (dropout) draws the same masks and the gradient is that of the returned losses.
    """

    @staticmethod
    def forward(ctx, losses, spec, enc_out, pred_out, *params):
        ctx.spec = spec
        ctx.save_for_backward(enc_out, pred_out, *params)
        return losses.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        enc_out, pred_out, *params = ctx.saved_tensors
        rerun, rng = ctx.spec
        with _replay_rng(rng, enc_out.device):
            enc_grad, pred_grad, param_grads = rerun(enc_out, pred_out, grad_output,
                                                     ctx.needs_input_grad[2],
                                                     ctx.needs_input_grad[3], params)
        return (None, None, enc_grad, pred_grad, *param_grads)

