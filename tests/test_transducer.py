"""memlab.transducer: the reference, batched and sample-wise RNN-T losses agree (values and
gradients), the sample-wise loss groups samples and saves memory, bad arguments are refused."""

import math

import pytest
import torch

from memlab.transducer import (chunk_bytes, plan_chunks, rnnt_forward_variables,
                               rnnt_loss_batched, rnnt_loss_reference, samplewise_rnnt_loss)


class TinyJoiner(torch.nn.Module):
    def __init__(self, h=8, j=16, v=9):
        super().__init__()
        self.enc = torch.nn.Linear(h, j)
        self.pred = torch.nn.Linear(h, j)
        self.out = torch.nn.Linear(j, v)

    def forward(self, e, p):
        return self.out(torch.tanh(self.enc(e)[:, :, None] + self.pred(p)[:, None]))


def problem(B=6, T=12, U=5, V=9, H=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    joiner = TinyJoiner(H, 16, V)
    enc = torch.randn(B, T, H, generator=g, requires_grad=True)
    pred = torch.randn(B, U + 1, H, generator=g, requires_grad=True)
    targets = torch.randint(1, V, (B, U), generator=g)
    enc_len = torch.randint(1, T + 1, (B,), generator=g)
    tgt_len = torch.randint(0, U + 1, (B,), generator=g)
    enc_len[0], tgt_len[1] = T, U            # padding only up to the longest, as torchaudio wants
    enc_len[2], tgt_len[2] = 1, 0            # the smallest lattice
    return joiner, enc, pred, targets, enc_len, tgt_len


# method -> rnnt_loss_batched(kernel=...); "batched" is the default kernel ("auto")
BATCHED_KERNELS = {"torchaudio": "torchaudio", "memlab-batched": "memlab"}


def run(method, joiner, enc, pred, targets, enc_len, tgt_len, reduction="mean", weights=None,
        **kw):
    """Loss and gradients (enc, pred, joiner params) of one method."""
    joiner.zero_grad(set_to_none=True)
    enc.grad = pred.grad = None
    if method == "samplewise":
        loss = samplewise_rnnt_loss(joiner, enc, pred, targets, enc_len, tgt_len,
                                    reduction=reduction, **kw)
    else:
        fn = rnnt_loss_reference if method == "reference" else rnnt_loss_batched
        if method in BATCHED_KERNELS:
            kw = dict(kw, kernel=BATCHED_KERNELS[method])
        logits = joiner(enc, pred)
        if method == "reference64":
            fn = rnnt_loss_reference
            logits = logits.double()
        loss = fn(logits, targets, enc_len, tgt_len, reduction=reduction, **kw)
    (loss if weights is None else (loss * weights).sum()).backward()
    grads = [enc.grad.clone(), pred.grad.clone()] + [p.grad.clone() for p in joiner.parameters()]
    return loss.detach(), grads


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------- reference
def naive_alpha(logits, targets, T, U, blank=0):
    """Scalar alpha recursion in Python floats (float64), one sample: (alpha [T][U+1], lp)."""
    lp = torch.log_softmax(logits.double(), -1).tolist()
    alpha = [[-math.inf] * (U + 1) for _ in range(T)]
    for t in range(T):
        for u in range(U + 1):
            if t == 0 and u == 0:
                alpha[t][u] = 0.0
                continue
            a = alpha[t - 1][u] + lp[t - 1][u][blank] if t > 0 else -math.inf
            b = alpha[t][u - 1] + lp[t][u - 1][targets[u - 1]] if u > 0 else -math.inf
            m = max(a, b)
            alpha[t][u] = m + math.log(math.exp(a - m) + math.exp(b - m))
    return alpha, lp


def naive_loss(logits, targets, T, U, blank=0):
    alpha, lp = naive_alpha(logits, targets, T, U, blank)
    return -(alpha[T - 1][U] + lp[T - 1][U][blank])


@pytest.mark.parametrize("blank", [0, 4])
def test_reference_matches_scalar_recursion_fp64(blank):
    g = torch.Generator().manual_seed(1)
    B, T, U, V = 4, 7, 4, 6
    logits = torch.randn(B, T, U + 1, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V - 1, (B, U), generator=g)
    targets[targets >= blank] += 1                                   # never blank
    enc_len, tgt_len = torch.tensor([7, 3, 1, 5]), torch.tensor([4, 0, 2, 3])
    got = rnnt_loss_reference(logits, targets, enc_len, tgt_len, blank=blank, reduction="none")
    for b in range(B):
        want = naive_loss(logits[b], targets[b].tolist(), int(enc_len[b]), int(tgt_len[b]), blank)
        assert abs(got[b].item() - want) <= 1e-10 * abs(want)


def test_forward_variables_match_scalar_recursion():
    g = torch.Generator().manual_seed(4)
    B, T, U, V = 3, 6, 3, 5
    logits = torch.randn(B, T, U + 1, V, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(1, V, (B, U), generator=g)
    enc_len, tgt_len = torch.tensor([6, 4, 1]), torch.tensor([3, 1, 0])
    alpha = rnnt_forward_variables(logits, targets, enc_len, tgt_len)
    assert alpha.shape == (B, T, U + 1) and alpha.dtype == torch.float64
    losses = rnnt_loss_reference(logits, targets, enc_len, tgt_len, reduction="none")
    lp = logits.log_softmax(-1)
    for b in range(B):
        Tb, Ub = int(enc_len[b]), int(tgt_len[b])
        want, _ = naive_alpha(logits[b], targets[b].tolist(), Tb, Ub)
        assert torch.allclose(alpha[b, :Tb, :Ub + 1], torch.tensor(want, dtype=torch.float64),
                              rtol=1e-10, atol=1e-10)
        assert torch.isneginf(alpha[b, Tb:]).all() and torch.isneginf(alpha[b, :, Ub + 1:]).all()
        assert abs(float(-(alpha[b, Tb - 1, Ub] + lp[b, Tb - 1, Ub, 0]) - losses[b])) < 1e-10
    with pytest.raises(ValueError, match="logit_lengths"):
        rnnt_forward_variables(logits, targets, torch.tensor([7, 4, 1]), tgt_len)


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 3], [2, 0]])
    args = (targets, torch.tensor([3, 2]), torch.tensor([2, 1]))
    assert torch.autograd.gradcheck(lambda x: rnnt_loss_reference(x, *args, reduction="sum"),
                                    (logits,), fast_mode=True)


