"""Reliability of the optimizers' bookkeeping: checked checkpoints, all-or-nothing steps, and an
estimate that measures the path the real step takes (SGD8bit / Adam8bit / AdamW8bit /
LowRankAdam)."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from memlab import _cpu_kernels
from memlab.lowrank import LowRankAdam
from memlab.memory import MemoryBudgetExceeded, MemoryMeter, estimate
from memlab.optim import Adam8bit, AdamW8bit, SGD8bit

pytestmark = pytest.mark.usefixtures("one_thread")


def _needs_kernel():
    if not _cpu_kernels.available():
        pytest.skip("no C compiler for the fused kernel")


def _mlp(dims=(64, 256, 512, 512, 256, 64, 8), seed=0):
    """Six Linear layers = 12 parameters: 8-bit weights (>= 4096), fp32 biases / small weight."""
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _grads(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, model[0].in_features, generator=g)
    model.zero_grad()
    model(x).square().mean().backward()


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                 for k, v in opt.state[p].items()}
             for i, p in enumerate(model.parameters()) if p in opt.state}
    return params, state


def _assert_same(snap_a, snap_b):
    (pa, sa), (pb, sb) = snap_a, snap_b
    assert len(pa) == len(pb)
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(a, b), f"param {i}"
    assert sa.keys() == sb.keys(), (sorted(sa), sorted(sb))
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), i
        for k in sa[i]:
            a, b = sa[i][k], sb[i][k]
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), (i, k)
            else:
                assert a == b, (i, k, a, b)


# ---------------------------------------------------------------------------------------------
# 1. load_state_dict checks everything first and changes nothing on failure


def _trained(make, dims=(64, 256, 512, 512, 256, 64, 8), steps=2):
    model = _mlp(dims)
    opt = make(model.parameters())
    for s in range(steps):
        _grads(model, seed=s)
        opt.step()
    return model, opt


@pytest.mark.parametrize("make", [
    lambda p: Adam8bit(p, lr=1e-3),
    lambda p: AdamW8bit(p, lr=1e-3, block_size=128),
    lambda p: SGD8bit(p, lr=0.1),
])
def test_load_state_dict_of_another_model_is_refused_before_anything_changes(make):
    _, src = _trained(make, dims=(64, 256, 512, 512, 256, 64, 8))
    model, opt = _trained(make, dims=(64, 128, 512, 512, 256, 64, 8))  # same count, other shapes
    before = _snapshot(model, opt)
    lrs = [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(src.state_dict())
    msg = str(err.value)
    assert "param_groups[0]" in msg and "param 0" in msg and "(128, 64)" in msg, msg
    assert "_codes" in msg and "8192" in msg and "16384" in msg, msg   # expected vs got
    _assert_same(before, _snapshot(model, opt))
    assert [g["lr"] for g in opt.param_groups] == lrs
    _grads(model)
    opt.step()                                                        # still usable


def test_torch_adam_state_dict_is_named_as_not_an_8bit_state():
    model = _mlp()
    ref = torch.optim.Adam(model.parameters())
    _grads(model)
    ref.step()
    opt = Adam8bit(model.parameters())
    with pytest.raises(ValueError, match=r"not an Adam8bit state.*block_size.*min_8bit_size"):
        opt.load_state_dict(ref.state_dict())
    assert len(opt.state) == 0 and opt.param_groups[0]["block_size"] == 256


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0], params=[])),
     "2 param groups.*1"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), "param_groups\\[0\\].*11 params.*12"),
    (lambda sd: sd["param_groups"][0].update(lr=-1.0), "param_groups\\[0\\].*lr"),
    (lambda sd: sd["param_groups"][0].update(betas=(0.9, 1.5)), "betas"),
    (lambda sd: sd["param_groups"][0].update(block_size=0), "block_size"),
    (lambda sd: sd["state"][0].update(step="3"), "param 0.*step"),
    (lambda sd: sd["state"][0].update(step=torch.ones(2)), "param 0.*step"),
    (lambda sd: sd["state"][0].update(step=-1), "param 0.*step"),
    (lambda sd: sd["state"][0].pop("exp_avg_sq_absmax"), "param 0.*exp_avg_sq"),
    (lambda sd: sd["state"][0].update(exp_avg_codes=sd["state"][0]["exp_avg_codes"].float()),
     "exp_avg_codes.*uint8.*float32"),
    (lambda sd: sd["state"][1].update(exp_avg=sd["state"][1]["exp_avg"].double()),
     "param 1.*exp_avg.*float32.*float64"),
    (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(3)), "param 1.*exp_avg.*\\(256,\\)"),
    (lambda sd: sd["state"].update({99: {"step": 1}}), "99"),
])
def test_load_state_dict_names_what_differs(edit, match):
    model, opt = _trained(lambda p: Adam8bit(p), steps=1)
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(model, opt))


def test_loaded_tensors_get_contiguous_storage_of_their_own():
    model, opt = _trained(lambda p: Adam8bit(p), steps=1)
    sd = copy.deepcopy(opt.state_dict())
    codes = sd["state"][0]["exp_avg_codes"]
    big = torch.zeros(codes.numel() + 100, dtype=torch.uint8)
    big[50:50 + codes.numel()] = codes
    sd["state"][0]["exp_avg_codes"] = big[50:50 + codes.numel()]      # a view of a bigger one
    opt.load_state_dict(sd)
    t = opt.state[next(model.parameters())]["exp_avg_codes"]
    assert t.is_contiguous() and t.storage_offset() == 0
    assert t.untyped_storage().nbytes() == codes.numel()
    assert torch.equal(t, codes)


def test_stride_zero_codes_cannot_reach_the_kernel():
    """A crafted checkpoint whose codes are a stride-0 view of one byte: refused or copied; the
    step must not write past that byte (run in a subprocess: a crash fails the test)."""
    code = textwrap.dedent("""
        import torch
        from memlab.optim import Adam8bit, SGD8bit
        for make in (lambda p: Adam8bit(p), lambda p: SGD8bit(p, lr=0.1)):
            n = 1 << 16
            p = torch.nn.Parameter(torch.randn(n))
            opt = make([p])
            p.grad = torch.randn(n)
            opt.step()
            sd = opt.state_dict()
            for k in list(sd["state"][0]):
                if k.endswith("_codes"):
                    sd["state"][0][k] = torch.zeros(1, dtype=torch.uint8).expand(n)
            try:
                opt.load_state_dict(sd)
            except ValueError as e:
                print("refused", e)
                continue
            for k, v in opt.state[p].items():
                if isinstance(v, torch.Tensor):
                    assert v.is_contiguous(), k
                    assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
            for _ in range(3):
                opt.step()
            print("copied")
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and "OK" in res.stdout, (res.returncode, res.stdout, res.stderr)


