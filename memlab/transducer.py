"""Transducer (RNN-T) loss three ways: a readable reference, batched (the whole 4-D tensor at once:
memlab's lattice kernel or torchaudio's) and sample-wise.

References:
  A. Graves, "Sequence Transduction with Recurrent Neural Networks", ICML workshop 2012
     (arXiv 1211.3711): the T x (U+1) alignment lattice and its forward (alpha) recursion.
  S. Braun, E. McDermott, R. Hsiao, "Neural Transducer Training: Reduced Memory Consumption
     with Sample-wise Computation", ICASSP 2023 (arXiv 2211.16270): compute the joiner, the
     loss and its gradient one sample at a time, keep only the gradients of the (small) encoder
     and predictor outputs, and never hold the batch's B x T x (U+1) x V tensor.

The lattice. Sample b has T_b encoder frames and U_b target tokens. A path starts at (t, u) =
(0, 0); from (t, u) it either emits blank and moves to (t+1, u) or emits token y_{u+1} and moves
to (t, u+1); it ends with a blank from (T_b - 1, U_b). With log-probabilities
``log_probs = log_softmax(logits)`` of shape (B, T, U+1, V)::

    alpha(0, 0) = 0
    alpha(t, u) = logaddexp(alpha(t-1, u) + log_probs[t-1, u, blank],
                            alpha(t, u-1) + log_probs[t, u-1, y_u])
    loss_b      = -(alpha(T_b-1, U_b) + log_probs[T_b-1, U_b, blank])

Conventions shared by all three functions:

* ``logits`` (B, T, U+1, V) are unnormalised (log-softmax is applied inside);
* ``targets`` (B, U) integer; positions past ``target_lengths`` are padding and ignored;
  valid positions must lie in [0, V) and must not be ``blank``;
* lengths are 1-D integer tensors; 1 <= logit_lengths <= T, 0 <= target_lengths <= U;
* ``reduction``: "none" -> per-sample losses (B,); "sum" -> their sum; "mean" -> their mean over
  the batch, i.e. ``losses.sum() / B``. This is torchaudio's convention (it is *not* divided by
  the target lengths, unlike ``torch.nn.CTCLoss``'s "mean").

The sample-wise loss runs the joiner itself, so it takes the joiner and its two inputs instead of
``logits``. See :func:`samplewise_rnnt_loss` for how gradients reach the joiner's parameters.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from memlab._samplewise import (_capture_rng, _EagerJoinerLoss, _joiner_params, _RecomputeLoss,
                                _run_chunks, _StoredGradLoss)

REDUCTIONS = ("mean", "sum", "none")
DEFAULT_MAX_CHUNK_BYTES = 64 * 2**20   # logits + their gradient of one joiner/loss call
_NEG = -1e30                           # "log 0" that keeps gradients finite (unlike -inf)


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_tensor(name: str, x, ndim: int, kind: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.device.type == "meta":
        raise ValueError(f"{name} must be on a device with data (the losses read lengths and "
                         f"targets), got device {x.device}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if kind == "float" and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if kind == "int" and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got dtype {x.dtype}")


def _check_common(batch: int, T: int, U: int, targets, in_lengths, target_lengths, blank: int,
                  reduction: str, device: torch.device, in_name: str,
                  vocab_size: Optional[int]) -> None:
    """Checks shared by the three losses. ``batch``/``T``/``U`` come from the float inputs."""
    _check_tensor("targets", targets, 2, "int")
    _check_tensor(in_name, in_lengths, 1, "int")
    _check_tensor("target_lengths", target_lengths, 1, "int")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(blank, int) or isinstance(blank, bool):
        raise TypeError(f"blank must be an int, got {type(blank).__name__}")
    if batch == 0:
        raise ValueError("the batch is empty (batch size 0); need at least one sample")
    for name, x in (("targets", targets), (in_name, in_lengths), ("target_lengths", target_lengths)):
        if x.device != device:
            raise ValueError(f"{name} must be on the same device as the inputs ({device}), "
                             f"got {x.device}")
        if x.shape[0] != batch:
            raise ValueError(f"{name} must have batch size {batch}, got shape {tuple(x.shape)}")
    if targets.shape[1] != U:
        raise ValueError(f"targets must have shape (B, U) = ({batch}, {U}) to match the U+1 = {U + 1} "
                         f"predictor positions, got {tuple(targets.shape)}")
    lo, hi = int(in_lengths.min()), int(in_lengths.max())
    if lo < 1 or hi > T:
        raise ValueError(f"{in_name} must lie in [1, T={T}], got values in [{lo}, {hi}]")
    lo, hi = int(target_lengths.min()), int(target_lengths.max())
    if lo < 0 or hi > U:
        raise ValueError(f"target_lengths must lie in [0, U={U}] (U = targets.shape[1]), "
                         f"got values in [{lo}, {hi}]")
    if vocab_size is not None:
        if not 0 <= blank < vocab_size:
            raise ValueError(f"blank must lie in [0, V={vocab_size}), got {blank}")
        _check_target_values(targets, target_lengths, blank, vocab_size)


def _check_target_values(targets, target_lengths, blank: int, vocab_size: int) -> None:
    from memlab.memory import on_host                  # fake tensors without values: no check
    on_host(lambda t, n: _check_known_target_values(t, n, blank, vocab_size), targets,
            target_lengths)


def _check_known_target_values(targets, target_lengths, blank: int, vocab_size: int) -> None:
    U = targets.shape[1]
    valid = torch.arange(U, device=targets.device)[None, :] < target_lengths[:, None]  # (B, U)
    bad = valid & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        b, u = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"targets must lie in [0, V={vocab_size}) within target_lengths, got "
                         f"targets[{b}, {u}] = {int(targets[b, u])}")
    bad = valid & (targets == blank)
    if bool(bad.any()):
        b, u = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"targets must not contain the blank index {blank} within target_lengths, "
                         f"got targets[{b}, {u}] = {blank}")


def _check_max_chunk_bytes(value) -> Optional[float]:
    """``max_chunk_bytes``: None (default budget), inf (no limit: one call) or a number >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"max_chunk_bytes must be a number of bytes (int or float) or None, got "
                        f"{value!r} of type {type(value).__name__}")
    if math.isnan(value) or value < 1:
        raise ValueError(f"max_chunk_bytes must be a number of bytes >= 1, inf (no limit) or "
                         f"None, got {value!r}")
    return math.inf if value == math.inf else int(value)


