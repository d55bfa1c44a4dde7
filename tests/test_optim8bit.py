"""memlab.optim: SGD8bit, Adam8bit, AdamW8bit."""

import copy
import io

import pytest
import torch

import memlab.optim as mo
from memlab.bench.curves import mlp as _mlp, regression_data as _data, train
from memlab.optim import SGD8bit, Adam8bit, AdamW8bit

BIG = 10 ** 9   # min_8bit_size that keeps every state fp32


pytestmark = pytest.mark.usefixtures("one_thread")


X, Y = _data()


def _train(model, opt, steps, sched=None, batch=None):
    return train(model, opt, steps, sched, batch, (X, Y))


def _same(m1, m2):
    return all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


# ---------------------------------------------------------------------------------------------
# the fp32 path is torch's update, bit for bit


@pytest.mark.parametrize("ours,theirs", [
    (lambda p: Adam8bit(p, lr=3e-3, weight_decay=1e-2, min_8bit_size=BIG),
     lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-2, foreach=False)),
    (lambda p: AdamW8bit(p, lr=3e-3, min_8bit_size=BIG),
     lambda p: torch.optim.AdamW(p, lr=3e-3, foreach=False)),
    (lambda p: Adam8bit(p, lr=3e-3, maximize=True, min_8bit_size=BIG),
     lambda p: torch.optim.Adam(p, lr=3e-3, maximize=True, foreach=False)),
    (lambda p: SGD8bit(p, lr=0.05, weight_decay=1e-3, dampening=0.1, min_8bit_size=BIG),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, dampening=0.1,
                               foreach=False)),
    (lambda p: SGD8bit(p, lr=0.05, nesterov=True, min_8bit_size=BIG),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, foreach=False)),
    (lambda p: SGD8bit(p, lr=0.05, momentum=0.0, min_8bit_size=BIG),
     lambda p: torch.optim.SGD(p, lr=0.05, foreach=False)),
])
def test_fp32_state_path_equals_torch(ours, theirs):
    m1, m2 = _mlp(32), _mlp(32)
    _train(m1, ours(m1.parameters()), 30)
    _train(m2, theirs(m2.parameters()), 30)
    assert _same(m1, m2)


# ---------------------------------------------------------------------------------------------
# memory


def _storage_bytes(opt, params):
    seen, total = set(), 0
    for p in params:
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                total += v.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("make,limit", [(lambda p: Adam8bit(p), 2.04),
                                        (lambda p: AdamW8bit(p), 2.04),
                                        (lambda p: SGD8bit(p, lr=0.1), 1.02)])