def _lowrank(seed=0, dims=(16, 32, 24, 8), **kw):
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
    model = nn.Sequential(*layers)
    opt = LowRankAdam(model, **{"lr": 1e-2, "rank": 2, "min_size": 0, "seed": 3, **kw})
    return model, opt


def _lowrank_grads(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(8, model[0].in_features, generator=g)).square().mean().backward()


def _lowrank_snapshot(model, opt):
    return ([t.detach().clone() for t in model.state_dict().values()], {
        i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
        for i, p in enumerate(chain_params(opt)) if p in opt.state},
        opt._steps, opt._generator.get_state())


def chain_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _assert_lowrank_same(a, b):
    _assert_same(a[:2], b[:2])
    assert a[2] == b[2]
    assert torch.equal(a[3], b[3])


@pytest.mark.parametrize("proj", [None, "svd"])
def test_lowrank_load_state_dict_of_another_model_changes_nothing(proj):
    src_model, src = _lowrank(dims=(16, 32, 24, 8), proj=proj)
    _lowrank_grads(src_model)
    src.step()
    src.step()
    model, opt = _lowrank(seed=5, dims=(16, 40, 24, 8), proj=proj)
    _lowrank_grads(model)
    opt.step()
    before = _lowrank_snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param_groups\[\d\].*param \d.*shape"):
        opt.load_state_dict(src.state_dict())
    _assert_lowrank_same(before, _lowrank_snapshot(model, opt))


