"""memlab.pruned: the simple loss is the RNN-T loss of the additive joint, a full band gives the
exact RNN-T loss (values and gradients), bounds are feasible, the sample-wise band equals the
batched one, the band saves memory, bad arguments are refused."""

import math

import pytest
import torch

from memlab.pruned import (lattice_forward_backward, lattice_loss, plan_groups, prune_ranges, pruned_rnnt_loss,
                           samplewise_pruned_rnnt_loss, simple_lattice, simple_rnnt_loss,
                           warmup_scales)
from memlab.transducer import rnnt_loss_batched, rnnt_loss_reference


class TinyJoiner(torch.nn.Module):
    def __init__(self, h=8, j=16, v=9, dropout=0.0):
        super().__init__()
        self.enc = torch.nn.Linear(h, j)
        self.pred = torch.nn.Linear(h, j)
        self.out = torch.nn.Linear(j, v)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, e, p):
        return self.out(self.drop(torch.tanh(self.enc(e)[:, :, None] + self.pred(p)[:, None])))


class Problem:
    """joiner, simple projections and inputs; lengths include the extremes (T_b = 1, U_b = 0)."""

    def __init__(self, B=6, T=12, U=5, V=9, H=8, seed=0, dtype=torch.float64, blank=0,
                 dropout=0.0):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.joiner = TinyJoiner(H, 16, V, dropout).to(dtype)
        self.am_proj = torch.nn.Linear(H, V).to(dtype)
        self.lm_proj = torch.nn.Linear(H, V).to(dtype)
        self.enc = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
        self.pred = torch.randn(B, U + 1, H, generator=g, dtype=dtype, requires_grad=True)
        t = torch.randint(0, V - 1, (B, U), generator=g)
        self.targets = t + (t >= blank).long()                    # never blank
        self.enc_len = torch.randint(1, T + 1, (B,), generator=g)
        self.tgt_len = torch.randint(0, U + 1, (B,), generator=g)
        self.enc_len[0], self.tgt_len[1] = T, U
        self.enc_len[1] = max(int(self.enc_len[1]), U)
        self.enc_len[2], self.tgt_len[2] = 1, 0
        # keep every sample feasible for s_range >= 2: U_b <= T_b
        self.tgt_len = torch.minimum(self.tgt_len, self.enc_len)
        self.blank = blank

    def modules(self):
        return (self.joiner, self.am_proj, self.lm_proj)

    def leaves(self):
        return [self.enc, self.pred] + [p for m in self.modules() for p in m.parameters()]

    def args(self):
        return (self.joiner, self.enc, self.pred, self.am_proj(self.enc), self.lm_proj(self.pred),
                self.targets, self.enc_len, self.tgt_len)

    def grads(self, loss, weights=None):
        out = loss if weights is None else (loss * weights).sum()
        return torch.autograd.grad(out, self.leaves(), allow_unused=True, retain_graph=True)


def close(a, b, tol):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def same_grads(ga, gb, tol):
    for i, (a, b) in enumerate(zip(ga, gb)):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().max()) == 0, i
            continue
        assert close(a, b, tol), (i, float((a - b).abs().max()))


# ------------------------------------------------------------------------------- the lattice
def test_lattice_matches_reference_and_occupations_sum_to_frames():
    g = torch.Generator().manual_seed(3)
    B, T, U, V = 4, 7, 4, 6
    logits = torch.randn(B, T, U + 1, V, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, V, (B, U), generator=g)
    el, tl = torch.tensor([7, 3, 1, 5]), torch.tensor([4, 0, 0, 3])
    lp = logits.log_softmax(-1)
    py = lp[..., 0]
    px = lp[:, :, :U].gather(3, targets[:, None, :, None].expand(B, T, U, 1))[..., 0]
    losses, gx, gy = lattice_forward_backward(px.detach(), py.detach(), el, tl)
    ref = rnnt_loss_reference(logits, targets, el, tl, reduction="none")
    assert close(losses, ref, 1e-12)
    got, _, _ = lattice_loss(px, py, el, tl)                   # differentiable in px, py
    w = torch.rand(B, dtype=torch.float64)
    want_g, = torch.autograd.grad((ref * w).sum(), [logits])
    got_g, = torch.autograd.grad((got * w).sum(), [logits])
    assert close(got_g, want_g, 1e-12)
    # every path takes exactly T_b blanks and U_b emissions
    assert close(-gy.sum((1, 2)), el.double(), 1e-12)
    assert close(-gx.sum((1, 2)), tl.double(), 1e-12)