def test_state_bytes_per_param(make, limit):
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(256, 64), (100, 300), (4096,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    opt.step()
    numel = sum(p.numel() for p in params)
    assert _storage_bytes(opt, params) / numel <= limit
    assert opt.state_nbytes() == _storage_bytes(opt, params)
    for p in params:
        dtypes = {k: v.dtype for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        assert dtypes and all(d == (torch.uint8 if k.endswith("_codes") else torch.float32)
                              for k, d in dtypes.items())


def test_small_tensors_keep_fp32_state():
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(4095))
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt = Adam8bit([big, small])                  # min_8bit_size=4096
    opt.step()
    assert set(opt.state[big]) == {"step", "exp_avg_codes", "exp_avg_absmax",
                                   "exp_avg_sq_codes", "exp_avg_sq_absmax"}
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    assert opt.state[small]["exp_avg"].shape == small.shape


# ---------------------------------------------------------------------------------------------
# training behaviour


@pytest.mark.parametrize("ours,theirs", [
    (lambda p: Adam8bit(p, lr=3e-3, min_8bit_size=0), lambda p: torch.optim.Adam(p, lr=3e-3)),
    (lambda p: SGD8bit(p, lr=0.1, min_8bit_size=0),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
])
def test_loss_curve_within_5_percent_of_fp32(ours, theirs):
    """Every state in 8 bits (min_8bit_size=0); 200 full-batch steps of an MLP regression."""
    m1, m2 = _mlp(), _mlp()
    ref = _train(m1, theirs(m1.parameters()), 200)
    got = _train(m2, ours(m2.parameters()), 200)
    assert got[-1] < 0.2 * ref[0]                 # it learns
    dev = ((got - ref).abs() / ref).max().item()
    assert dev < 0.05, dev


@pytest.mark.parametrize("make", [
    lambda p: Adam8bit(p, lr=3e-3, min_8bit_size=1024),
    lambda p: AdamW8bit(p, lr=3e-3, min_8bit_size=1024, block_size=128),
    lambda p: SGD8bit(p, lr=0.05, nesterov=True, min_8bit_size=1024),
])
def test_resume_is_bit_for_bit(make):
    def sched(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    m_ref = _mlp()
    o_ref = make(m_ref.parameters())
    s_ref = sched(o_ref)
    _train(m_ref, o_ref, 25, s_ref, batch=True)

    m_a = _mlp()
    o_a = make(m_a.parameters())
    s_a = sched(o_a)
    _train(m_a, o_a, 10, s_a, batch=True)
    buf = io.BytesIO()
    torch.save({"model": m_a.state_dict(), "opt": o_a.state_dict(), "sched": s_a.state_dict()},
               buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    m_b = _mlp(seed=123)                          # fresh model + optimizer, then load
    m_b.load_state_dict(ckpt["model"])
    o_b = make(m_b.parameters())
    s_b = sched(o_b)
    o_b.load_state_dict(ckpt["opt"])
    s_b.load_state_dict(ckpt["sched"])
    for st in o_b.state.values():
        for k, v in st.items():
            if k.endswith("_codes"):
                assert v.dtype == torch.uint8
    # the batches continue where the first run stopped
    losses = []
    for i in range(10, 25):
        xb, yb = X[i % 8::8], Y[i % 8::8]
        o_b.zero_grad()
        loss = ((m_b(xb) - yb) ** 2).mean()
        loss.backward()
        o_b.step()
        s_b.step()
        losses.append(loss.item())
    assert _same(m_ref, m_b)


def test_lr_scheduler_drives_the_update():
    """A LambdaLR run equals one where the lr is written into the group by hand."""
    def lam(i):
        return 1.0 / (1 + i)
    m1, m2 = _mlp(), _mlp()
    o1, o2 = Adam8bit(m1.parameters(), lr=1e-2, min_8bit_size=0), \
        Adam8bit(m2.parameters(), lr=1e-2, min_8bit_size=0)
    s1 = torch.optim.lr_scheduler.LambdaLR(o1, lam)
    for i in range(12):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            ((m(X[:256]) - Y[:256]) ** 2).mean().backward()
        o2.param_groups[0]["lr"] = 1e-2 * lam(i)
        o1.step()
        o2.step()
        s1.step()
    assert _same(m1, m2)
    assert o1.param_groups[0]["lr"] == pytest.approx(1e-2 / 13)


def test_param_groups_with_different_lrs():
    m = _mlp()
    first, rest = list(m[0].parameters()), list(m[2].parameters()) + list(m[4].parameters())
    before = [p.detach().clone() for p in m.parameters()]
    opt = SGD8bit([{"params": first, "lr": 0.0}, {"params": rest}], lr=0.1, min_8bit_size=0)
    _train(m, opt, 3)
    after = list(m.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before[:2], after[:2]))       # lr 0: frozen
    assert not any(torch.equal(a, b) for a, b in zip(before[2:], after[2:]))
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": -1.0})
    assert len(opt.param_groups) == 2


def test_chunking_does_not_change_the_result(monkeypatch):
    torch.manual_seed(0)
    p0 = torch.randn(3000 * 7 + 5)
    grads = [torch.randn_like(p0) * 10 ** (i % 3) for i in range(4)]

    def run(chunk):
        monkeypatch.setattr(mo, "CPU_CHUNK", chunk)
        p = torch.nn.Parameter(p0.clone())
        opt = Adam8bit([p], lr=1e-2, block_size=64, compile=False)   # the chunked eager path
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt.state[p]["exp_avg_codes"]
    a, b = run(10 ** 9), run(1000)              # whole tensor vs chunks of 960
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_grad_none_zero_grad_and_closure():
    a, b = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    b0 = b.detach().clone()
    opt = Adam8bit([a, b], lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (a ** 2).sum()
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert calls and torch.is_tensor(loss)
    assert torch.equal(b, b0) and len(opt.state[b]) == 0       # grad None: skipped, no state
    a1 = a.detach().clone()
    a.grad = torch.zeros_like(a)                               # zero grad: momentum carries on
    opt.step()
    assert bool(torch.isfinite(a).all()) and not torch.equal(a, a1)


def test_non_finite_gradient_stays_in_its_block():
    p = torch.nn.Parameter(torch.randn(4 * 256))
    opt = Adam8bit([p], lr=1e-2, min_8bit_size=0)
    p.grad = torch.randn_like(p)
    opt.step()
    g = torch.randn_like(p)
    g[300] = float("nan")                                      # block 1
    p.grad = g
    opt.step()
    assert torch.isnan(p[300]) and int(torch.isnan(p).sum()) == 1   # as torch: only that element
    p.grad = torch.randn_like(p)
    opt.step()
    bad = ~torch.isfinite(p.detach())
    assert bad[256:512].all() and not bad[:256].any() and not bad[512:].any()
    absmax = opt.state[p]["exp_avg_absmax"]
    assert torch.isfinite(absmax[[0, 2, 3]]).all() and not torch.isfinite(absmax[1])


def test_bad_hyperparameters_raise():
    ps = [torch.nn.Parameter(torch.zeros(3))]
    cases = [
        (lambda: Adam8bit(ps, lr=-1), "lr"),
        (lambda: Adam8bit(ps, betas=(1.0, 0.999)), "betas"),
        (lambda: Adam8bit(ps, betas=(0.9,)), "betas"),
        (lambda: Adam8bit(ps, eps=0), "eps"),
        (lambda: AdamW8bit(ps, weight_decay=-0.1), "weight_decay"),
        (lambda: Adam8bit(ps, block_size=0), "block_size"),
        (lambda: Adam8bit(ps, min_8bit_size=-1), "min_8bit_size"),
        (lambda: Adam8bit(ps, maximize=1), "maximize"),
        (lambda: SGD8bit(ps, lr=float("nan")), "lr"),
        (lambda: SGD8bit(ps, lr=0.1, momentum=1.5), "momentum"),
        (lambda: SGD8bit(ps, lr=0.1, dampening=2), "dampening"),
        (lambda: SGD8bit(ps, lr=0.1, nesterov=True, dampening=0.5), "nesterov"),
        (lambda: SGD8bit(ps, lr=0.1, compile="yes"), "compile"),
    ]
    for make, name in cases:
        with pytest.raises(ValueError, match=name):
            make()
    with pytest.raises(TypeError, match="floating-point"):
        Adam8bit([torch.zeros(3, dtype=torch.long)])


def test_registry_factories():
    from memlab.registry import get
    m = _mlp()
    for name, cls in (("sgd8bit", SGD8bit), ("adam8bit", Adam8bit), ("adamw8bit", AdamW8bit)):
        assert isinstance(get("optimizer", name).factory(m, lr=1e-3, weight_decay=0.0), cls)


def _compare_runs(make_a, make_b, steps=15, dev_b="cpu"):
    """Train the same MLP with two optimizers; return (max param diff, loss curves)."""
    m_a = _mlp(64)
    m_b = copy.deepcopy(m_a).to(dev_b)
    o_a, o_b = make_a(m_a.parameters()), make_b(m_b.parameters())
    x, y = X[:512], Y[:512]
    la, lb = [], []
    for _ in range(steps):
        for m, o, dev, ls in ((m_a, o_a, "cpu", la), (m_b, o_b, dev_b, lb)):
            o.zero_grad()
            loss = ((m(x.to(dev)) - y.to(dev)) ** 2).mean()
            loss.backward()
            o.step()
            ls.append(loss.item())
    diff = max((a - b.cpu()).abs().max().item() for a, b in zip(m_a.parameters(), m_b.parameters()))
    return diff, torch.tensor(la), torch.tensor(lb), o_b


MAKERS = [lambda p, **k: Adam8bit(p, lr=3e-3, min_8bit_size=1024, **k),
          lambda p, **k: AdamW8bit(p, lr=3e-3, min_8bit_size=1024, **k),
          lambda p, **k: SGD8bit(p, lr=0.1, min_8bit_size=1024, **k)]


@pytest.mark.slow
@pytest.mark.parametrize("make", MAKERS)
def test_compiled_step_traces_and_agrees_with_eager(make):
    """The torch.compile path (CUDA's default) in one graph, checked on CPU (~1 min compile)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # a fallback to eager would warn: fail instead
        diff, la, lb, opt = _compare_runs(lambda p: make(p, compile=False),
                                          lambda p: make(p, compile=True), steps=8)
    assert opt._compiled.get("cpu") is not None
    assert diff < 5e-3 and ((la - lb).abs() / la).max() < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("compile", [False, None])
def test_cuda_matches_cpu(make, compile):
    diff, la, lb, opt = _compare_runs(lambda p: make(p), lambda p: make(p, compile=compile),
                                      steps=20, dev_b="cuda")
    # same math; different float rounding can flip a few 8-bit codes, so not bit-exact
    assert diff < 1e-2 and ((la - lb).abs() / la).max() < 0.02
    if compile is None:
        assert opt._compiled.get("cuda") is not None       # compiled, no fallback
    st = opt.state[next(iter(opt.state))]
    assert any(v.dtype == torch.uint8 and v.is_cuda for v in st.values()
               if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------------------------------------
# the fused CPU kernel (memlab._cpu_kernels) against the eager torch path


def _needs_kernel():
    from memlab import _cpu_kernels
    if not _cpu_kernels.available():
        pytest.skip("no C compiler: the fused CPU kernel is unavailable (eager path is used)")


def test_fused_kernel_is_the_cpu_default_when_a_compiler_exists():
    import shutil
    from memlab import _cpu_kernels
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    assert _cpu_kernels.available()
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn_like(p)
    opt = Adam8bit([p])
    assert opt._fused_ok(p, opt._prepare(p, opt.state[p], opt.param_groups[0])[0])
    assert not Adam8bit([p], compile=False)._fused_ok(p, [])


def _variants(min_size):
    """Every update rule the fused kernel implements (L2 and decoupled decay, a small block,
    low beta1 and maximize, dampening, nesterov)."""
    return [
        lambda p, **k: Adam8bit(p, lr=3e-3, weight_decay=1e-2, min_8bit_size=min_size, **k),
        lambda p, **k: AdamW8bit(p, lr=3e-3, weight_decay=0.1, min_8bit_size=min_size,
                                 block_size=64, **k),
        lambda p, **k: Adam8bit(p, lr=3e-3, betas=(0.3, 0.99), maximize=True,
                                min_8bit_size=min_size, **k),
        lambda p, **k: SGD8bit(p, lr=0.05, weight_decay=1e-3, dampening=0.2,
                               min_8bit_size=min_size, **k),
        lambda p, **k: SGD8bit(p, lr=0.05, nesterov=True, min_8bit_size=min_size, **k),
        lambda p, **k: SGD8bit(p, lr=1e-3, maximize=True, min_8bit_size=min_size, **k)]


@pytest.mark.parametrize("make", _variants(0))
def test_fused_kernel_matches_eager_step(make):
    """Same math as the eager functions, rounding for rounding (torch's fused multiply-adds
    reproduced with fmaf, a correctly rounded sqrt on both sides): the same bits."""
    _needs_kernel()
    diff, la, lb, opt = _compare_runs(lambda p: make(p, compile=False), lambda p: make(p),
                                      steps=25)
    assert diff == 0, diff
    assert torch.equal(la, lb)
    torch.manual_seed(3)
    p0, g = torch.randn(10_000), torch.randn(10_000)
    pa, pb = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    oa, ob = make([pa], compile=False), make([pb])
    for _ in range(3):
        pa.grad, pb.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        g = torch.randn(10_000) * 0.1
    assert torch.equal(pa, pb)
    for k, v in oa.state[pa].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, ob.state[pb][k]), k


@pytest.mark.parametrize("make", _variants(1024))
@pytest.mark.parametrize("threads", [1, 2])
def test_one_call_per_group_gives_the_per_tensor_bits(make, threads, monkeypatch):
    """The default CPU step runs a group's 8-bit tensors in one C call (the blocks of all of them
    split over the threads) and its small fp32-state tensors in torch._foreach_* calls; the
    per-tensor eager step (compile=False) gives the same bits: parameters, states, losses. Two
    groups, a parameter without a gradient, and tensors that joined at different steps (other
    step counts) included."""
    from memlab import _cpu_kernels, _foreach_steps
    _needs_kernel()
    monkeypatch.setattr(_cpu_kernels, "MIN_PER_THREAD", 1000)
    calls = {"many": 0, "foreach": 0}
    for mod, name, key in ((_cpu_kernels, "adam8bit_many", "many"),
                           (_cpu_kernels, "sgd8bit_many", "many"),
                           (_foreach_steps, "adam", "foreach"), (_foreach_steps, "sgd", "foreach")):
        real = getattr(mod, name)

        def counted(*a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    torch.manual_seed(0)
    shapes = [(64, 48), (64,), (40, 64), (40,), (3000,), (7,), (1, 2049)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * (k + 1) for s in shapes] for k in range(4)]
    finals = []
    torch.set_num_threads(threads)
    try:
        for compile in (False, None):
            ps = [torch.nn.Parameter(x.clone()) for x in init]
            opt = make([{"params": ps[:4]}, {"params": ps[4:]}], compile=compile)
            for k, gs in enumerate(grads):
                for i, (p, g) in enumerate(zip(ps, gs)):
                    p.grad = None if (k == 0 and i in (2, 5)) or i == 6 and k == 2 else g.clone()
                opt.step()
            finals.append((ps, opt))
    finally:
        torch.set_num_threads(1)
    (pa, oa), (pb, ob) = finals
    assert calls["many"] > 0 and calls["foreach"] > 0
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            va, vb = sa[k], sb[k]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, k


def test_fused_kernel_threads_give_the_same_bits(monkeypatch):
    from memlab import _cpu_kernels
    _needs_kernel()
    monkeypatch.setattr(_cpu_kernels, "MIN_PER_THREAD", 1000)
    torch.manual_seed(0)
    p0 = torch.randn(256 * 97 + 13)
    grads = [torch.randn_like(p0) for _ in range(3)]

    def run(threads):
        torch.set_num_threads(threads)
        p = torch.nn.Parameter(p0.clone())
        opt = Adam8bit([p], lr=1e-2)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt.state[p]
    a, sa = run(1)
    b, sb = run(3)
    torch.set_num_threads(1)
    assert torch.equal(a, b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


def test_fused_kernel_threads_are_torchs_openmp_workers(monkeypatch):
    """With more than one thread the blocks go to an OpenMP team of the libgomp torch already
    loaded (torch's own workers, as at::parallel_for), not to a second pool of threads that
    would compete with torch's spinning workers after a backward; one OpenMP runtime in the
    process. Same bits as one thread, SGD and AdamW included."""
    import sys
    from memlab import _cpu_kernels
    _needs_kernel()
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch without OpenMP, or no /proc/self/maps")
    assert _cpu_kernels.threading_mode() == "openmp"
    assert len(_cpu_kernels._gomp_files()) == 1
    monkeypatch.setattr(_cpu_kernels, "MIN_PER_THREAD", 1000)
    calls = []
    monkeypatch.setattr(_cpu_kernels, "_pool", None)       # a Python pool would be created here

    torch.manual_seed(1)
    p0 = torch.randn(256 * 41 + 7)
    grads = [torch.randn_like(p0) for _ in range(3)]

    def run(make, threads):
        torch.set_num_threads(threads)
        p = torch.nn.Parameter(p0.clone())
        opt = make([p])
        for g in grads:
            p.grad = g.clone()
            opt.step()
        calls.append(_cpu_kernels._pool)
        return p.detach(), opt.state[p]
    try:
        for make in (lambda p: AdamW8bit(p, lr=1e-2, min_8bit_size=0),
                     lambda p: SGD8bit(p, lr=0.1, momentum=0.9, min_8bit_size=0)):
            a, sa = run(make, 1)
            b, sb = run(make, 2)
            assert torch.equal(a, b)
            assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
    finally:
        torch.set_num_threads(1)
    assert calls == [None] * 4                               # no Python pool was started


def test_tiny_absmax_block_is_divided_on_both_paths():
    """The states are normalised by multiplying with 1 / absmax (a division per element cost
    more than the rest of the encoder); where that reciprocal overflows (a block whose absmax is
    below ~2.9e-39, e.g. the momentum of a parameter whose gradients are ~1e-39) both paths
    divide instead: the same codes, and the block decodes to its values (not NaN or 0)."""
    _needs_kernel()
    n = 64 * 8
    p0 = torch.randn(n)
    g = torch.randn(n)
    g[:64] *= 1e-41                    # block 0: subnormal momentum, 1 / absmax = inf
    g[64:128] = 0.0                    # block 1: all zero
    res = []
    for compile in (False, None):
        p = torch.nn.Parameter(p0.clone())
        opt = SGD8bit([p], lr=0.1, momentum=0.9, min_8bit_size=0, block_size=64, compile=compile)
        for k in range(3):
            p.grad = g * (1 + k)
            opt.step()
        res.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()
                                          if isinstance(v, torch.Tensor)}))
    (pa, sa), (pb, sb) = res
    assert torch.equal(pa, pb)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    absmax = next(v for k, v in sa.items() if k.endswith("_absmax"))
    assert 0 < absmax[0] < 2.9e-39 and absmax[1] == 0
    codes = next(v for k, v in sa.items() if k.endswith("_codes"))
    assert codes[:64].float().std() > 1                      # not all one code

def test_fused_kernel_bumps_the_version_counter():
    """Writes through raw pointers are announced to autograd, so a backward through a graph that
    saved the parameter before step() still raises, as it does with torch's optimizers."""
    _needs_kernel()
    p = torch.nn.Parameter(torch.randn(64, 64))
    loss = (p * p).sum()                      # saves p for backward
    p.grad = torch.randn_like(p)
    Adam8bit([p]).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bench_optim_rows():
    """`memlab bench optim` (fast): every row present and the memory / error facts hold; the
    timings are reported, not asserted (speed claims live in the benchmark)."""
    from memlab.bench import optim as study
    rows = study.run(fast=True, repeats=2, threads=1)
    by = {(r["measure"], r["subject"]): r for r in rows}
    assert by["state_bytes_per_param", "sgd8bit"]["value"] <= 1.02
    assert by["state_bytes_per_param", "adam8bit"]["value"] <= 2.04
    for name in ("sgd8bit", "sgd8bit-eager", "adam8bit", "adam8bit-eager", "adam4bit"):
        r = by["step_time", name]
        assert r["value"] > 0 and r["reference_value"] > 0 and r["device"] == "cpu"
    assert by["step_time", "adam8bit-eager"]["path"] == "eager"
    from memlab import _q4_kernel
    assert by["step_time", "adam4bit"]["path"] == ("fused-c" if _q4_kernel.library() is not None
                                                   else "eager")
    from memlab import _cpu_kernels
    assert by["step_time", "adam8bit"]["path"] == ("fused-c" if _cpu_kernels.available()
                                                   else "eager")
    for state in ("exp_avg", "exp_avg_sq"):
        assert by["quant_error", f"{state} dynamic block256"]["ratio"] < 1   # beats linear
    drift = [r for r in rows if r["measure"] == "drift_to_fp32"]
    assert {(r["subject"], r["sigma"]) for r in drift} >= {
        ("adam8bit", 0.5), ("adam8bit", 1.5), ("adam8bit-eager", 1.5)}
    assert all(r["zero_fraction"] == 0 for r in drift if r["subject"].startswith("adam8bit"))
    four = [r for r in rows if r["measure"] == "state_bytes_per_param" and r["subject"] == "adam4bit"]
    assert four and four[0]["value"] <= 1.07                   # 4-bit Adam: <= 1.07 B/param
    assert all(r["zero_fraction"] == 0 for r in drift if r["subject"] == "adam4bit")


@pytest.mark.parametrize("make", [
    lambda p: Adam8bit(p, lr=1e-2, weight_decay=1e-2, min_8bit_size=0),
    lambda p: Adam8bit(p, lr=1e-2, weight_decay=1e-2),                 # small: fp32 states
    lambda p: SGD8bit(p, lr=1e-2, weight_decay=1e-2, min_8bit_size=0),
])
def test_float64_params_with_l2_weight_decay_step(make):
    """Found by tests/test_properties.py: g + wd * p promoted to float64 and lerp_ into the
    float32 working state raised 'expected dtype float for `end`'."""
    p = torch.nn.Parameter(torch.randn(300, dtype=torch.float64))
    p.grad = torch.randn(300, dtype=torch.float64)
    before = p.detach().clone()
    make([p]).step()
    assert p.dtype == torch.float64 and not torch.equal(p.detach(), before)


def test_fast_encoder_matches_the_codebook_on_every_midpoint_and_neighbour():
    """The kernels' compact table + vector search gives the codes of ``_Codebook.encode`` (and
    the zero rule): every midpoint and its 8 neighbours each side, every 16-bit key boundary in
    [-1, 1], and random values (the full check over all 2^31 floats in [-1, 1] was run once)."""
    import ctypes
    from memlab import _cpu_kernels
    from memlab.quant import _state_book
    _needs_kernel()
    lib = _cpu_kernels.library()
    for signed in (True, False):
        book = _state_book(signed, torch.device("cpu"))
        tab = _cpu_kernels.enc_table(book)
        assert tab is not None
        mids = book.mid.view(torch.int32)                                   # (255,)
        near = (mids[:, None] + torch.arange(-8, 9, dtype=torch.int32)).reshape(-1)
        keys = torch.arange(0, 0x3F81, dtype=torch.int32) << 16             # key boundaries
        edges = torch.cat([keys, keys - 1, keys | 0xFFFF]).clamp(0, 0x3F800000)
        rand = torch.rand(1 << 16, generator=torch.Generator().manual_seed(0)).view(torch.int32)
        tiny = torch.tensor([0, 1, 0x7FFFFF, 0x800000, 0x33800000, 0x33FFFFFF], dtype=torch.int32)
        pos = torch.cat([near.clamp(0, 0x3F800000), edges, rand, tiny])
        xn = torch.cat([pos.view(torch.float32), -pos.view(torch.float32)])  # both signs, -0.0
        xn = torch.cat([xn, xn[: (-xn.numel()) % 16]])                      # len % 16 == 0
        keep = -1 if signed else book.zero_index
        ref = torch.empty(xn.numel(), dtype=torch.uint8)
        book.encode(xn, ref)
        if keep >= 0:
            ref.add_((ref == keep) & (xn > 0))
        out = torch.empty_like(ref)
        if lib.memlab_encode_fast(xn.data_ptr(), xn.numel(), out.data_ptr(), tab.data_ptr(),
                                  ctypes.c_int32(keep)) != 0:
            pytest.skip("kernel built without AVX-512 VBMI: the vector encoder is not compiled")
        assert torch.equal(out, ref)


@pytest.mark.parametrize("make", [
    lambda p, **k: Adam8bit(p, lr=1e-2, min_8bit_size=0, **k),
    lambda p, **k: SGD8bit(p, lr=0.05, min_8bit_size=0, **k),
])
def test_fused_kernel_matches_eager_on_zeros_subnormals_and_huge_values(make):
    """Blocks of exact zeros, subnormal and huge gradients, and a tail block shorter than the
    vector width: the vector path and its scalar fallbacks give the eager bits."""
    _needs_kernel()
    n = 256 * 6 + 37
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))
    g[:256] = 0.0                                           # an all-zero block
    g[256:512] *= 1e-40                                     # subnormal gradients
    g[512:768] *= 1e30                                      # huge: v overflows to inf
    g[800] = -0.0
    pa, pb = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(n))
    oa, ob = make([pa], compile=False), make([pb])
    for k in range(3):
        pa.grad, pb.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        g = g.roll(1)
    same = lambda x, y: torch.equal(x.isnan(), y.isnan()) and torch.equal(  # noqa: E731
        x.nan_to_num(0.0).view(torch.int32) if x.is_floating_point() else x,
        y.nan_to_num(0.0).view(torch.int32) if y.is_floating_point() else y)
    assert same(pa.detach(), pb.detach())
    for key, v in oa.state[pa].items():
        if isinstance(v, torch.Tensor) and v.numel() > 1:
            assert same(v, ob.state[pb][key]), key


def test_bench_optim_step_rows_compare_with_torch_fused_and_foreach():
    from memlab.bench import optim as study
    rows = study.step_times(fast=True, repeats=1, threads=1)
    by = {r["subject"]: r for r in rows}
    r = by["adam8bit"]
    assert r["reference"] in ("adam(fused)", "adam(foreach)")
    assert r["foreach_value"] > 0 and r["fused_vs_foreach"] > 0
    assert r["range"][0] <= r["value"] <= r["range"][1]
    assert abs(sum(torch.Size(s).numel() for s in study._big_shapes()) - 33e6) < 0.1e6
    assert r["shapes"] == "resnet-like" and r["tensors"] == len(study._shapes(True))
    total = sum(torch.Size(s).numel() for s in study._shapes(False))   # the same work in one
    assert abs(study.ONE_TENSOR - total) < 1e-3 * total