def test_lowrank_refuses_a_torch_adam_state_dict_plainly():
    model, opt = _lowrank()
    ref = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="not a LowRankAdam state.*lowrank"):
        opt.load_state_dict(ref.state_dict())


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd["lowrank"].update(steps=-2), "steps"),
    (lambda sd: sd["lowrank"].update(generator=torch.zeros(3, dtype=torch.uint8)), "generator"),
    (lambda sd: sd["param_groups"][0].update(eps=-1.0), "eps"),
    (lambda sd: sd["param_groups"][0].update(lowrank=False), "lowrank"),
    (lambda sd: sd["state"][0].update(step=1.5), "step"),
])
def test_lowrank_load_state_dict_checks_before_changing(edit, match):
    model, opt = _lowrank()
    _lowrank_grads(model)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    before = _lowrank_snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_lowrank_same(before, _lowrank_snapshot(model, opt))


# ---------------------------------------------------------------------------------------------
# 2. a step interrupted by an error changes nothing; the retry equals an uninterrupted step


STEP_CASES = {
    "adam_fused_first": (lambda p: Adam8bit(p, lr=1e-3), 0),
    "adam_eager_first": (lambda p: Adam8bit(p, lr=1e-3, compile=False), 0),
    "adam_eager_second": (lambda p: Adam8bit(p, lr=1e-3, compile=False), 1),
    "adamw_eager_second": (lambda p: AdamW8bit(p, lr=1e-3, weight_decay=0.1, compile=False), 1),
    "sgd_fused_first": (lambda p: SGD8bit(p, lr=0.1), 0),
    "sgd_eager_second": (lambda p: SGD8bit(p, lr=0.1, weight_decay=1e-3, compile=False), 1),
}


def _build(case):
    """A model with 12 parameters, its optimizer after ``warm`` steps and fresh gradients (the
    same every call: twins stand in for deepcopy, which drops an Optimizer's own attributes)."""
    make, warm = STEP_CASES[case]
    model = _mlp()
    opt = make(model.parameters())
    for s in range(warm):
        _grads(model, seed=10 + s)
        opt.step()
    _grads(model)
    return model, opt


def _metered_step(model, opt, budget=None):
    with MemoryMeter("cpu", model=model, optimizer=opt, budget=budget) as meter:
        opt.step()
    return meter


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_interrupted_by_the_budget_changes_nothing(case):
    if "fused" in case:
        _needs_kernel()
    m_ref, o_ref = _build(case)
    meter = _metered_step(m_ref, o_ref)                         # the uninterrupted step
    assert meter.peak > meter.baseline
    budget = meter.baseline + (meter.peak - meter.baseline) // 2
    model, opt = _build(case)
    assert len(list(model.parameters())) == 12
    before = _snapshot(model, opt)
    with pytest.raises(MemoryBudgetExceeded):
        _metered_step(model, opt, budget)
    _assert_same(before, _snapshot(model, opt))
    opt.step()                                                   # the retry, without a budget
    _assert_same(_snapshot(m_ref, o_ref), _snapshot(model, opt))


@pytest.mark.parametrize("case", ["adam_eager_first", "adam_eager_second", "adamw_eager_second",
                                  "sgd_eager_second"])
def test_atomic_step_needs_no_more_memory_than_the_step(case):
    """What makes the eager step all-or-nothing under a budget raises the peak by nothing: a
    budget of exactly the unbudgeted peak passes, and the two peaks agree."""
    m_ref, o_ref = _build(case)
    peak = _metered_step(m_ref, o_ref).peak
    model, opt = _build(case)
    assert _metered_step(model, opt, budget=peak).peak == peak
    _assert_same(_snapshot(m_ref, o_ref), _snapshot(model, opt))