def test_reference_padding_gets_no_gradient():
    joiner, enc, pred, targets, enc_len, tgt_len = problem()
    logits = joiner(enc, pred).detach().requires_grad_()
    rnnt_loss_reference(logits, targets, enc_len, tgt_len).backward()
    for b in range(len(enc_len)):
        assert logits.grad[b, enc_len[b]:].abs().sum() == 0
        assert logits.grad[b, :, tgt_len[b] + 1:].abs().sum() == 0


# ---------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_three_losses_agree(reduction):
    prob = problem()
    B, T, U, V = 6, 12, 5, 9
    budget = chunk_bytes(1, T, U, V)               # the largest samples alone, small ones grouped
    stats = {}
    ref_loss, ref_g = run("reference64", *prob, reduction=reduction)
    bat_loss, bat_g = run("torchaudio", *prob, reduction=reduction)
    for method in ("batched", "memlab-batched"):      # memlab's kernel on the whole batch
        loss, g = run(method, *prob, reduction=reduction)
        assert loss.dtype == torch.float32 and rel(loss, bat_loss) <= 1e-5
        assert all(rel(a, b) <= 1e-5 for a, b in zip(g, bat_g))
    sw_loss, sw_g = run("samplewise", *prob, reduction=reduction, max_chunk_bytes=budget,
                        stats=stats)
    sizes = [len(c) for c in stats["chunks"]]
    assert 1 in sizes and max(sizes) > 1, sizes          # one-sample and grouped calls both ran
    assert sorted(i for c in stats["chunks"] for i in c) == list(range(B))
    assert rel(sw_loss, bat_loss) <= 1e-5
    assert rel(ref_loss, bat_loss) <= 1e-5              # reference in fp64 vs torchaudio in fp32
    assert ref_loss.dtype == torch.float64 and bat_loss.dtype == torch.float32
    for a, b, c in zip(sw_g, bat_g, ref_g):
        assert rel(a, b) <= 1e-5
        assert rel(c, b) <= 1e-5