# ------------------------------------------------------------------------------- simple loss
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("blank", [0, 3])
def test_simple_loss_equals_naive_additive_joint(dtype, tol, blank):
    pr = Problem(dtype=dtype, blank=blank)
    am, lm = pr.am_proj(pr.enc), pr.lm_proj(pr.pred)
    got = simple_rnnt_loss(am, lm, pr.targets, pr.enc_len, pr.tgt_len, blank=blank,
                           reduction="none")
    naive = am[:, :, None] + lm[:, None]                                   # (B, T, U+1, V)
    want = rnnt_loss_reference(naive, pr.targets, pr.enc_len, pr.tgt_len, blank=blank,
                               reduction="none")
    assert got.dtype == dtype and close(got, want, tol)
    w = torch.rand(got.shape, dtype=dtype)
    same_grads(pr.grads(got, w), pr.grads(want, w), 10 * tol)


def test_simple_lattice_never_builds_the_4d_tensor():
    from memlab.memory import MemoryMeter
    B, T, U, V = 4, 50, 10, 256
    am = torch.randn(B, T, V)
    lm = torch.randn(B, U + 1, V)
    targets = torch.randint(1, V, (B, U))
    with MemoryMeter("cpu", inputs=[am, lm, targets]) as meter:
        simple_lattice(am, lm, targets, torch.full((B,), U))
    # what the call allocates (the process may hold other tensors: the baseline)
    assert meter.peak - meter.baseline < B * T * (U + 1) * V * 4 / 3, meter.peak


# ------------------------------------------------------------------------------- full band
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("extra", [0, 4])            # s_range = U+1 and above (clipped)
def test_full_band_equals_reference(reduction, extra, one_thread):
    pr = Problem()
    U = pr.targets.shape[1]
    stats = {}
    got = pruned_rnnt_loss(*pr.args(), s_range=U + 1 + extra, simple_loss_scale=0.0,
                           reduction=reduction, stats=stats)
    assert stats["s_range"] == U + 1
    want = rnnt_loss_reference(pr.joiner(pr.enc, pr.pred), pr.targets, pr.enc_len, pr.tgt_len,
                               reduction=reduction)
    assert close(got, want, 1e-10)
    w = torch.rand(got.shape, dtype=got.dtype) if reduction == "none" else None
    same_grads(pr.grads(got, w), pr.grads(want, w), 1e-9)


def test_full_band_float32_and_total(one_thread):
    pr = Problem(dtype=torch.float32)
    U = pr.targets.shape[1]
    stats = {}
    total = pruned_rnnt_loss(*pr.args(), s_range=U + 1, simple_loss_scale=0.3,
                             pruned_loss_scale=0.7, reduction="none", stats=stats)
    full = rnnt_loss_reference(pr.joiner(pr.enc, pr.pred), pr.targets, pr.enc_len, pr.tgt_len,
                               reduction="none")
    assert total.dtype == torch.float32 and stats["pruned"].dtype == torch.float32
    assert close(stats["pruned"], full, 1e-5)
    assert close(total, 0.3 * stats["simple"] + 0.7 * full, 1e-5)
    bat = rnnt_loss_batched(pr.joiner(pr.enc, pr.pred), pr.targets, pr.enc_len, pr.tgt_len,
                            reduction="none")
    assert close(stats["pruned"], bat, 1e-5)


def test_bfloat16_inputs_use_a_float32_lattice(one_thread):
    pr = Problem(dtype=torch.float32)
    want = pruned_rnnt_loss(*pr.args(), s_range=3)
    for m in pr.modules():
        m.to(torch.bfloat16)
    pr.enc = pr.enc.detach().bfloat16().requires_grad_()
    pr.pred = pr.pred.detach().bfloat16().requires_grad_()
    for sw in (False, True):
        got = pruned_rnnt_loss(*pr.args(), s_range=3, samplewise=sw)
        assert got.dtype == torch.bfloat16 and abs(float(got.detach()) - float(want.detach())) <= 0.02 * float(want.detach())
        g = pr.grads(got)
        assert g[0].dtype == torch.bfloat16 and torch.isfinite(g[0].float()).all()