def test_step_with_a_bad_gradient_changes_nothing():
    model = _mlp()
    opt = Adam8bit(model.parameters())
    _grads(model)
    params = list(model.parameters())
    params[7].grad = params[7].grad.to_sparse()                 # refused, late in the list
    before = _snapshot(model, opt)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    _assert_same(before, _snapshot(model, opt))


def _lowrank_built(kw):
    model, opt = _lowrank(dims=(16, 64, 48, 32, 8), **kw)
    _lowrank_grads(model, seed=7)
    opt.step()
    _lowrank_grads(model)
    return model, opt


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.01, merge_every=2),
                                dict(proj="svd", weight_decay=0.01, merge_every=2),
                                dict(rank=64, merge_every=2)])
def test_lowrank_step_interrupted_by_the_budget_changes_nothing(kw):
    m_ref, o_ref = _lowrank_built(kw)
    meter = _metered_step(m_ref, o_ref)
    assert meter.peak > meter.baseline
    budget = meter.baseline + (meter.peak - meter.baseline) // 2
    model, opt = _lowrank_built(kw)
    before = _lowrank_snapshot(model, opt)
    with pytest.raises(MemoryBudgetExceeded):
        _metered_step(model, opt, budget)
    _assert_lowrank_same(before, _lowrank_snapshot(model, opt))
    opt.step()
    _assert_lowrank_same(_lowrank_snapshot(m_ref, o_ref), _lowrank_snapshot(model, opt))


# ---------------------------------------------------------------------------------------------
# 3. estimate measures the path the real step takes


def _mlp_setup(make):
    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 10))
        return model, make(model.parameters()), torch.randn(32, 256)
    return setup


def _mlp_step(model, opt, x):
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()


@pytest.mark.parametrize("name,make", [
    ("adam_fused", lambda p: Adam8bit(p)),
    ("sgd_fused", lambda p: SGD8bit(p, lr=0.1)),
    ("adam_eager", lambda p: Adam8bit(p, compile=False)),
])
def test_estimate_of_an_8bit_step_equals_the_metered_step(name, make):
    if "fused" in name:
        _needs_kernel()
    setup = _mlp_setup(make)
    est = estimate(_mlp_step, setup, steps=2)
    model, opt, x = setup()
    with MemoryMeter("cpu", model=model, optimizer=opt, inputs=[x]) as meter:
        _mlp_step(model, opt, x)
        _mlp_step(model, opt, x)
    assert abs(est.peak - meter.peak) <= 0.03 * meter.peak, (est.peak, meter.peak)
    assert est.peak_phase == meter.peak_phase
    assert abs(est.breakdown()["optimizer"] - meter.breakdown()["optimizer"]) <= 0.03 * meter.peak


@pytest.mark.parametrize("make", [lambda p: Adam8bit(p, min_8bit_size=0),
                                  lambda p: SGD8bit(p, lr=0.1, min_8bit_size=0)])
def test_cleared_state_is_freed_at_once(make):
    """The per-step view cache holds weak references only: after opt.state.clear() (or a
    parameter's state replaced) the old states are freed before the next step, and the next
    step starts from fresh zeros as torch's optimizers do. (The cache used to keep them alive
    until the step after the next.)"""
    import gc
    import weakref
    w = nn.Parameter(torch.randn(64, 64))
    opt = make([w])
    for _ in range(2):                     # the second step is served from the view cache
        w.grad = torch.randn_like(w)
        opt.step()
    stored = [weakref.ref(t) for t in opt.state[w].values() if isinstance(t, torch.Tensor)]
    assert len(stored) >= 2
    opt.state.clear()
    gc.collect()
    assert all(r() is None for r in stored), "a cleared state is still alive"
    w.grad = torch.ones_like(w)
    before = w.detach().clone()
    opt.step()
    p2 = nn.Parameter(before.clone())
    fresh = make([p2])
    p2.grad = torch.ones_like(p2)
    fresh.step()
    assert torch.equal(w.detach(), p2.detach())          # as a new optimizer's first step