def test_reduction_none_and_mean_convention():
    prob = problem(seed=3)
    B = prob[1].shape[0]
    w = torch.linspace(0.5, 2.0, B)
    bat_loss, bat_g = run("torchaudio", *prob, reduction="none", weights=w)
    mb_loss, mb_g = run("memlab-batched", *prob, reduction="none", weights=w)
    assert rel(mb_loss, bat_loss) <= 1e-5 and all(rel(a, b) <= 1e-5 for a, b in zip(mb_g, bat_g))
    sw_loss, sw_g = run("samplewise", *prob, reduction="none", weights=w, max_chunk_bytes=1)
    ref_loss, ref_g = run("reference", *prob, reduction="none", weights=w)
    assert sw_loss.shape == (B,)
    assert rel(sw_loss, bat_loss) <= 1e-5 and rel(ref_loss, bat_loss) <= 1e-5
    for a, b, c in zip(sw_g, bat_g, ref_g):
        assert rel(a, b) <= 1e-5 and rel(c, b) <= 2e-5
    # "mean" is the batch mean of per-sample losses (torchaudio's convention) for all three
    joiner, enc, pred, targets, el, tl = prob
    with torch.no_grad():
        logits = joiner(enc, pred)
        for fn in (rnnt_loss_reference, rnnt_loss_batched,
                   lambda *a: rnnt_loss_batched(*a, kernel="torchaudio")):
            assert torch.allclose(fn(logits, targets, el, tl), bat_loss.mean(), rtol=1e-6)
        assert torch.allclose(samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl),
                              bat_loss.mean(), rtol=1e-6)


# ------------------------------------------------------------------------- batched kernels
def test_batched_memlab_kernel_float64_and_padding_match_the_reference():
    """memlab's kernel keeps float64 (torchaudio computes it in float32); logits padded past the
    longest sample are cropped; the padding gets no gradient."""
    joiner, enc, pred, targets, el, tl = problem(seed=7)
    logits = joiner(enc, pred).double().detach()
    padded = torch.nn.functional.pad(logits, (0, 0, 0, 2, 0, 3)).requires_grad_(True)
    w = torch.linspace(0.5, 2.0, logits.shape[0], dtype=torch.float64)
    padded_targets = torch.nn.functional.pad(targets, (0, 2), value=0)
    got = rnnt_loss_batched(padded, padded_targets, el, tl, reduction="none", kernel="memlab")
    (gx,) = torch.autograd.grad((got * w).sum(), padded)
    x = logits.clone().requires_grad_(True)
    want = rnnt_loss_reference(x, targets, el, tl, reduction="none")
    (wx,) = torch.autograd.grad((want * w).sum(), x)
    assert got.dtype == torch.float64 and rel(got.detach(), want.detach()) <= 1e-12
    T, U1 = logits.shape[1:3]
    assert rel(gx[:, :T, :U1], wx) <= 1e-10
    assert gx[:, T:].abs().max() == 0 and gx[:, :, U1:].abs().max() == 0


def test_batched_auto_kernel_choice(monkeypatch):
    """auto: memlab's C kernel for CPU float32/float64 without clamp; torchaudio for clamp,
    other dtypes, or with the C kernel switched off."""
    import memlab.transducer as mt
    calls = []
    real = mt._torchaudio_costs
    monkeypatch.setattr(mt, "_torchaudio_costs", lambda *a, **k: calls.append(1) or real(*a, **k))
    joiner, enc, pred, targets, el, tl = problem(seed=8)
    logits = joiner(enc, pred).detach()
    want = rnnt_loss_batched(logits, targets, el, tl, kernel="torchaudio")
    assert len(calls) == 1
    assert torch.allclose(rnnt_loss_batched(logits, targets, el, tl), want, rtol=1e-5)
    assert torch.allclose(rnnt_loss_batched(logits.double(), targets, el, tl).float(), want,
                          rtol=1e-5)
    assert len(calls) == 1                                   # memlab's kernel both times
    rnnt_loss_batched(logits, targets, el, tl, clamp=0.5)
    rnnt_loss_batched(logits.bfloat16(), targets, el, tl)
    assert len(calls) == 3
    monkeypatch.setenv("MEMLAB_CPU_KERNEL", "0")
    rnnt_loss_batched(logits, targets, el, tl)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="clamp.*kernel='torchaudio'"):
        rnnt_loss_batched(logits, targets, el, tl, clamp=0.5, kernel="memlab")
    for bad in ("fast", None, 1):
        with pytest.raises(ValueError, match="kernel must be one of"):
            rnnt_loss_batched(logits, targets, el, tl, kernel=bad)