def _check_logits_args(logits, targets, logit_lengths, target_lengths, blank, reduction) -> None:
    _check_tensor("logits", logits, 4, "float")
    B, T, U1, V = logits.shape
    if U1 < 1:
        raise ValueError(f"logits must have U+1 >= 1 predictor positions in dim 2 (B, T, U+1, V), "
                         f"got shape {tuple(logits.shape)}")
    _check_common(B, T, U1 - 1, targets, logit_lengths, target_lengths, blank, reduction,
                  logits.device, "logit_lengths", V)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / losses.shape[0]
    return losses


# ----------------------------------------------------------------------------------------------
# 1. reference: the forward recursion in plain PyTorch, autograd does the backward


def _alpha_diagonals(logits, targets, logit_lengths, target_lengths, blank):
    """The alpha recursion of every sample, one anti-diagonal n = t + u per step.

    Returns (alphas (B, T+U, U+1) indexed by (n, u), lp_blank (B, T, U+1)).
    """
    B, T, U1, V = logits.shape
    U = U1 - 1
    dev = logits.device
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_probs = logits.to(work).log_softmax(dim=-1)                          # (B, T, U+1, V)
    tgt_len = target_lengths.long()
    u_idx = torch.arange(U1, device=dev)                                       # (U+1,)
    valid = u_idx[None, :U] < tgt_len[:, None]                                 # (B, U)
    tgt = torch.where(valid, targets.long(), blank)                            # (B, U) padding -> blank
    lp_blank = log_probs[..., blank]                                           # (B, T, U+1)
    lp_emit = log_probs[:, :, :U].gather(-1, tgt[:, None, :, None].expand(B, T, U, 1))
    lp_emit = lp_emit.squeeze(-1)                                              # (B, T, U)
    # shift by one so that index u holds the log-prob of emitting y_u from (t, u-1)
    lp_emit = torch.cat([lp_emit.new_full((B, T, 1), _NEG), lp_emit], dim=2)  # (B, T, U+1)

    alpha = torch.full((B, U1), _NEG, dtype=work, device=dev)                  # (B, U+1) diagonal n=0
    alpha = torch.where(u_idx[None] == 0, torch.zeros_like(alpha), alpha)
    diagonals = [alpha]
    for n in range(1, T + U):
        # stay: (t-1, u) --blank--> (t, u) with t = n - u, i.e. blank at (n-1-u, u) on diagonal n-1
        t_stay = n - 1 - u_idx                                                 # (U+1,)
        ok_stay = (t_stay >= 0) & (t_stay < T)
        b_lp = lp_blank[:, t_stay.clamp(0, T - 1), u_idx]                      # (B, U+1)
        stay = torch.where(ok_stay[None], alpha + b_lp, _NEG)                  # (B, U+1)
        # move: (t, u-1) --y_u--> (t, u), i.e. emit at (n-u, u-1), from index u-1 of diagonal n-1
        t_move = n - u_idx                                                     # (U+1,)
        ok_move = (u_idx >= 1) & (t_move >= 0) & (t_move < T)
        e_lp = lp_emit[:, t_move.clamp(0, T - 1), u_idx]                       # (B, U+1)
        prev = torch.cat([alpha.new_full((B, 1), _NEG), alpha[:, :-1]], dim=1)  # (B, U+1): u-1 -> u
        move = torch.where(ok_move[None], prev + e_lp, _NEG)                   # (B, U+1)
        alpha = torch.logaddexp(stay, move)                                    # (B, U+1)
        diagonals.append(alpha)
    return torch.stack(diagonals, dim=1), lp_blank                             # (B, T+U, U+1)


