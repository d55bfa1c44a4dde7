"""Low-rank gradients for Adam: the gradient (and Adam state) of each big weight matrix lives in
rank-r factors instead of a full m x n tensor.

References:
- M. Gooneratne, K. C. Sim, P. Zadrazil, A. Kabel, F. Beaufays, G. Motta, "Low-rank Gradient
  Approximation for Memory-Efficient On-device Training of Deep Neural Network", ICASSP 2020,
  arXiv 2001.08885: the low-rank parameterisation is used only as a vehicle for the gradient and
  is folded back into the full weight; -33% training memory for Adam, 4.5% rel. lower WER than
  momentum on ASR personalization.
- E. Hu et al., "LoRA", arXiv 2106.09685: W + A @ B with A = 0 at the start, so training starts
  from the unchanged model.
- J. Zhao et al., "GaLore", arXiv 2403.03507: the projection variant (proj="svd"): full gradient,
  Adam moments in the span of the top-r singular vectors of the gradient.

How it works (factor variant, the default)
------------------------------------------
Every selected weight W (m x n; a conv kernel is viewed as out x in*k, an LSTM's weight_ih_l0 /
weight_hh_l0 / ... and nn.MultiheadAttention's packed (3d x d) in_proj_weight as they are, any
other bare nn.Parameter with two or more dimensions as shape[0] x rest) is frozen and gets two
factors, so the module computes with

    W_eff = W + A @ B          A: (m, r) zeros at the start, B: (r, n) random, both trained

The gradient reaches A and B only (grad_A = G B^T, grad_B = A^T G with G = dL/dW_eff), so the
persistent gradient and the Adam moments are r*(m+n) numbers instead of m*n. Every `merge_every`
steps the product is folded into W (W += A @ B), A restarts at zero, B is re-drawn and the factors'
Adam state is reset: over many merges the sum of rank-r pieces is a full-rank change of W.
B is drawn with orthonormal rows scaled by sqrt(n / r) (entries of variance 1/r), so that an
Adam step on A moves W_eff by about lr per entry, like Adam on W: the same lr works for both.

rank = "full" (r >= min(m, n)): one factor is the identity and only the other one trains
(B = I and A is m x n when n <= m, else A = I and B is m x n). Then grad_A = G exactly, so this is
Adam on W, step for step (a merge keeps the Adam state: the coordinates do not change). Tests pin
this against torch.optim.Adam.

Two ways to attach the factors (`attach=`):
- "hook" (auto for nn.Linear, nn.Conv1d/2d/3d with groups=1): a forward hook adds a side path
  y = x W^T + (x B^T) A^T (for a conv: conv(x, B as r kernels) then a 1x1 conv with A). No m x n
  tensor besides W exists in forward or backward: no W_eff, no dL/dW_eff. The extra activation is
  the r-channel h = x B^T. Caveat: `module.weight` is W without the pending A @ B; code that reads
  `.weight` directly instead of calling the module must use attach="parametrize" (or merge() first).
  (nn.TransformerEncoderLayer checks for hooks and then skips its fused inference path.)
- "parametrize" (auto for nn.LSTM, grouped convs, subclasses such as MultiheadAttention's
  out_proj, and bare weight parameters such as MultiheadAttention's in_proj_weight, or
  q/k/v_proj_weight when kdim/vdim differ): torch.nn.utils.parametrize makes
  `module.weight_ih_l0` / `module.in_proj_weight` compute W + A @ B on access.
  Works with anything, but W_eff (m x n) is built on every forward and kept for backward, and
  autograd makes a transient m x n dL/dW_eff per layer in backward (freed once grad_A, grad_B are
  formed). nn.LSTM re-reads its parametrized weights on every forward (RNNBase notices the new
  tensors and rebuilds `_flat_weights`; on CUDA flatten_parameters() copies them into one cuDNN
  buffer as usual); a forward hook drops the LSTM's own reference to the last W_eff, so it is
  freed with the graph after backward instead of living on until the next forward.
  nn.MultiheadAttention reads `in_proj_weight` a few times per forward (its fast-path checks
  look at it before the real use), so W + A @ B is formed two or three times per call; the
  extra ones are dropped at once (compute r m n each, no memory kept). In eval mode without
  grad the fused fast path still runs (it gets W + A @ B as a plain tensor), need_weights works
  as usual, and remove() gives back a plain nn.MultiheadAttention.

Projection variant (proj="svd", GaLore-style, for comparison)
-------------------------------------------------------------
W is not frozen: autograd computes the full gradient G (m x n). On the shorter side d = min(m, n)
the top-r singular vectors P (d x r) of G are computed every `merge_every` steps (the projection
update period); Adam's moments are of the projected gradient R = P^T G (r x n; or G P, m x r, for a
tall matrix) and the update is P @ direction. The moments are kept across projection updates (as
GaLore does). With r >= d, P = I and it is exactly Adam.

What each variant keeps between steps for one m x n weight (fp32 numbers; m <= n for svd):

    torch Adam:     W, grad m n, exp_avg m n, exp_avg_sq m n              = 4 m n
    factor variant: W (frozen); A, B; grad_A, grad_B; 2 x Adam state of A, B
                    (no full-size gradient, no full-size state)         = m n + 4 r (m + n)
    svd variant:    W, grad G m n, P m r, exp_avg + exp_avg_sq 2 r n     = 2 m n + r m + 2 r n

Within a step, attach="parametrize" adds W_eff (m n, kept from forward to backward) and a
transient dL/dW_eff (m n); attach="hook" adds only the r-channel side activation. The svd variant
makes temporaries for the SVD every `merge_every` steps. tests/test_lowrank.py pins these numbers
against the storages of .grad and optimizer.state and against memlab.memory.MemoryMeter.

Devices and precision: the factors are created on the weight's device, in fp32 (fp64 for an fp64
weight) whatever the weight's dtype; under autocast they stay fp32 parameters and are cast per op.
Merges add A @ B into W in W's dtype.

Wrapping the model
------------------
Constructing the optimizer modifies `model` in place: the selected weights get
requires_grad=False, and the factors become parameters of the model (named
`<module>.lowrank_<weight>.A/.B` for hooks, `<module>.parametrizations.<weight>.0.A/.B` for
parametrize), so `model.parameters()` and `model.state_dict()` include them afterwards. To resume
training, save `model.state_dict()` and `optimizer.state_dict()` as they are, and load them into a
model wrapped the same way (build the optimizer first, then load both). For a plain checkpoint,
call `optimizer.remove()` first: it folds the factors into W, takes the factors and hooks away and
restores requires_grad, leaving ordinary modules (the optimizer cannot step after that).
`optimizer.merge()` folds the current factors into W without unwrapping (after it, `module.weight`
is the effective weight also with attach="hook").

Where the code lives: the factors, their two ways of attaching and the choice of weights
(``LowRankDelta``, ``_SideHook``, ``_Target``, ``_select``) are in ``memlab._lowrank_factors``
and re-exported here; this module holds the optimizer and its checkpoints.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from memlab._lowrank_factors import (_CONVS, LowRankDelta, _release_lstm_weights, _select,
                                     _SideHook, _Target)


# ----------------------------------------------------------------------------- the math
def adam_direction(grad, exp_avg, exp_avg_sq, step, beta1, beta2, eps, out=None):
    """Update the Adam moments in place and return the step direction m_hat / (sqrt(v_hat) + eps).

    The same arithmetic as torch.optim.Adam (without amsgrad/maximize): param -= lr * direction.
    out: a buffer shaped like grad to hold the direction (then nothing is allocated).
    """
    exp_avg.lerp_(grad, 1 - beta1)                                      # (same shape as grad)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = torch.sqrt(exp_avg_sq, out=out) if out is not None else exp_avg_sq.sqrt()
    denom.div_(math.sqrt(1 - beta2 ** step)).add_(eps)
    return torch.div(exp_avg, denom, out=denom).div_(1 - beta1 ** step)  # reuses denom's memory

# ----------------------------------------------------------------------------- the optimizer
class LowRankAdam(torch.optim.Optimizer):
    """Adam whose gradients and state for big weight matrices live in rank-r factors.

    Args:
        model: the nn.Module to train; it is modified in place (see the module docstring).
        lr, betas, eps, weight_decay: as torch.optim.Adam (L2 weight decay; for a factored weight
            the decay is the exact gradient of wd/2 * ||W + A B||^2 w.r.t. A and B).
        rank: r. r >= min(m, n) for a weight means "full": exactly Adam on that weight.
        merge_every: steps between folds of A @ B into W (svd: between projection updates).
        modules: None -> every weight matrix with numel >= min_size: Linear/Conv1d/2d/3d/LSTM
            weights and any module's own parameters of 2+ dimensions (MultiheadAttention's
            in_proj_weight, a custom module's bare nn.Parameter); embedding tables are left out.
            Or a list of fnmatch patterns on module names ("encoder.*") and/or module types
            (nn.LSTM, nn.MultiheadAttention: its own in_proj_weight; its out_proj is a Linear
            child, named "<...>.out_proj"); min_size still applies (pass min_size=0 to adapt
            small ones too).
            Frozen weights (requires_grad=False), weights already parametrized, weights
            shared by several modules (tied) and non-contiguous (channels_last) weights are never
            adapted.
        min_size: smallest weight (numel) to adapt; smaller tensors, biases and norms train with
            ordinary Adam in the same optimizer.
        proj: None (factors) or "svd" (GaLore-style projection of the full gradient).
        attach: "auto", "hook" (Linear/Conv with groups=1 only) or "parametrize".
        seed: seed of the optimizer's own generator for B (None: drawn from torch's global RNG).
        other_lr: lr of the plain-Adam group (param_groups[1]: biases, norms, embeddings,
            weights below min_size); None: lr. The factors usually want a larger lr than Adam on
            full tensors (a rank-r step moves W in r directions only), while the plain group is
            ordinary Adam: give it the lr that suits Adam on the same model.

    param_groups[0] holds the low-rank parameters (factors, or the projected weights for
    proj="svd"; "lowrank": True), param_groups[1] everything else; either is left out if empty.
    """

    def __init__(self, model: nn.Module, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, rank=4, merge_every=100, modules=None, min_size=4096,
                 proj=None, attach="auto", seed=None, other_lr=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, v, lo in (("rank", rank, 1), ("merge_every", merge_every, 1),
                            ("min_size", min_size, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        _check_hyper(lr, betas, eps, weight_decay)
        _check_hyper(lr if other_lr is None else other_lr, betas, eps, weight_decay, "other_lr")
        if proj not in (None, "svd"):
            raise ValueError(f"proj must be None or 'svd', got {proj!r}")
        if attach not in ("auto", "hook", "parametrize"):
            raise ValueError(f"attach must be 'auto', 'hook' or 'parametrize', got {attach!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        if any(isinstance(m, LowRankDelta) for m in model.modules()):
            raise ValueError("model is already wrapped by a LowRankAdam; call remove() on that "
                             "optimizer first")

        self.rank, self.merge_every, self.proj = rank, merge_every, proj
        self._generator = torch.Generator()
        self._generator.manual_seed(_draw_seed() if seed is None else seed)
        self._steps = 0
        self._removed = False
        self._targets: list[_Target] = []
        self._roles: dict = {}          # param -> (target, role in {"A", "B", "W"})
        self._lstm_hooks = {}

        selected = _select(model, modules, min_size)
        if not selected:
            warnings.warn(f"LowRankAdam: no weight matrix selected (min_size={min_size}, "
                          f"modules={modules!r}); it runs as plain Adam", stacklevel=2)
        for qual, mod, name in selected:
            w = getattr(mod, name)
            t = _Target(mod, name, f"{qual}.{name}" if qual else name, w.requires_grad)
            if proj is None:
                self._attach(t, attach)
                for role, p in (("A", t.factors.A), ("B", t.factors.B)):
                    if p is not None:
                        self._roles[p] = (t, role)
            else:
                self._roles[w] = (t, "W")
            self._targets.append(t)

        lowrank = list(self._roles)
        chosen = set(lowrank)
        other = [p for p in model.parameters() if p.requires_grad and p not in chosen]
        plain = {"params": other, "lowrank": False}
        if other_lr is not None:
            plain["lr"] = other_lr
        groups = [g for g in ({"params": lowrank, "lowrank": True}, plain) if g["params"]]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)

    # ------------------------------------------------------------------ attaching
    def _attach(self, t: _Target, attach):
        mod, w = t.module, t.weight
        hookable = type(mod) is nn.Linear or (type(mod) in _CONVS and mod.groups == 1)
        how = ("hook" if hookable else "parametrize") if attach == "auto" else attach
        if how == "hook" and not hookable:
            raise ValueError(f"attach='hook' supports nn.Linear and nn.Conv1d/2d/3d with groups=1; "
                             f"{t.qualname} is {type(mod).__name__}; use attach='parametrize'")
        dtype = w.dtype if w.dtype == torch.float64 else torch.float32
        f = LowRankDelta(w.shape, self.rank, device=w.device, dtype=dtype,
                         generator=self._generator)
        t.factors, t.attach = f, how
        w.requires_grad_(False)
        if how == "hook":
            mod.add_module(f"lowrank_{t.name}", f)
            t.handles.append(mod.register_forward_hook(_SideHook(t.name)))
        else:
            parametrize.register_parametrization(mod, t.name, f)
            if isinstance(mod, nn.RNNBase) and mod not in self._lstm_hooks:
                self._lstm_hooks[mod] = mod.register_forward_hook(_release_lstm_weights)

    # ------------------------------------------------------------------ merge / remove
    @torch.no_grad()
    def merge(self):
        """Fold A @ B into W; restart the factors (A = 0, B re-drawn, their Adam state reset).

        With a full-rank target the single factor is folded and zeroed and its Adam state kept
        (the coordinates do not change). W_eff is unchanged by a merge. No-op for proj="svd".
        All or nothing: the new B's and any buffer are made before the first write.
        """
        self._check_live()
        self._merge_apply(self._merge_prepare())

    def _merge_prepare(self):
        """Everything a merge allocates (new B's drawn with a copy of the generator, buffers for
        mixed-dtype products); changes nothing."""
        gen = torch.Generator()
        gen.set_state(self._generator.get_state())
        new_b, sizes = {}, {}
        for t in self._targets:
            f = t.factors
            if f is None:
                continue
            W = t.matrix()
            if W.dtype != f.trained()[0].dtype:
                key = (f.trained()[0].dtype, W.dtype, W.device)
                sizes[key] = max(sizes.get(key, 0), W.numel())
            if not f.full:
                new_b[t] = f.draw(gen).to(f.B.dtype)                        # (r, n)
        bufs = {k: (torch.empty(n, dtype=k[0], device=k[2]), torch.empty(n, dtype=k[1],
                                                                        device=k[2]))
                for k, n in sizes.items()}
        return gen, new_b, bufs

    def _merge_apply(self, prepared):
        gen, new_b, bufs = prepared
        for t in self._targets:
            f = t.factors
            if f is None:
                continue
            W = t.matrix()                                                   # (m, n)
            if W.dtype != f.trained()[0].dtype:                              # as .to(W.dtype)
                lo, hi = bufs[(f.trained()[0].dtype, W.dtype, W.device)]
                prod = lo[:W.numel()].view(W.shape)                          # (m, n)
                if f.full:
                    prod.copy_(f.delta().view(W.shape))
                else:
                    torch.mm(f.A, f.B, out=prod)
                W.add_(hi[:W.numel()].view(W.shape).copy_(prod))
            elif f.full:
                W.add_(f.delta().view(W.shape))
            else:
                W.addmm_(f.A, f.B)                                           # no m x n temporary
            if f.full:
                f.trained()[0].zero_()
                continue
            f.A.zero_()
            f.B.copy_(new_b[t])
            for p in f.trained():
                self.state.pop(p, None)
        self._generator.set_state(gen.get_state())

    @torch.no_grad()
    def remove(self):
        """merge(), then take the factors and hooks away: plain modules, requires_grad restored.

        The optimizer cannot step afterwards; build a new one to keep training.
        """
        self.merge()
        for t in self._targets:
            weight = t.weight
            if t.attach == "hook":
                for h in t.handles:
                    h.remove()
                delattr(t.module, f"lowrank_{t.name}")
            elif t.attach == "parametrize":
                parametrize.remove_parametrizations(t.module, t.name, leave_parametrized=False)
            weight.requires_grad_(t.requires_grad)
            t.handles.clear()
        for rnn, h in self._lstm_hooks.items():
            h.remove()
            rnn._init_flat_weights()                 # point _flat_weights at the plain weights
        self._lstm_hooks.clear()
        self._removed = True

    def _check_live(self):
        if self._removed:
            raise RuntimeError("LowRankAdam.remove() was called; this optimizer cannot be used "
                               "any more (build a new optimizer for the plain model)")

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def _factor_decay(self, wd):
        """{factor: wd * d/dfactor (1/2 ||W + A B||^2)} computed before any factor moves."""
        out = {}
        for t in self._targets:
            f = t.factors
            if f is None or all(p.grad is None for p in f.trained()):
                continue
            W = t.matrix().to(f.trained()[0].dtype)                          # (m, n)
            if f.full:
                out[f.trained()[0]] = (W + f.delta()).mul_(wd)              # (m, n)
            else:
                out[f.A] = (W @ f.B.T + f.A @ (f.B @ f.B.T)).mul_(wd)       # (m, r)
                out[f.B] = (f.A.T @ W + (f.A.T @ f.A) @ f.B).mul_(wd)       # (r, n)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        """One step; all or nothing. Phase 1 (may fail, changes nothing) checks the gradients,
        makes the missing states, the weight-decay terms, the svd projections and projected
        gradients, the B's of a due merge (with a copy of the generator) and one workspace per
        dtype for the Adam directions; phase 2 writes and allocates nothing. Cost: the svd
        variant keeps every projected gradient (r x n each) and new projection at once instead
        of one at a time; a merge step holds the new B's (the size of the B factors) at once;
        the workspaces replace per-tensor temporaries of the same size (peak no higher)."""
        self._check_live()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        refresh = self._steps % self.merge_every == 0       # svd: new projection this step
        plan, sizes = [], {}
        for group in self.param_groups:
            wd = group["weight_decay"]
            decay = self._factor_decay(wd) if (wd and group.get("lowrank")) else {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LowRankAdam does not support sparse gradients")
                target, role = self._roles.get(p, (None, None))
                if role == "W" and self.proj == "svd":
                    entry = self._svd_plan(p, group, refresh)
                else:
                    staged = {}
                    if not self.state.get(p):
                        staged = {"step": 0, "exp_avg": torch.zeros_like(
                            p, memory_format=torch.preserve_format), "exp_avg_sq":
                            torch.zeros_like(p, memory_format=torch.preserve_format)}
                    if p in decay:
                        grad = decay[p].add_(p.grad)                # = grad + decay, in place
                    elif wd and role is None:
                        grad = ("wd", p.grad, p, wd)               # into a workspace in phase 2
                    else:
                        grad = p.grad
                    entry = ("plain", p, group, staged, grad, p.shape, None)
                plan.append(entry)
                key = (p.dtype, p.device)
                n = math.prod(entry[5])
                sizes[key] = max(sizes.get(key, 0), n)
                if isinstance(entry[4], tuple):
                    sizes[key + ("wd",)] = max(sizes.get(key + ("wd",), 0), n)
        merging = self.proj is None and (self._steps + 1) % self.merge_every == 0
        merge = self._merge_prepare() if merging else None
        work = {k: torch.empty(n, dtype=k[0], device=k[1]) for k, n in sizes.items()}
        # ---- phase 2: commit (no allocation from here on)
        for kind, p, group, staged, grad, shape, svd in plan:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            state = self.state[p]
            state.update(staged)
            if isinstance(grad, tuple):
                _, g, w, wd = grad
                buf = work[(p.dtype, p.device, "wd")][:g.numel()].view(g.shape)
                grad = torch.add(g, w, alpha=wd, out=buf)
            if svd is not None and svd.get("P") is not None:
                state["P"] = svd["P"]
            state["step"] += 1
            out = work[(p.dtype, p.device)][:math.prod(shape)].view(shape)
            d = adam_direction(grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                               beta1, beta2, eps, out=out)
            if kind == "plain":
                p.add_(d, alpha=-lr)
                continue
            W = p.view(p.shape[0], -1)                                      # (m, n)
            if svd["full"]:
                W.add_(d, alpha=-lr)                                         # (m, n)
            elif svd["left"]:
                W.addmm_(state["P"], d, alpha=-lr)                           # W -= lr P d
            else:
                W.addmm_(d, state["P"].T, alpha=-lr)                         # W -= lr d P^T
        self._steps += 1
        if merge is not None:
            self._merge_apply(merge)
        return loss

    def _svd_plan(self, p, group, refresh):
        """Phase 1 of the svd step of one weight: new state, projection P and projected
        gradient R (all allocated here)."""
        wd = group["weight_decay"]
        W = p.view(p.shape[0], -1)                                          # (m, n)
        G = p.grad.view(p.shape[0], -1)                                     # (m, n)
        m, n = W.shape
        r = min(self.rank, m, n)
        full, left = r == min(m, n), m <= n
        old = self.state.get(p) or {}
        shape = (m, n) if full else ((r, n) if left else (m, r))
        staged = {}
        if not old:
            staged = {"step": 0, "exp_avg": torch.zeros(shape, device=p.device, dtype=p.dtype),
                      "exp_avg_sq": torch.zeros(shape, device=p.device, dtype=p.dtype)}
        P = old.get("P")
        new_P = None
        if not full and (refresh or P is None):
            u, _, vh = torch.linalg.svd(G.float(), full_matrices=False)     # (m, k), (k, n)
            P = new_P = (u[:, :r] if left else vh[:r].T).to(p.dtype).contiguous()  # (d, r)
        if full:
            R = G if not wd else ("wd", G, W, wd)                            # (m, n)
        elif left:
            R = P.T @ G                                                      # (r, n)
            if wd:
                R.add_(P.T @ W, alpha=wd)
        else:
            R = G @ P                                                        # (m, r)
            if wd:
                R.add_(W @ P, alpha=wd)
        return ("svd", p, group, staged, R, shape, {"P": new_P, "full": full, "left": left})

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        sd = super().state_dict()
        sd["lowrank"] = {"steps": self._steps, "generator": self._generator.get_state(),
                         "rank": self.rank, "merge_every": self.merge_every, "proj": self.proj}
        return sd

    def load_state_dict(self, state_dict):
        """Load a LowRankAdam state_dict, checked first: rank/proj, steps and generator, group
        and parameter counts, hyper-parameters and each parameter's state against its shape. A
        mismatch raises a ValueError naming what differs and changes nothing."""
        from collections.abc import Mapping
        if not (isinstance(state_dict, Mapping) and "state" in state_dict
                and "param_groups" in state_dict):
            raise ValueError("state_dict must be a mapping with 'state' and 'param_groups' (from "
                             f"LowRankAdam.state_dict()), got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        extra = state_dict.pop("lowrank", None)
        if not isinstance(extra, Mapping):
            raise ValueError("state_dict is not a LowRankAdam state: it has no 'lowrank' entry "
                             "(steps, generator, rank, proj); a torch.optim.Adam state_dict does "
                             "not describe the factors")
        missing = [k for k in ("steps", "generator", "rank", "proj") if k not in extra]
        if missing:
            raise ValueError(f"state_dict['lowrank'] lacks {', '.join(missing)}")
        if (extra["rank"], extra["proj"]) != (self.rank, self.proj):
            raise ValueError(f"state_dict: saved with rank={extra['rank']}, "
                             f"proj={extra['proj']!r}; this optimizer has rank={self.rank}, "
                             f"proj={self.proj!r}")
        steps = extra["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state_dict['lowrank']['steps'] must be an int >= 0, got {steps!r}")
        gen = torch.Generator()
        try:
            gen.set_state(extra["generator"])
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"state_dict['lowrank']['generator'] is not a CPU generator state "
                             f"({type(e).__name__}: {str(e)[:120]})") from None
        saved, groups = state_dict["state"], state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this LowRankAdam has "
                             f"{len(self.param_groups)}")
        id_map = {}
        for gi, (sg, g) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(sg, Mapping) or not isinstance(sg.get("params"), (list, tuple)):
                raise ValueError(f"state_dict: param_groups[{gi}] must be a dict with a 'params' "
                                 f"list")
            lacking = [k for k in ("lr", "betas", "eps", "weight_decay", "lowrank")
                       if k not in sg]
            if lacking:
                raise ValueError(f"state_dict: param_groups[{gi}] lacks {', '.join(lacking)}")
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"state_dict: param_groups[{gi}] has {len(sg['params'])} "
                                 f"params, this LowRankAdam has {len(g['params'])} there")
            if bool(sg["lowrank"]) != bool(g.get("lowrank")):
                raise ValueError(f"state_dict: param_groups[{gi}] has lowrank={sg['lowrank']!r}, "
                                 f"this LowRankAdam has lowrank={g.get('lowrank')!r} there")
            try:
                _check_hyper(sg["lr"], sg["betas"], sg["eps"], sg["weight_decay"])
            except ValueError as e:
                raise ValueError(f"state_dict: param_groups[{gi}]: {e}") from None
            for pi, (k, p) in enumerate(zip(sg["params"], g["params"])):
                id_map[k] = (gi, pi, p)
        new = {}
        for k, st in saved.items():
            if k not in id_map:
                raise ValueError(f"state_dict: 'state' has an entry for parameter id {k!r}, "
                                 f"which no param group lists")
            gi, pi, p = id_map[k]
            new[p] = self._checked_state(st, p, f"state_dict: param_groups[{gi}] param {pi} "
                                                f"(shape {tuple(p.shape)})")
        super().load_state_dict({**state_dict, "state": {}})
        for p, st in new.items():
            self.state[p] = st
        self._steps = steps
        self._generator.set_state(gen.get_state())

    def _checked_state(self, st, p, where):
        if not isinstance(st, dict):
            raise ValueError(f"{where}: state must be a dict, got {type(st).__name__}")
        if not st:
            return {}
        shape, pshape = tuple(p.shape), None
        if self._roles.get(p, (None, None))[1] == "W" and self.proj == "svd":
            m, n = p.shape[0], math.prod(p.shape[1:])
            r = min(self.rank, m, n)
            full, left = r == min(m, n), m <= n
            shape = (m, n) if full else ((r, n) if left else (m, r))
            pshape = None if full else ((m if left else n), r)
        step = st.get("step")
        val = step.item() if isinstance(step, torch.Tensor) and step.dim() == 0 and \
            not step.is_complex() and step.dtype != torch.bool else step
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) \
                or val < 0 or val != int(val) or (isinstance(step, float)):
            raise ValueError(f"{where}: state 'step' must be an int >= 0 (or a 0-dim tensor "
                             f"holding one), got {step!r}"[:300])
        out = dict(st)
        out["step"] = int(val)
        for key, want in (("exp_avg", shape), ("exp_avg_sq", shape), ("P", pshape)):
            if key == "P" and (pshape is None or key not in st):
                continue
            t = st.get(key)
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()
                    and tuple(t.shape) == want):
                got = (f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                       else repr(t)[:80])
                raise ValueError(f"{where}: state '{key}' must be a float tensor of shape "
                                 f"{want}, got {got}")
            t = t.to(dtype=p.dtype, device=p.device)
            if not (t.is_contiguous() and t.storage_offset() == 0
                    and t.untyped_storage().nbytes() == t.numel() * t.element_size()):
                t = t.clone(memory_format=torch.contiguous_format)
            out[key] = t
        return out

    # ------------------------------------------------------------------ introspection
    def targets(self):
        """[(qualified weight name, (m, n), r, attach)] for the adapted weights."""
        out = []
        for t in self._targets:
            m, n = t.matrix().shape
            out.append((t.qualname, (m, n), min(self.rank, m, n), t.attach or self.proj))
        return out


def _check_hyper(lr, betas, eps, weight_decay, lr_name="lr"):
    """The constructor's checks of one group's numbers (also run on a loaded state_dict)."""
    for name, v in ((lr_name, lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


def _draw_seed() -> int:
    """A seed from torch's global generator (so torch.manual_seed makes runs repeatable),
    drawn with real tensors even inside FakeTensorMode (memlab.memory.estimate)."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover
        return int(torch.randint(2**62, ()))
    with unset_fake_temporarily():
        return int(torch.randint(2**62, (), device="cpu"))