def test_batched_kernels_keep_one_gradient_as_large_as_the_logits():
    """Both kernels: the costs' forward allocates d costs / d logits (as many bytes as the logits)
    and keeps it for backward; memlab's scratch (5 float64 per lattice cell) is freed."""
    from memlab.memory import MemoryMeter
    B, T, U, V = 4, 30, 8, 64
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, U + 1, V, generator=g, requires_grad=True)
    targets = torch.randint(1, V, (B, U), generator=g)
    el, tl = torch.full((B,), T), torch.full((B,), U)
    cells = B * T * (U + 1)
    for kernel, scratch in (("memlab", 5 * 8 * cells), ("torchaudio", None)):
        with MemoryMeter(inputs=[logits, targets, el, tl], scan=False, timeline=False) as meter:
            loss = rnnt_loss_batched(logits, targets, el, tl, kernel=kernel)
            held = meter.current - meter.baseline
        assert logits.nbytes <= held <= logits.nbytes + 4096, (kernel, held)
        if scratch is not None:
            assert meter.peak - meter.baseline <= logits.nbytes + scratch + 4096
        loss.backward()
        logits.grad = None


def test_only_pred_requires_grad_and_frozen_joiner():
    joiner, enc, pred, targets, el, tl = problem(seed=4)
    joiner.requires_grad_(False)
    e = enc.detach()
    loss = samplewise_rnnt_loss(joiner, e, pred, targets, el, tl, max_chunk_bytes=1)
    loss.backward()
    pred_sw = pred.grad.clone()
    pred.grad = None
    rnnt_loss_batched(joiner(e, pred), targets, el, tl).backward()
    assert rel(pred_sw, pred.grad) <= 1e-5
    assert all(p.grad is None for p in joiner.parameters())


def test_no_grad_computes_loss_only():
    joiner, enc, pred, targets, el, tl = problem(seed=5)
    with torch.no_grad():
        want = rnnt_loss_batched(joiner(enc, pred), targets, el, tl, reduction="sum")
        got = samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl, reduction="sum",
                                   accumulate_joiner_grads=True)
    assert got.grad_fn is None and not got.requires_grad
    assert torch.allclose(got, want, rtol=1e-6)
    assert all(p.grad is None for p in joiner.parameters())
    # grad mode on but nothing requires grad: also loss only
    joiner.requires_grad_(False)
    got = samplewise_rnnt_loss(joiner, enc.detach(), pred.detach(), targets, el, tl, reduction="sum")
    assert got.grad_fn is None and torch.allclose(got, want, rtol=1e-6)


# ------------------------------------------------------------------------ joiner grad semantics
def test_joiner_grads_arrive_in_backward_scaled_by_grad_output():
    prob = problem(seed=6)
    joiner, enc, pred, targets, el, tl = prob
    _, want = run("batched", *prob)
    joiner.zero_grad(set_to_none=True)
    enc.grad = pred.grad = None
    loss = samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl)
    assert all(p.grad is None for p in joiner.parameters())   # nothing before backward
    (3.0 * loss).backward(retain_graph=True)
    got = [enc.grad.clone(), pred.grad.clone()] + [p.grad.clone() for p in joiner.parameters()]
    for a, b in zip(got, want):
        assert rel(a, 3 * b) <= 1e-5
    loss.backward()                                            # retain_graph: adds like autograd
    for p, b in zip(joiner.parameters(), want[2:]):
        assert rel(p.grad, 4 * b) <= 1e-5
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_accumulate_joiner_grads_eagerly():
    prob = problem(seed=7)
    joiner, enc, pred, targets, el, tl = prob
    _, want = run("batched", *prob, reduction="sum")
    joiner.zero_grad(set_to_none=True)
    enc.grad = pred.grad = None
    loss = samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl, reduction="sum",
                                accumulate_joiner_grads=True, max_chunk_bytes=1)
    for p, b in zip(joiner.parameters(), want[2:]):          # already there, before backward
        assert rel(p.grad, b) <= 1e-5
    loss.backward()
    assert rel(enc.grad, want[0]) <= 1e-5 and rel(pred.grad, want[1]) <= 1e-5
    for p, b in zip(joiner.parameters(), want[2:]):          # not doubled by backward
        assert rel(p.grad, b) <= 1e-5
    loss = samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl, reduction="sum",
                                accumulate_joiner_grads=True)
    with pytest.warns(UserWarning, match="grad_output"):
        (2 * loss).backward()
    with pytest.raises(ValueError, match="accumulate_joiner_grads"):
        samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl, reduction="none",
                             accumulate_joiner_grads=True)