def rnnt_loss_reference(logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
                        target_lengths: torch.Tensor, blank: int = 0,
                        reduction: str = "mean") -> torch.Tensor:
    """RNN-T loss by the alpha recursion over anti-diagonals of the lattice (for teaching/tests).

    Every cell on anti-diagonal n = t + u depends only on cells of diagonal n - 1, so one Python
    iteration per diagonal (T + U of them) updates a whole diagonal for the whole batch. Computed
    in float64 for float64 input and float32 otherwise; returned in the dtype of ``logits``.
    Memory: like the batched loss it holds log_softmax(logits), a full (B, T, U+1, V) tensor.
    """
    _check_logits_args(logits, targets, logit_lengths, target_lengths, blank, reduction)
    B = logits.shape[0]
    alphas, lp_blank = _alpha_diagonals(logits, targets, logit_lengths, target_lengths, blank)
    in_len, tgt_len = logit_lengths.long(), target_lengths.long()
    b_idx = torch.arange(B, device=logits.device)
    last = alphas[b_idx, in_len - 1 + tgt_len, tgt_len]                        # (B,) alpha(T_b-1, U_b)
    losses = -(last + lp_blank[b_idx, in_len - 1, tgt_len])                    # (B,)
    return _reduce(losses.to(logits.dtype), reduction)


