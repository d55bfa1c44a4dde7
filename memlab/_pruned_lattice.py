"""The bare transducer lattice of memlab.pruned: losses and their gradients (occupations) from
px (B, T, U) and py (B, T, U+1) log-probabilities by the alpha-beta recursions, in C on CPU
(memlab._lattice_kernel, float64) and in torch ops elsewhere (one step per anti-diagonal)."""

from __future__ import annotations

from typing import Tuple

import torch
from torch.autograd.function import once_differentiable

_INF = float("inf")


def _skew(x: torch.Tensor, N: int) -> torch.Tensor:
    """(B, T, C) -> (B, N, C) with out[:, n, u] = x[:, n - u, u] (-inf where n - u is off range)."""
    B, T, C = x.shape
    n = torch.arange(N, device=x.device)[:, None]                                 # (N, 1)
    u = torch.arange(C, device=x.device)[None, :]                                 # (1, C)
    t = n - u                                                                     # (N, C)
    ok = (t >= 0) & (t < T)
    return x[:, t.clamp(0, T - 1), u.expand(N, C)].masked_fill(~ok, -_INF)        # (B, N, C)


def _unskew(xs: torch.Tensor, T: int) -> torch.Tensor:
    """Inverse of _skew: (B, N, C) -> (B, T, C)."""
    C = xs.shape[2]
    t = torch.arange(T, device=xs.device)[:, None]                                # (T, 1)
    u = torch.arange(C, device=xs.device)[None, :]                                # (1, C)
    return xs[:, t + u, u.expand(T, C)]                                           # (B, T, C)


@torch.no_grad()
def lattice_forward_backward(px: torch.Tensor, py: torch.Tensor, enc_lengths: torch.Tensor,
                             target_lengths: torch.Tensor
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Losses of a transducer lattice and their gradients, by the alpha-beta recursions.

    px (B, T, U): log-prob of emitting y_{u+1} from (t, u); py (B, T, U+1): log-prob of blank
    from (t, u); -inf marks a missing arc. Returns (losses (B,), d loss_b / d px, d loss_b / d py);
    -(the gradients) are the arcs' occupation probabilities. Computed in px's dtype (use float32
    or float64). On CPU the C kernel of memlab._lattice_kernel runs it in float64 (float32
    gradients at most 1e-30 become 0); elsewhere one Python step per anti-diagonal, each on
    (B, U+1) tensors: no V axis anywhere.
    """
    from memlab import _lattice_kernel
    fast = _lattice_kernel.lattice(px, py, enc_lengths, target_lengths)  # C (float64 inside)
    if fast is None:
        return _lattice_torch(px, py, enc_lengths, target_lengths)
    return fast


def _lattice_torch(px, py, enc_lengths, target_lengths):
    """:func:`lattice_forward_backward` in torch ops (CUDA, fake tensors, no C compiler)."""
    B, T, U1 = py.shape
    U = U1 - 1
    N = T + U                                                                     # diagonals
    dev, dt = py.device, py.dtype
    pxs, pys = _skew(px, N), _skew(py, N)                                         # (B, N, U), (B, N, U+1)
    ninf = torch.full((B, 1), -_INF, dtype=dt, device=dev)                        # (B, 1)
    alpha = torch.empty(B, N, U1, dtype=dt, device=dev)                           # (B, N, U+1)
    a = torch.full((B, U1), -_INF, dtype=dt, device=dev)
    a[:, 0] = 0.0
    alpha[:, 0] = a
    for n in range(1, N):
        stay = a + pys[:, n - 1]                                                  # blank: (t-1,u) -> (t,u)
        move = torch.cat([ninf, a[:, :U] + pxs[:, n - 1]], dim=1)                 # emit: (t,u-1) -> (t,u)
        a = torch.logaddexp(stay, move)                                           # (B, U+1)
        alpha[:, n] = a
    b_idx = torch.arange(B, device=dev)
    Tb, Ub = enc_lengths.long().to(dev), target_lengths.long().to(dev)
    n_end = Tb - 1 + Ub                                                           # (B,) last cell's diagonal
    py_end = py[b_idx, Tb - 1, Ub]                                                # (B,) the final blank
    log_z = alpha[b_idx, n_end, Ub] + py_end                                      # (B,)

    beta = torch.empty(B, N + 1, U1, dtype=dt, device=dev)                        # (B, N+1, U+1)
    beta[:, N] = -_INF
    last = torch.arange(U1, device=dev)[None, :] == Ub[:, None]                   # (B, U+1) column U_b
    bt = beta[:, N]
    for n in range(N - 1, -1, -1):
        stay = bt + pys[:, n]                                                     # blank to (t+1, u)
        move = torch.cat([bt[:, 1:] + pxs[:, n], ninf], dim=1)                    # emit to (t, u+1)
        bt = torch.logaddexp(stay, move)                                          # (B, U+1)
        bt = torch.where(last & (n_end == n)[:, None], py_end[:, None], bt)       # seed (T_b-1, U_b)
        beta[:, n] = bt
    lz = log_z[:, None, None]
    occ_y = torch.exp(alpha + pys + beta[:, 1:] - lz)                             # (B, N, U+1)
    occ_y[b_idx, n_end, Ub] = torch.exp(alpha[b_idx, n_end, Ub] + py_end - log_z)  # final blank (= 1)
    occ_x = torch.exp(alpha[:, :, :U] + pxs + beta[:, 1:, 1:] - lz)               # (B, N, U)
    return -log_z, -_unskew(occ_x, T), -_unskew(occ_y, T)


class _StoredLattice(torch.autograd.Function):
    """losses (B,) attached to px, py; backward = grad_output[b] * the stored gradients."""

    @staticmethod
    def forward(ctx, px, py, losses, grad_px, grad_py):
        ctx.save_for_backward(grad_px, grad_py)
        return losses.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        gx, gy = ctx.saved_tensors
        w = grad_output[:, None, None]
        return (gx * w).to(gx.dtype), (gy * w).to(gy.dtype), None, None, None


def lattice_loss(px: torch.Tensor, py: torch.Tensor, enc_lengths: torch.Tensor,
                 target_lengths: torch.Tensor):
    """Per-sample losses (B,) of a lattice, differentiable in px and py; also returns the
    (detached) gradients d loss / d px and d loss / d py that the bounds are computed from."""
    losses, gx, gy = lattice_forward_backward(px.detach(), py.detach(), enc_lengths, target_lengths)
    if px.requires_grad or py.requires_grad:
        losses = _StoredLattice.apply(px, py, losses, gx, gy)
    return losses, gx, gy