# ---------------------------------------------------------------------------------- chunking
def test_plan_chunks_sorts_and_respects_budget():
    T, U, V = [10, 40, 12, 40, 11, 3], [2, 8, 3, 7, 2, 1], 16
    one = chunk_bytes(1, 40, 8, V)
    chunks = plan_chunks(T, U, V, max_chunk_bytes=one)
    assert chunks[0] == [1] and chunks[1] == [3]             # longest first, alone
    for c in chunks:
        if len(c) > 1:
            assert chunk_bytes(len(c), max(T[i] for i in c), max(U[i] for i in c), V) <= one
    assert sorted(i for c in chunks for i in c) == list(range(6))
    assert len(plan_chunks(T, U, V, max_chunk_bytes=1)) == 6  # too small: one sample per call
    assert len(plan_chunks(T, U, V)) == 1                     # default 64 MiB: all together


# ---------------------------------------------------------------------------------- errors
def _bad_cases():
    B, T, U, V = 2, 5, 3, 6
    lg = torch.randn(B, T, U + 1, V)
    tg = torch.tensor([[1, 2, 3], [4, 5, 1]])
    el, tl = torch.tensor([5, 4]), torch.tensor([3, 2])
    return [
        ("logit_lengths", dict(logit_lengths=torch.tensor([6, 4]))),
        ("logit_lengths", dict(logit_lengths=torch.tensor([0, 4]))),
        ("target_lengths", dict(target_lengths=torch.tensor([4, 2]))),
        ("blank", dict(targets=torch.tensor([[1, 0, 3], [4, 5, 1]]))),
        ("targets", dict(targets=torch.tensor([[1, 2, 3], [4, 6, 1]]))),
        ("logit_lengths", dict(logit_lengths=torch.tensor([5.0, 4.0]))),
        ("logits", dict(logits=lg.long())),
        ("device", dict(target_lengths=tl.to("meta"))),
        ("empty", dict(logits=lg[:0], targets=tg[:0], logit_lengths=el[:0], target_lengths=tl[:0])),
        ("targets", dict(targets=tg[:, :2])),
        ("target_lengths", dict(target_lengths=torch.tensor([3, 2, 1]))),
        ("reduction", dict(reduction="avg")),
        ("blank", dict(blank=6)),
    ], dict(logits=lg, targets=tg, logit_lengths=el, target_lengths=tl)


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
@pytest.mark.parametrize("fn", [rnnt_loss_batched, rnnt_loss_reference, "samplewise"])
def test_argument_errors_name_the_argument(fn, case):
    (name, change), good = _bad_cases()[0][case], _bad_cases()[1]
    kw = {**good, **change}
    if fn == "samplewise":
        B, T, U1, V = kw["logits"].shape if kw["logits"].dim() == 4 else (2, 5, 4, 6)
        if not kw["logits"].is_floating_point():
            pytest.skip("samplewise takes no logits")
        joiner = TinyJoiner(4, 8, V)
        enc, pred = torch.randn(B, T, 4), torch.randn(B, U1, 4)
        kw.pop("logits")
        kw["enc_lengths"] = kw.pop("logit_lengths")
        name = "enc_lengths" if name == "logit_lengths" else name
        call = lambda: samplewise_rnnt_loss(joiner, enc, pred, **kw)   # noqa: E731
    else:
        call = lambda: fn(**kw)                                          # noqa: E731
    with pytest.raises((ValueError, TypeError), match=name):
        call()