def test_narrow_band_is_an_upper_bound_and_finite(one_thread):
    pr = Problem(B=8, T=15, U=8, seed=5)
    full = rnnt_loss_reference(pr.joiner(pr.enc, pr.pred), pr.targets, pr.enc_len, pr.tgt_len,
                               reduction="none")
    prev = None
    for s in (2, 3, 5, 9):
        stats = {}
        pruned_rnnt_loss(*pr.args(), s_range=s, reduction="none", stats=stats)
        p = stats["pruned"]
        assert torch.isfinite(p).all() and (p >= full - 1e-9).all()     # fewer paths: less prob.
        prev = p
    assert close(prev, full, 1e-10)


# ------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("seed", range(6))
def test_bounds_feasible(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, U, V = 7, 20, 12, 11
    am = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    lm = torch.randn(B, U + 1, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(1, V, (B, U), generator=g)
    el = torch.randint(1, T + 1, (B,), generator=g)
    el[0] = T
    tl = torch.minimum(torch.randint(0, U + 1, (B,), generator=g), el)
    tl[1] = min(U, int(el[1]))
    px, py = simple_lattice(am, lm, targets, tl)
    _, gx, gy = lattice_forward_backward(px, py, el, tl)
    for S in range(2, U + 2):
        if bool((tl > (S - 1) * el).any()):
            continue
        st = prune_ranges(gx, gy, el, tl, S)
        assert st.shape == (B, T) and st.dtype == torch.int64
        assert (st[:, 0] == 0).all()
        d = st[:, 1:] - st[:, :-1]
        assert (d >= 0).all() and (d <= S - 1).all()
        assert (st >= 0).all() and (st <= U + 1 - S).all()
        top = (tl + 1 - S).clamp_min(0)
        assert (st <= top[:, None]).all()
        last = st[torch.arange(B), el - 1]
        assert ((last <= tl) & (tl <= last + S - 1)).all()     # the final cell is in the band


def test_bounds_follow_a_sharp_alignment():
    """A simple joint that emits token u exactly at frame 2u: windows sit on that path."""
    B, T, U, V = 1, 12, 5, 8
    am = torch.full((B, T, V), -20.0, dtype=torch.float64)
    lm = torch.zeros(B, U + 1, V, dtype=torch.float64)
    targets = torch.arange(1, U + 1)[None]
    for u in range(U):
        am[0, 2 * u, targets[0, u]] = 20.0                      # emit y_{u+1} at frame 2u
    am[..., 0] = 0.0                                            # blank elsewhere
    el, tl = torch.tensor([T]), torch.tensor([U])
    px, py = simple_lattice(am, lm, targets, tl)
    _, gx, gy = lattice_forward_backward(px, py, el, tl)
    st = prune_ranges(gx, gy, el, tl, 2)
    path_u = [min((t + 1) // 2, U) for t in range(T)]          # u on arrival at frame t (+ emit)
    for t in range(T):
        assert st[0, t] <= path_u[t] <= st[0, t] + 1, (t, st[0].tolist())


# ------------------------------------------------------------------------------- sample-wise
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("budget", [1, None])          # one sample per group; one group
def test_samplewise_equals_pruned(reduction, budget, one_thread):
    pr = Problem(B=7, T=14, U=6, seed=2)
    a = pruned_rnnt_loss(*pr.args(), s_range=3, reduction=reduction)
    stats = {}
    b = samplewise_pruned_rnnt_loss(*pr.args(), s_range=3, reduction=reduction,
                                    max_chunk_bytes=budget, stats=stats)
    assert len(stats["chunks"]) == (7 if budget == 1 else 1)
    assert sorted(i for c in stats["chunks"] for i in c) == list(range(7))
    assert close(a, b, 1e-12)
    w = torch.rand(a.shape, dtype=a.dtype) if reduction == "none" else None
    same_grads(pr.grads(a, w), pr.grads(b, w), 1e-10)


def test_samplewise_loss_scaling_and_dropout_replay(one_thread):
    pr = Problem(B=5, T=10, U=4, seed=4, dropout=0.3)
    torch.manual_seed(11)
    a = samplewise_pruned_rnnt_loss(*pr.args(), s_range=3, reduction="sum", max_chunk_bytes=1)
    ga = pr.grads(3.0 * a)
    torch.manual_seed(11)
    b = samplewise_pruned_rnnt_loss(*pr.args(), s_range=3, reduction="none", max_chunk_bytes=1)
    gb = pr.grads(b, torch.full((5,), 3.0, dtype=b.dtype))   # recomputed in backward, same masks
    assert close(a, b.sum(), 1e-12)
    same_grads(ga, gb, 1e-10)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("budget", [1, None])          # one sample per group; one group
def test_samplewise_with_projections_equals_pruned(reduction, budget, one_thread):
    """am and lm given as the projections: each group computes its own simple joint, bounds
    and band; loss, stats and every gradient (the projections' too) equal the batched loss."""
    pr = Problem(B=7, T=14, U=6, seed=5)
    sa, sb = {}, {}
    a = pruned_rnnt_loss(*pr.args(), s_range=3, reduction=reduction, stats=sa)
    args = list(pr.args())
    args[3], args[4] = pr.am_proj, pr.lm_proj
    b = samplewise_pruned_rnnt_loss(*args, s_range=3, reduction=reduction,
                                    max_chunk_bytes=budget, stats=sb)
    assert len(sb["chunks"]) == (7 if budget == 1 else 1)
    assert close(a, b, 1e-12)
    for k in ("simple", "pruned"):
        assert close(sa[k], sb[k], 1e-12), k
    T = int(pr.enc_len.max())
    valid = torch.arange(T)[None] < pr.enc_len[:, None]                       # (B, T')
    assert torch.equal(sa["starts"][valid], sb["starts"][valid])
    w = torch.rand(a.shape, dtype=a.dtype) if reduction == "none" else None
    same_grads(pr.grads(a, w), pr.grads(b, w), 1e-10)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_samplewise_with_projections_inside_the_joiner(reduction, one_thread):
    """A joiner module that holds the simple projections it is also given (the peers bench's
    joiner): each parameter's gradient once. Before, the projections' parameters were listed
    twice and their gradients came out doubled (loss and encoder gradients were right)."""
    pr = Problem(B=5, T=10, U=4, seed=3)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.am_proj, self.lm_proj = pr.joiner, pr.am_proj, pr.lm_proj

        def forward(self, e, p):
            return self.inner(e, p)
    joiner = Holder()
    args = list(pr.args())
    args[0] = joiner
    a = pruned_rnnt_loss(*args, s_range=3, reduction=reduction)
    args[3], args[4] = joiner.am_proj, joiner.lm_proj
    b = samplewise_pruned_rnnt_loss(*args, s_range=3, reduction=reduction)
    w = torch.rand(a.shape, dtype=a.dtype) if reduction == "none" else None
    same_grads(pr.grads(a, w), pr.grads(b, w), 1e-10)


def test_projections_are_checked(one_thread):
    pr = Problem(B=3, T=6, U=3)
    args = list(pr.args())
    args[4] = pr.lm_proj                                   # one tensor, one projection
    with pytest.raises(TypeError, match="am and lm must both be"):
        pruned_rnnt_loss(*args)
    args[3] = lambda e: e[..., :2, None]                   # not (N, T, V)
    with pytest.raises(ValueError, match="am must map"):
        samplewise_pruned_rnnt_loss(*args)
    args[3] = pr.am_proj                                   # projections, not sample-wise: fine
    a = pruned_rnnt_loss(*args, s_range=3)
    assert close(a, pruned_rnnt_loss(*pr.args(), s_range=3), 1e-12)


def test_samplewise_pruned_peaks_below_samplewise(one_thread):
    """The workload of the benchmarks (B=32, T=200, U=40, V=512, H=128), measured by the meter:
    with the simple joint computed per group, the sample-wise pruned loss step needs less than
    the sample-wise full loss (before: 122 MiB against 35 MiB, the (B, T, V) simple joint)."""
    from memlab.bench import transducer as bt
    problem = bt.make_problem(32, 200, 40, 512, hidden=128)
    simple = bt.simple_projections(problem)
    full = bt.measure_peak("samplewise", problem)["step_bytes"]
    pruned = bt.measure_peak("pruned", problem, simple=simple)["step_bytes"]
    sw = bt.measure_peak("samplewise-pruned", problem, simple=simple)["step_bytes"]
    assert sw < 0.6 * full and sw < pruned / 8, (sw, full, pruned)


def test_plan_groups():
    assert plan_groups([5, 9, 7], 4, 10, max_chunk_bytes=math.inf) == [[1, 2, 0]]
    assert plan_groups([5, 9, 7], 4, 10, max_chunk_bytes=1) == [[1], [2], [0]]
    one = 2 * 9 * 4 * 10 * 4
    assert plan_groups([5, 9, 7], 4, 10, max_chunk_bytes=2 * one) == [[1, 2], [0]]
    with_simple = (2 * 4 + 4) * 9 * 10 * 4                # + the group's simple joint
    assert plan_groups([5, 9, 7], 4, 10, max_chunk_bytes=2 * one, simple=True) == [[1], [2], [0]]
    assert plan_groups([5, 9, 7], 4, 10, max_chunk_bytes=2 * with_simple,
                       simple=True) == [[1, 2], [0]]
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        plan_groups([5], 4, 10, max_chunk_bytes=0)


def test_no_grad_and_eval_paths(one_thread):
    pr = Problem()
    want = pruned_rnnt_loss(*pr.args(), s_range=3)
    with torch.no_grad():
        for sw in (False, True):
            got = pruned_rnnt_loss(*pr.args(), s_range=3, samplewise=sw)
            assert not got.requires_grad and close(got, want, 1e-12)


# ------------------------------------------------------------------------------- memory
def _peak(method, B=8, T=100, U=20, V=256, H=32, S=4):
    from memlab.memory import MemoryMeter
    torch.manual_seed(0)
    joiner, amp, lmp = TinyJoiner(H, H, V), torch.nn.Linear(H, V), torch.nn.Linear(H, V)
    enc = torch.randn(B, T, H, requires_grad=True)
    pred = torch.randn(B, U + 1, H, requires_grad=True)
    targets = torch.randint(1, V, (B, U))
    el, tl = torch.full((B,), T), torch.full((B,), U)
    with MemoryMeter("cpu", model=[joiner, amp, lmp], inputs=[enc, pred, targets]) as meter:
        if method == "batched":
            loss = rnnt_loss_batched(joiner(enc, pred), targets, el, tl)
        else:
            loss = pruned_rnnt_loss(joiner, enc, pred, amp(enc), lmp(pred), targets, el, tl,
                                    s_range=S, samplewise=method == "samplewise",
                                    max_chunk_bytes=1)
        loss.backward()
    return meter.peak


def test_pruned_peak_is_a_fraction_of_batched(one_thread):
    # measured on CPU: batched 35.09 MiB, pruned 8.55 MiB (0.24), sample-wise pruned with one
    # sample per group 4.03 MiB (0.11); the band's logits alone are S/(U+1) = 0.19 of the full.
    full, pruned, sw = _peak("batched"), _peak("pruned"), _peak("samplewise")
    assert pruned <= 0.30 * full, (pruned, full)
    assert sw <= 0.15 * full and sw < pruned, (sw, pruned, full)


# ------------------------------------------------------------------------------- warm-up
def test_warmup_scales():
    assert warmup_scales(0) == (1.0, 0.1)
    s, p = warmup_scales(1000, warm_step=2000, simple_loss_scale=0.5)
    assert abs(s - 0.75) < 1e-12 and abs(p - 0.55) < 1e-12
    assert warmup_scales(5000) == (0.5, 1.0)
    with pytest.raises(ValueError, match="warm_step"):
        warmup_scales(0, warm_step=0)
    with pytest.raises(TypeError, match="step"):
        warmup_scales(1.5)


# ------------------------------------------------------------------------------- errors
def test_bad_arguments_are_named():
    pr = Problem(B=3, T=6, U=4, seed=1)
    j, enc, pred, am, lm, tg, el, tl = pr.args()
    tl = torch.tensor([4, 2, 0])
    el = torch.tensor([6, 3, 1])

    def call(**kw):
        a = dict(joiner=j, enc_out=enc, pred_out=pred, am=am, lm=lm, targets=tg,
                 enc_lengths=el, target_lengths=tl, s_range=3)
        a.update(kw)
        return pruned_rnnt_loss(**a)

    for kw, exc, match in [
        (dict(s_range=0), ValueError, "s_range"),
        (dict(s_range=True), TypeError, "s_range"),
        (dict(s_range=2.5), TypeError, "s_range"),
        (dict(s_range=1), ValueError, "s_range=1 is too small"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(blank=9), ValueError, "blank"),
        (dict(joiner=3), TypeError, "joiner"),
        (dict(joiner=lambda e, p: e), ValueError, "joiner"),
        (dict(lm=lm[:, :, :4]), ValueError, "lm"),
        (dict(am=am[:2]), ValueError, "pred_out|lm"),
        (dict(enc_out=enc[:, :5]), ValueError, "enc_out"),
        (dict(targets=tg.float()), TypeError, "targets"),
        (dict(targets=torch.zeros_like(tg)), ValueError, "blank"),
        (dict(enc_lengths=torch.tensor([7, 3, 1])), ValueError, "enc_lengths"),
        (dict(target_lengths=torch.tensor([5, 2, 0])), ValueError, "target_lengths"),
        (dict(simple_loss_scale=-1.0), ValueError, "simple_loss_scale"),
        (dict(pruned_loss_scale=float("nan")), ValueError, "pruned_loss_scale"),
        (dict(samplewise=1), TypeError, "samplewise"),
        (dict(samplewise=True, max_chunk_bytes=0), ValueError, "max_chunk_bytes"),
        (dict(stats=[]), TypeError, "stats"),
    ]:
        with pytest.raises(exc, match=match):
            call(**kw)
    # a band too narrow for a sample: 4 tokens in 1 frame need s_range >= 5
    with pytest.raises(ValueError, match="need s_range >= 5"):
        call(enc_lengths=torch.tensor([6, 3, 1]), target_lengths=torch.tensor([2, 2, 4]))


# ------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agreement():
    pr = Problem(B=6, T=20, U=6, V=17, dtype=torch.float32)
    cpu = pruned_rnnt_loss(*pr.args(), s_range=3, reduction="none")
    g_cpu = pr.grads(cpu.sum())
    dev = torch.device("cuda")
    for m in pr.modules():
        m.to(dev)
    pr.enc = pr.enc.detach().to(dev).requires_grad_()
    pr.pred = pr.pred.detach().to(dev).requires_grad_()
    pr.targets, pr.enc_len, pr.tgt_len = (x.to(dev) for x in (pr.targets, pr.enc_len, pr.tgt_len))
    for sw in (False, True):
        got = pruned_rnnt_loss(*pr.args(), s_range=3, reduction="none", samplewise=sw,
                               max_chunk_bytes=1)
        assert got.device.type == "cuda" and close(got.cpu(), cpu, 1e-4)
        for a, b in zip(pr.grads(got.sum()), g_cpu):
            assert close(a.cpu(), b, 1e-3)     # TF32 matmuls may be on


# ------------------------------------------------------------------------------- fast_rnnt
# fast_rnnt (k2's pruned RNN-T, CPU build: its three C++ sources through
# torch.utils.cpp_extension) needs every target length >= 1: the samples with U_b = 0 are left out


def _fast_rnnt_problem():
    pr = Problem(B=6, T=10, U=4, V=9, dtype=torch.float32)
    keep = pr.tgt_len >= 1
    boundary = torch.stack([torch.zeros_like(pr.enc_len), torch.zeros_like(pr.enc_len),
                            pr.tgt_len, pr.enc_len], 1).long()[keep]
    return pr, keep, boundary


def test_simple_loss_matches_fast_rnnt():
    fast_rnnt = pytest.importorskip("fast_rnnt")
    pr, keep, boundary = _fast_rnnt_problem()
    am, lm = pr.am_proj(pr.enc).detach()[keep], pr.lm_proj(pr.pred).detach()[keep]
    want = fast_rnnt.rnnt_loss_simple(lm=lm, am=am, symbols=pr.targets[keep],
                                      termination_symbol=0, boundary=boundary, reduction="none")
    got = simple_rnnt_loss(am, lm, pr.targets[keep], pr.enc_len[keep], pr.tgt_len[keep],
                           reduction="none")
    assert close(got, want, 1e-5)


def test_full_loss_and_gradients_match_fast_rnnt():
    """fast_rnnt.rnnt_loss on the joiner's (B, T, U+1, V) logits against memlab's batched loss
    and its pruned loss with the whole lattice as the band (s_range = U + 1)."""
    fast_rnnt = pytest.importorskip("fast_rnnt")
    pr, keep, boundary = _fast_rnnt_problem()
    enc, pred = pr.enc.detach()[keep], pr.pred.detach()[keep]
    el, tl, y = pr.enc_len[keep], pr.tgt_len[keep], pr.targets[keep]
    logits = pr.joiner(enc, pred).detach().requires_grad_()
    want = fast_rnnt.rnnt_loss(logits=logits, symbols=y, termination_symbol=0, boundary=boundary,
                               reduction="none")
    (g_want,) = torch.autograd.grad(want.sum(), logits)
    got = rnnt_loss_batched(logits, y, el, tl, blank=0, reduction="none")
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    assert close(got, want, 1e-5) and close(g_got, g_want, 1e-5)
    full = pruned_rnnt_loss(pr.joiner, enc, pred, pr.am_proj(enc), pr.lm_proj(pred), y, el, tl,
                            s_range=y.shape[1] + 1, reduction="none", simple_loss_scale=0.0)
    assert close(full, want, 1e-5)


def test_pruned_band_matches_fast_rnnt_on_its_ranges():
    """The band's lattice (memlab.pruned.pruned_lattice) on fast_rnnt's own pruning ranges
    (s_range 3) gives fast_rnnt.rnnt_loss_pruned's losses and logit gradients."""
    fast_rnnt = pytest.importorskip("fast_rnnt")
    from memlab.pruned import pruned_lattice, pruned_logits
    pr, keep, boundary = _fast_rnnt_problem()
    enc, pred = pr.enc.detach()[keep], pr.pred.detach()[keep]
    el, tl, y = pr.enc_len[keep], pr.tgt_len[keep], pr.targets[keep]
    am, lm = pr.am_proj(enc).detach(), pr.lm_proj(pred).detach()
    _, (px_grad, py_grad) = fast_rnnt.rnnt_loss_simple(lm=lm, am=am, symbols=y,
                                                       termination_symbol=0, boundary=boundary,
                                                       reduction="sum", return_grad=True)
    ranges = fast_rnnt.get_rnnt_prune_ranges(px_grad=px_grad, py_grad=py_grad,
                                             boundary=boundary, s_range=3)      # (B, T, 3)
    assert bool((ranges[..., 1:] - ranges[..., :-1] == 1).all())      # contiguous windows
    logits = pruned_logits(pr.joiner, enc, pred, ranges[..., 0], 3).detach().requires_grad_()
    want = fast_rnnt.rnnt_loss_pruned(logits=logits, symbols=y, ranges=ranges,
                                      termination_symbol=0, boundary=boundary, reduction="none")
    (g_want,) = torch.autograd.grad(want.sum(), logits)
    px, py = pruned_lattice(logits, ranges[..., 0], y, tl)
    got, _, _ = lattice_loss(px, py, el, tl)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    assert close(got, want, 1e-5) and close(g_got, g_want, 1e-5)


# ---------------------------------------------------------------------------------------------
# C kernels of the band and the bare lattice (memlab._lattice_kernel)

from memlab import _lattice_kernel  # noqa: E402
from memlab.pruned import _lattice_torch  # noqa: E402

ckernel = pytest.mark.skipif(not _lattice_kernel.available(), reason="no C compiler")
_SUBNORMAL = torch.finfo(torch.float32).tiny


def _band_reference(logits, sym, blank, g_blank, g_emit):
    """Autograd through log_softmax + gathers in float64."""
    x = logits.detach().double().requires_grad_()
    lp = x.log_softmax(-1)
    b, e = lp[..., blank], lp.gather(3, sym[..., None])[..., 0]
    (b * g_blank + e * g_emit).sum().backward()
    return b.detach(), e.detach(), x.grad


@ckernel
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_band_kernel_equals_log_softmax_autograd(dtype, tol):
    g = torch.Generator().manual_seed(0)
    N, T, S, V = 3, 7, 4, 37
    logits = (3 * torch.randn(N, T, S, V, generator=g)).to(dtype)
    sym = torch.randint(1, V, (N, T, S), generator=g)
    sym[:, :, -1] = 0                          # the cell at u = U: its "next label" is the blank
    gb = -torch.rand(N, T, S, generator=g, dtype=torch.float64)
    ge = -torch.rand(N, T, S, generator=g, dtype=torch.float64)
    ge[:, :, -1] = 0.0
    gb[0, 0] = ge[0, 0] = 0.0                  # rows off every path
    ln, lpb, lpe = _lattice_kernel.band_forward(logits, sym, 0)
    rb, re, rgrad = _band_reference(logits, sym, 0, gb, ge)
    assert torch.allclose(lpb, rb, atol=tol, rtol=0) and torch.allclose(lpe, re, atol=tol, rtol=0)
    grad = _lattice_kernel.band_backward(logits, sym, 0, ln, gb, ge)
    assert grad.dtype == dtype
    assert torch.allclose(grad.double(), rgrad, atol=tol, rtol=0)
    assert (grad[0, 0] == 0).all()


@ckernel
def test_c_lattice_equals_torch_lattice_with_missing_arcs():
    """The band's lattice (-inf off the band) and a full one, lengths at the extremes."""
    p = Problem(B=6, T=12, U=5)
    px, py = simple_lattice(p.am_proj(p.enc), p.lm_proj(p.pred), p.targets, p.tgt_len)
    px, py = px.detach().clone(), py.detach().clone()
    px[1, 0, 1:], py[1, 1:3, 0] = -math.inf, -math.inf     # arcs missing, as off a band
    got = _lattice_kernel.lattice(px, py, p.enc_len, p.tgt_len)
    want = _lattice_torch(px, py, p.enc_len, p.tgt_len)
    assert torch.isfinite(want[0]).all()                    # every sample keeps a path
    for a, b in zip(got, want):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        assert torch.allclose(a[finite], b[finite], atol=1e-12, rtol=1e-12)


@ckernel
def test_float32_gradients_hold_no_subnormals():
    """Regression: occupations of cells far off the paths are tiny; written as float32 they were
    subnormal numbers, which cost ~100 cycles per operation on x86 (the band's gradient pass
    3.5x slower, the simple joint's matmul backward 10x). They are flushed to zero now, in the
    band and sample-wise kernels and in the float32 lattice gradients."""
    assert f"#define TINY_F32 {_lattice_kernel.TINY_F32!r}" in _lattice_kernel.SOURCE  # one rule
    g = torch.Generator().manual_seed(0)
    N, T, S, V = 2, 50, 3, 64
    logits = torch.randn(N, T, S, V, generator=g)
    sym = torch.randint(1, V, (N, T, S), generator=g)
    ln, _, _ = _lattice_kernel.band_forward(logits, sym, 0)
    occ = torch.logspace(-50, 0, N * T * S, dtype=torch.float64).reshape(N, T, S)
    grad = _lattice_kernel.band_backward(logits, sym, 0, ln, -occ / 2, -occ / 2)
    nz = grad[grad != 0].abs()
    assert nz.numel() and nz.min() >= _SUBNORMAL
    assert grad[occ > 1e-10].ne(0).any()           # the rest is there

    # the full lattice of a long utterance: its corner cells have occupations ~1e-40
    T, U = 200, 40
    px = torch.randn(1, T, U, generator=g).log_softmax(-1) - 1.0
    py = torch.randn(1, T, U + 1, generator=g).log_softmax(-1) - 1.0
    _, gx, gy = lattice_forward_backward(px, py, torch.tensor([T]), torch.tensor([U]))
    for gr in (gx, gy):
        assert gr.dtype == torch.float32
        small = gr[gr != 0].abs()
        assert small.min() >= _SUBNORMAL

    # the sample-wise kernel's gradient pass (same rule), on one long utterance's logits
    V = 32
    logits = torch.randn(1, T, U + 1, V, generator=g)
    tg = torch.randint(1, V, (1, U), generator=g)
    out = torch.empty_like(logits)
    _lattice_kernel.chunk_loss(logits, tg, torch.tensor([T]), torch.tensor([U]), 0,
                               torch.ones(1), out)
    small = out[out != 0].abs()
    assert small.numel() > out.numel() // 10 and small.min() >= _SUBNORMAL