def rnnt_forward_variables(logits: torch.Tensor, targets: torch.Tensor,
                           logit_lengths: torch.Tensor, target_lengths: torch.Tensor,
                           blank: int = 0) -> torch.Tensor:
    """The forward variables alpha(t, u) of every sample on its T x (U+1) lattice (for teaching).

    alpha(t, u) is the log-probability of all partial paths that have reached (t, u): the first
    u target tokens emitted in the first t+1 frames (see the module docstring). Returns a
    (B, T, U+1) tensor in the dtype :func:`rnnt_loss_reference` computes in (float64 for float64
    logits, float32 otherwise); cells outside sample b's lattice (t >= T_b or u > U_b) are -inf.
    ``-(alpha[b, T_b-1, U_b] + log_softmax(logits)[b, T_b-1, U_b, blank])`` is sample b's loss.
    No gradient is needed for a picture, but autograd flows through it like the reference.
    """
    _check_logits_args(logits, targets, logit_lengths, target_lengths, blank, "none")
    B, T, U1, _ = logits.shape
    alphas, _ = _alpha_diagonals(logits, targets, logit_lengths, target_lengths, blank)
    dev = logits.device
    t_idx = torch.arange(T, device=dev)[:, None]                               # (T, 1)
    u_idx = torch.arange(U1, device=dev)[None, :]                              # (1, U+1)
    grid = alphas[:, t_idx + u_idx, u_idx.expand(T, U1)]                       # (B, T, U+1)
    inside = ((t_idx[None] < logit_lengths.long()[:, None, None])
              & (u_idx[None] <= target_lengths.long()[:, None, None]))         # (B, T, U+1)
    return grid.masked_fill(~inside, float("-inf"))


# ----------------------------------------------------------------------------------------------
# 2. batched: torchaudio's fused kernel on the whole (B, T, U+1, V) tensor


_TORCHAUDIO_FAKE: List[bool] = []


def _register_torchaudio_fake() -> None:
    """Shapes of torchaudio's loss op for fake tensors (``memlab.memory.estimate``): the costs
    (N,) and the gradient it computes in forward and keeps for backward, as large as the logits.
    torchaudio registers none; once per process."""
    if _TORCHAUDIO_FAKE:
        return
    _TORCHAUDIO_FAKE.append(True)
    try:
        @torch.library.register_fake("torchaudio::rnnt_loss_forward")
        def _fake(logits, targets, logit_lengths, target_lengths, blank, clamp,
                  fused_log_softmax):
            return logits.new_empty(logits.shape[:1]), torch.empty_like(logits)
    except (RuntimeError, AttributeError):   # registered already (elsewhere), or an old torch
        pass


def _torchaudio_costs(logits, targets, logit_lengths, target_lengths, blank, clamp=-1.0):
    """Per-sample losses (N,) from torchaudio; logits (N, T', U'+1, V) already cropped.

    torchaudio needs contiguous float32/float16 logits, int32 targets/lengths, and
    max(logit_lengths) == T', max(target_lengths) == U'. It computes d loss / d logits inside its
    forward (and saves that tensor for backward), with or without grad mode.
    """
    import torchaudio.functional as taF

    _register_torchaudio_fake()
    x = logits if logits.dtype in (torch.float32, torch.float16) else logits.float()
    costs = taF.rnnt_loss(x.contiguous(), targets.to(torch.int32).contiguous(),
                          logit_lengths.to(torch.int32), target_lengths.to(torch.int32),
                          blank=blank, clamp=clamp, reduction="none")         # (N,)
    return costs.to(logits.dtype)


KERNELS = ("auto", "memlab", "torchaudio")


class _StoredLogitsGrad(torch.autograd.Function):
    """Per-sample costs (N,) from memlab's lattice code on the whole batch, torchaudio's memory
    layout: d costs / d logits is computed in forward into a tensor as large as the logits and
    kept for backward, which scales it by each sample's incoming gradient."""

    @staticmethod
    def forward(ctx, logits, tgt, t_len, u_len, blank):
        from memlab._lattice import chunk_loss
        want = ctx.needs_input_grad[0]
        out = torch.empty_like(logits) if want else None
        weights = torch.ones(logits.shape[0], dtype=torch.float64) if want else None
        costs = chunk_loss(logits, tgt, t_len, u_len, blank, weights, out)
        if want:
            ctx.save_for_backward(out)
        return costs.to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_costs):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_costs.to(grad.dtype)[:, None, None, None]), None, None, None, None