def test_samplewise_specific_errors():
    joiner, enc, pred, targets, el, tl = problem()
    with pytest.raises(ValueError, match="pred_out"):
        samplewise_rnnt_loss(joiner, enc, pred[:3], targets, el, tl)
    with pytest.raises(ValueError, match="targets"):
        samplewise_rnnt_loss(joiner, enc, pred[:, :3], targets, el, tl)
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl, max_chunk_bytes=0)
    with pytest.raises(ValueError, match="joiner"):
        samplewise_rnnt_loss(lambda e, p: joiner(e, p)[:, :, :1], enc, pred, targets, el, tl)
    with pytest.raises(TypeError, match="enc_out"):
        samplewise_rnnt_loss(joiner, enc.long(), pred, targets, el, tl)


# ---------------------------------------------------------------------------------- memory
def _peak_ratio(B, T, U, V, max_chunk_bytes):
    from memlab.bench.transducer import make_problem, measure_peak
    prob = make_problem(B, T, U, V)
    bat = measure_peak("batched", prob)
    sw = measure_peak("samplewise", prob, max_chunk_bytes)
    return sw, bat


def test_samplewise_peak_is_a_fraction_of_batched():
    # Scaled down from B=32, T=200, U=40, V=512 (torchaudio's CPU loss alone takes ~15 s there on
    # 2 shared cores); same B and V, groups of two samples. Full size: the slow test below.
    B, T, U, V = 32, 50, 10, 512
    sw, bat = _peak_ratio(B, T, U, V, chunk_bytes(2, T, U, V))
    assert sw["chunks"] == 16
    assert sw["peak_bytes"] <= 0.15 * bat["peak_bytes"], (sw, bat)
    from memlab.bench.transducer import estimate_bytes    # the analytic model run_paper uses
    for m, got in (("batched", bat), ("samplewise", sw)):
        est = estimate_bytes(m, B, T, U, V, max_chunk_bytes=chunk_bytes(2, T, U, V))
        assert 0.75 <= est / got["peak_bytes"] <= 1.25, (m, est, got)


@pytest.mark.slow
def test_samplewise_peak_full_size():
    sw, bat = _peak_ratio(32, 200, 40, 512, None)              # default 64 MiB budget
    assert sw["peak_bytes"] <= 0.15 * bat["peak_bytes"], (sw, bat)


def test_bench_rows():
    from memlab.bench.transducer import run, run_paper
    rows = run(fast=True)
    assert [r["method"] for r in rows] == ["batched", "samplewise", "pruned", "samplewise-pruned"]
    for r in rows:
        assert r["peak_bytes"] > 0 and r["time_s"] > 0 and r["estimated"] is False
    by = {r["method"]: r for r in rows}
    assert by["batched"]["loss"] == pytest.approx(by["samplewise"]["loss"], rel=1e-5)
    assert by["pruned"]["loss"] == pytest.approx(by["samplewise-pruned"]["loss"], rel=1e-5)
    assert by["pruned"]["s_range"] == 5 and by["samplewise"]["s_range"] is None
    assert run(fast=True, methods=("batched", "samplewise"), repeats=0)[1]["method"] == "samplewise"
    with pytest.raises(ValueError, match="methods must start with 'batched'"):
        run(fast=True, methods=("pruned",))
    # the paper's 40 s utterances at 64 of its 1024 (the full batch: test_estimate_asr, slow)
    paper = {r["method"]: r for r in run_paper(device="cpu", batch_size=64)}
    assert paper["batched"]["estimated"] and paper["samplewise"]["estimated"]
    assert paper["batched"]["T"] == 1000 and paper["batched"]["batch_size"] == 64
    assert paper["samplewise"]["peak_bytes"] < 6 * 2**30 < paper["batched"]["peak_bytes"]


# ---------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agreement():
    joiner, enc, pred, targets, el, tl = problem(B=8, T=30, U=8, V=33)
    dev = torch.device("cuda")
    joiner.to(dev)
    enc = enc.detach().to(dev).requires_grad_()
    pred = pred.detach().to(dev).requires_grad_()
    prob = (joiner, enc, pred, targets.to(dev), el.to(dev), tl.to(dev))
    bat_loss, bat_g = run("batched", *prob)
    sw_loss, sw_g = run("samplewise", *prob, max_chunk_bytes=chunk_bytes(2, 30, 8, 33))
    ref_loss, _ = run("reference64", *prob)
    assert rel(sw_loss, bat_loss) <= 1e-5 and rel(ref_loss, bat_loss) <= 1e-5
    for a, b in zip(sw_g, bat_g):
        assert rel(a, b) <= 1e-4   # TF32 matmuls may be on