def _use_memlab_kernel(kernel: str, x: torch.Tensor, clamp: float) -> bool:
    if kernel == "memlab":
        if clamp > 0:
            raise ValueError("clamp (gradient clamping) needs kernel='torchaudio'; memlab's "
                             "kernel does not clamp")
        return True
    if kernel == "torchaudio":
        return False
    from memlab._lattice import _kernel_ok           # auto: memlab's C kernel where it runs
    return clamp <= 0 and _kernel_ok(x, None, need_contiguous=False)


def rnnt_loss_batched(logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
                      target_lengths: torch.Tensor, blank: int = 0, reduction: str = "mean",
                      clamp: float = -1.0, kernel: str = "auto") -> torch.Tensor:
    """The RNN-T loss of the whole batch's 4-D logits at once (the standard way, as torchaudio's
    ``rnnt_loss``), behind memlab's argument conventions (see the module docstring).

    ``kernel``: "torchaudio" (its fused kernel, CPU and CUDA, float32/float16), "memlab" (memlab's
    lattice code: the C kernel on CPU float32/float64, else plain torch on any device) or "auto"
    (memlab's C kernel for contiguous CPU float32/float64 logits without ``clamp``, ~7x faster
    than torchaudio's CPU kernel; torchaudio otherwise). Both give the same losses and gradients
    (to float rounding) and the same memory: a gradient tensor as large as ``logits`` is kept from
    forward to backward. ``clamp`` > 0 clamps the gradient (torchaudio only).

    Differences from calling torchaudio directly: lengths/targets may be int64 (cast to int32);
    ``logits`` may be padded beyond the longest sample (cropped here, which copies; pad exactly to
    avoid the copy); float64/bfloat16 logits are computed in float32 by torchaudio (float64 stays
    float64 with memlab's kernel) and the loss is returned in the input dtype; blank defaults
    to 0. "mean" is the mean over the batch of per-sample losses.
    """
    _check_logits_args(logits, targets, logit_lengths, target_lengths, blank, reduction)
    if isinstance(clamp, bool) or not isinstance(clamp, numbers.Real) or math.isnan(clamp):
        raise TypeError(f"clamp must be a float (<= 0: no clamping), got {clamp!r}")
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    clamp = float(clamp)
    t_max, u_max = int(logit_lengths.max()), int(target_lengths.max())
    x = logits[:, :t_max, :u_max + 1]                                          # (B, T', U'+1, V)
    if _use_memlab_kernel(kernel, x, clamp):
        costs = _StoredLogitsGrad.apply(x.contiguous(), targets[:, :u_max], logit_lengths,
                                        target_lengths, blank)    # chunk_loss pads with blank
    else:
        costs = _torchaudio_costs(x, targets[:, :u_max], logit_lengths, target_lengths, blank,
                                  clamp)
    return _reduce(costs, reduction)


# ----------------------------------------------------------------------------------------------
# 3. sample-wise: joiner + loss + gradient one sample (or a small group) at a time