def test_bench_memory_only_and_budget_sweep():
    from memlab.bench.transducer import budget_sweep, run
    rows = run(fast=True, repeats=0)
    assert all(r["time_s"] is None and r["peak_bytes"] > 0 for r in rows)
    with pytest.raises(ValueError, match="repeats"):
        run(fast=True, repeats=-1)
    rows = budget_sweep(4, 2.0, 32, (1, 2, 4), repeats=0)
    assert [r["method"] for r in rows] == ["batched"] + ["samplewise"] * 3
    assert [r["chunks"] for r in rows[1:]] == [4, 2, 1]
    peaks = [r["peak_bytes"] for r in rows[1:]]
    assert peaks == sorted(peaks) and peaks[0] < rows[0]["peak_bytes"]   # bigger groups, more memory
    with pytest.raises(ValueError, match="group_sizes"):
        budget_sweep(4, 2.0, 32, (8,), repeats=0)


def test_loss_memory_calculator():
    from memlab.bench.transducer import estimate_bytes, loss_memory
    m = loss_memory(32, 8.0, 512)
    assert (m["T"], m["U"]) == (200, 40)
    assert m["logits_bytes"] == m["gradient_bytes"] == 32 * 200 * 41 * 512 * 4
    assert m["batched_bytes"] == estimate_bytes("batched", 32, 200, 40, 512)
    assert m["samplewise_bytes"] == estimate_bytes("samplewise", 32, 200, 40, 512)
    assert m["group_bytes"] == chunk_bytes(m["group_size"], 200, 40, 512)
    assert m["ratio"] > 10
    paper = loss_memory(1024, 40.0, 1024)
    assert paper["samplewise_bytes"] < 6 * 2**30 < paper["logits_bytes"]
    with pytest.raises(ValueError, match="seconds"):
        loss_memory(32, 0, 512)
    with pytest.raises(ValueError, match="batch_size"):
        loss_memory(0, 8.0, 512)


# ---------------------------------------------------------------------------------- fused path
def test_samplewise_fp64_matches_reference_tightly():
    joiner, enc, pred, targets, el, tl = problem(seed=8)
    joiner.double()
    enc = enc.detach().double().requires_grad_()
    pred = pred.detach().double().requires_grad_()
    prob = (joiner, enc, pred, targets, el, tl)
    for reduction in ("mean", "sum"):
        ref_loss, ref_g = run("reference", *prob, reduction=reduction)
        sw_loss, sw_g = run("samplewise", *prob, reduction=reduction,
                            max_chunk_bytes=chunk_bytes(2, 12, 5, 9))
        assert rel(sw_loss, ref_loss) <= 1e-12
        for a, b in zip(sw_g, ref_g):
            assert rel(a, b) <= 1e-10


def test_samplewise_kernel_and_torch_lattice_agree(monkeypatch):
    prob = problem(seed=9)
    stats = {}
    k_loss, k_g = run("samplewise", *prob, stats=stats)
    assert stats["in_place"] == [True]                  # TinyJoiner ends in a Linear
    monkeypatch.setenv("MEMLAB_CPU_KERNEL", "0")        # the torch code (as on CUDA)
    t_loss, t_g = run("samplewise", *prob)
    assert rel(k_loss, t_loss) <= 1e-6
    for a, b in zip(k_g, t_g):
        assert rel(a, b) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_samplewise_low_precision_joiner(dtype):
    joiner, enc, pred, targets, el, tl = problem(seed=10)
    joiner.to(dtype)
    enc = enc.detach().to(dtype).requires_grad_()
    pred = pred.detach().to(dtype).requires_grad_()
    loss = samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl, reduction="sum")
    assert loss.dtype == dtype
    got = torch.autograd.grad(loss, [enc, pred, *joiner.parameters()])
    logits = joiner(enc, pred).float()                  # the same logits, fp32 reference
    want_loss = rnnt_loss_reference(logits, targets, el, tl, reduction="sum")
    want = torch.autograd.grad(want_loss, [enc, pred, *joiner.parameters()])
    assert rel(loss.float(), want_loss) <= 1e-2
    for a, b in zip(got, want):
        assert rel(a, b) <= 3e-2