def _count(name: str, value, low: int) -> int:
    """An int (or anything with ``__index__``: numpy ints, 0-d int tensors) >= ``low``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int >= {low}, got {value!r} of type "
                        f"{type(value).__name__}") from None
    if v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v}")
    return v


def _chunk_bytes(n: int, T: int, U: int, vocab_size: int, bytes_per_element: int) -> int:
    return 2 * n * T * (U + 1) * vocab_size * bytes_per_element


def chunk_bytes(n: int, T: int, U: int, vocab_size: int, bytes_per_element: int = 4) -> int:
    """Estimated bytes of one joiner/loss call: logits (n, T, U+1, V) and their gradient."""
    return _chunk_bytes(_count("n", n, 0), _count("T", T, 0), _count("U", U, 0),
                        _count("vocab_size", vocab_size, 1),
                        _count("bytes_per_element", bytes_per_element, 1))


def plan_chunks(enc_lengths: Sequence[int], target_lengths: Sequence[int], vocab_size: int,
                max_chunk_bytes: Optional[int] = None,
                bytes_per_element: int = 4) -> List[List[int]]:
    """Group sample indices so that each group's padded logits + gradient fit ``max_chunk_bytes``.

    Samples are sorted longest first by (T_i, U_i) and packed greedily; each group is padded only
    to its own longest member. A sample that alone exceeds the budget forms its own group.
    """
    limit = _check_max_chunk_bytes(max_chunk_bytes)
    limit = DEFAULT_MAX_CHUNK_BYTES if limit is None else limit
    vocab_size = _count("vocab_size", vocab_size, 1)
    bytes_per_element = _count("bytes_per_element", bytes_per_element, 1)
    T, U = [], []
    for name, seq, out, low in (("enc_lengths", enc_lengths, T, 1),
                                ("target_lengths", target_lengths, U, 0)):
        if isinstance(seq, torch.Tensor):
            if seq.dim() != 1 or seq.is_floating_point() or seq.is_complex():
                raise TypeError(f"{name} must be a sequence of ints (or a 1-D integer tensor), "
                                f"got a tensor of shape {tuple(seq.shape)} and dtype {seq.dtype}")
            seq = seq.tolist()
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__"):
            raise TypeError(f"{name} must be a sequence of ints, got {type(seq).__name__}")
        out.extend(_count(f"{name}[{i}]", v, low) for i, v in enumerate(seq))
    if len(T) != len(U):
        raise ValueError(f"enc_lengths and target_lengths must have the same length, got "
                         f"{len(T)} and {len(U)}")
    order = sorted(range(len(T)), key=lambda i: (T[i], U[i]), reverse=True)
    chunks: List[List[int]] = []
    cur: List[int] = []
    t_max = u_max = 0
    for i in order:
        t2, u2 = max(t_max, T[i]), max(u_max, U[i])
        if cur and _chunk_bytes(len(cur) + 1, t2, u2, vocab_size, bytes_per_element) > limit:
            chunks.append(cur)
            cur, t2, u2 = [], T[i], U[i]
        cur.append(i)
        t_max, u_max = t2, u2
    if cur:
        chunks.append(cur)
    return chunks



def samplewise_rnnt_loss(joiner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         enc_out: torch.Tensor, pred_out: torch.Tensor, targets: torch.Tensor,
                         enc_lengths: torch.Tensor, target_lengths: torch.Tensor, blank: int = 0,
                         reduction: str = "mean", max_chunk_bytes: Optional[int] = None,
                         accumulate_joiner_grads: bool = False,
                         stats: Optional[Dict] = None) -> torch.Tensor:
    """RNN-T loss that never builds the batch's (B, T, U+1, V) tensor (Braun et al. 2022).

    Args:
        joiner: module (or function) mapping enc_out (N, T, H_enc) and pred_out (N, U+1, H_pred)
            to logits (N, T, U+1, V).
        enc_out: (B, T, H_enc) encoder output; pred_out: (B, U+1, H_pred) predictor output.
        targets (B, U), enc_lengths (B,), target_lengths (B,): as in :func:`rnnt_loss_batched`.
        max_chunk_bytes: budget of one joiner/loss call, estimated as the logits + their gradient
            (:func:`chunk_bytes`; the joiner's hidden activations come on top). Short utterances
            are grouped up to this budget so they run in parallel. None -> 64 MiB; ``math.inf``
            -> no limit (one call for the whole batch); NaN, bool and values < 1 are refused.
        accumulate_joiner_grads: see "Joiner gradients" below.
        stats: optional dict, filled with "chunks" (the sample indices of each call),
            "chunk_shapes" ((N, T, U+1) of each call) and, when gradients are computed,
            "in_place" (per call: whether the gradient overwrote the logits) -- for tests and
            teaching.

    How it works. Samples are sorted by length and grouped (:func:`plan_chunks`). For each group,
    only its valid T_i x (U_i+1) region (padded to the group's longest member) goes through the
    joiner. One pass over those logits gives the log-normaliser and the log-probabilities of
    blank and of the next token at every cell (the paper's "function merging"); the alpha/beta
    recursions run on the small T x (U+1) lattice; and d loss / d logits, in closed form, is
    written over the logits themselves (``memlab._lattice``; a C kernel on CPU, torch elsewhere).
    That gradient is immediately back-propagated through the joiner, and only the gradients
    w.r.t. the group's enc_out and pred_out slices (small: no V axis) are kept. The returned loss
    is attached to the graph by a custom autograd Function whose backward sends grad_output times
    those stored gradients into the encoder and the predictor. So the peak holds one group's
    logits, never B; the gradient takes a second buffer as large only when the joiner's graph
    saved its output (e.g. a joiner ending in tanh), which :func:`chunk_bytes` budgets for. The
    joiner's output tensor is overwritten: a joiner must not keep a reference to it for later.

    Joiner gradients. The joiner's parameter gradients are also computed during this call.
    By default (``accumulate_joiner_grads=False``) they are kept in a buffer of the parameters'
    size and delivered by the same Function in backward, scaled by grad_output: ``loss.backward()``
    then behaves like any loss (nothing reaches ``.grad`` until backward; loss scaling works;
    ``backward(retain_graph=True)`` twice adds twice, like autograd; a second backward without
    retain_graph raises autograd's usual error). With ``accumulate_joiner_grads=True`` (the paper's
    scheme; saves that buffer) they are added to ``param.grad`` *during this call*: calling the
    loss twice before one backward double counts, they are accumulated even if backward is never
    called (e.g. an evaluation pass with grad mode on), and grad_output != 1 (loss scaling) does
    not reach them (a warning says so). Call ``backward()`` exactly once per call, like a normal
    loss.

    Under ``torch.no_grad()``, or when neither the inputs nor the joiner require grad, only the
    loss is computed. reduction="none" returns per-sample losses whose backward weights are known
    only in backward, so there the joiner and the loss are recomputed in backward (about twice the
    joiner compute; same memory), replaying the CPU/CUDA RNG state of the forward so that dropout
    draws the same masks; ``accumulate_joiner_grads`` must then be False.
    """
    _check_tensor("enc_out", enc_out, 3, "float")
    _check_tensor("pred_out", pred_out, 3, "float")
    if not callable(joiner):
        raise TypeError(f"joiner must be callable (an nn.Module), got {type(joiner).__name__}")
    B, T, _ = enc_out.shape
    if pred_out.device != enc_out.device:
        raise ValueError(f"pred_out must be on the same device as enc_out ({enc_out.device}), "
                         f"got {pred_out.device}")
    if pred_out.dtype != enc_out.dtype:
        raise TypeError(f"pred_out must have enc_out's dtype ({enc_out.dtype}), got "
                        f"{pred_out.dtype}")
    if pred_out.shape[0] != B:
        raise ValueError(f"pred_out must have batch size {B} (enc_out's), got shape "
                         f"{tuple(pred_out.shape)}")
    if pred_out.shape[1] < 1:
        raise ValueError(f"pred_out must have U+1 >= 1 positions in dim 1 (B, U+1, H_pred), got "
                         f"shape {tuple(pred_out.shape)}")
    if not isinstance(accumulate_joiner_grads, bool):
        raise TypeError(f"accumulate_joiner_grads must be a bool, got {accumulate_joiner_grads!r}")
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict or None, got {type(stats).__name__}")
    _check_common(B, T, pred_out.shape[1] - 1, targets, enc_lengths, target_lengths, blank,
                  reduction, enc_out.device, "enc_lengths", None)
    max_chunk_bytes = _check_max_chunk_bytes(max_chunk_bytes)

    # vocabulary size and element size from a 1 x 1 x 1 probe of the joiner
    e1, p1 = enc_out[:1, :1].detach(), pred_out[:1, :1].detach()             # (1, 1, H)
    try:
        with torch.no_grad():
            probe = joiner(e1, p1)                                             # (1, 1, 1, V)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError) as e:   # e.g. H does not fit the joiner
        raise ValueError(f"joiner could not be applied to enc_out {tuple(enc_out.shape)} and "
                         f"pred_out {tuple(pred_out.shape)} (probed on (1, 1, H) slices "
                         f"{tuple(e1.shape)} and {tuple(p1.shape)}): {type(e).__name__}: {e}") from e
    if not isinstance(probe, torch.Tensor):
        raise TypeError(f"joiner must return a tensor of logits, got {type(probe).__name__}")
    if probe.dim() != 4:
        raise ValueError(f"joiner must return 4-D logits (N, T, U+1, V), got shape {tuple(probe.shape)}")
    if not probe.is_floating_point():
        raise TypeError(f"joiner must return floating-point logits, got dtype {probe.dtype}")
    if probe.device != enc_out.device:
        raise ValueError(f"joiner must return logits on enc_out's device ({enc_out.device}), "
                         f"got {probe.device}")
    V = probe.shape[-1]
    if not 0 <= blank < V:
        raise ValueError(f"blank must lie in [0, V={V}), got {blank}")
    _check_target_values(targets, target_lengths, blank, V)
    chunks = plan_chunks(enc_lengths.tolist(), target_lengths.tolist(), V, max_chunk_bytes,
                         probe.element_size())

    params = _joiner_params(joiner)
    want_enc, want_pred = enc_out.requires_grad, pred_out.requires_grad
    need_grad = torch.is_grad_enabled() and (want_enc or want_pred or bool(params))
    args = (joiner, enc_out, pred_out, targets, enc_lengths, target_lengths, blank, chunks)
    if not need_grad:
        losses, _, _, _ = _run_chunks(*args, None, False, False, [], stats)
        return _reduce(losses, reduction)

    if reduction == "none":
        if accumulate_joiner_grads:
            raise ValueError("accumulate_joiner_grads=True needs reduction 'mean' or 'sum' (with "
                             "'none' the per-sample weights are known only in backward), got 'none'")
        rng = _capture_rng(enc_out.device)    # backward replays it: same dropout masks
        losses, _, _, _ = _run_chunks(*args, None, False, False, [], stats)
        def rerun(enc, pred, w, want_enc, want_pred, ps):
            return _run_chunks(joiner, enc, pred, targets, enc_lengths, target_lengths, blank,
                               chunks, w, want_enc, want_pred, ps, None)[1:]
        return _RecomputeLoss.apply(losses, (rerun, rng), enc_out, pred_out, *params)

    scale = 1.0 / B if reduction == "mean" else 1.0
    weights = torch.full((B,), scale, dtype=torch.float64, device=enc_out.device)   # (B,)
    losses, enc_grad, pred_grad, param_grads = _run_chunks(*args, weights, want_enc, want_pred,
                                                           params, stats)
    value = _reduce(losses, reduction)
    if accumulate_joiner_grads:
        with torch.no_grad():
            for p, g in zip(params, param_grads):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad += g
        return _EagerJoinerLoss.apply(value, (enc_grad, pred_grad, []), enc_out, pred_out)
    return _StoredGradLoss.apply(value, (enc_grad, pred_grad, param_grads), enc_out, pred_out,
                                 *params)
