"""memlab.reversible: exact inverses, gradients equal to ordinary autograd, memory flat in depth."""

import copy

import pytest
import torch
from torch import nn

from memlab.reversible import AdditiveCoupling, InvertibleDownsample, ReversibleSequence


pytestmark = pytest.mark.usefixtures("one_thread")


def block(c_in, c_out, hidden=6, p=0.0):
    layers = [nn.Conv2d(c_in, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()]
    if p:
        layers.append(nn.Dropout(p))
    layers += [nn.Conv2d(hidden, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers)


def coupling(c, p=0.0):
    c1, c2 = (c + 1) // 2, c // 2
    return AdditiveCoupling(block(c2, c1, p=p), block(c1, c2, p=p))


def make_seq(dtype=torch.float64, p=0.2, down=True):
    layers = [coupling(4, p) for _ in range(3)]
    if down:
        layers += [InvertibleDownsample()] + [coupling(16, p) for _ in range(2)]
    return ReversibleSequence(layers).to(dtype)


def plain(seq, x):
    for layer in seq.layers:
        x = layer(x)
    return x


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------- inverses
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_coupling_inverse(dtype, tol):
    cpl = coupling(6).to(dtype).eval()
    x = torch.randn(2, 6, 5, 7, dtype=dtype)
    with torch.no_grad():
        assert rel(cpl.inverse(cpl(x)), x) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sequence_inverse(dtype, tol):
    seq = make_seq(dtype, p=0.0).eval()
    x = torch.randn(2, 4, 8, 6, dtype=dtype)
    with torch.no_grad():
        assert rel(seq.inverse(seq(x)), x) <= tol


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (2, 3, 7, 9), (1, 2, 1, 1)])
def test_invertible_downsample(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    down = InvertibleDownsample()
    y = down(x)
    B, C, H, W = shape
    assert y.shape == (B, 4 * C, (H + 1) // 2, (W + 1) // 2)
    # channel bookkeeping: out[:, 4c + 2i + j, h, w] == x[:, c, 2h + i, 2w + j]
    c, i, j, h, w = C - 1, (H - 1) % 2, 0, (H - 1) // 2, 0
    assert y[0, 4 * c + 2 * i + j, h, w] == x[0, c, 2 * h + i, 2 * w + j]
    assert torch.equal(down.inverse(y, size=(H, W)), x)            # a permutation: exact
    if H % 2 == 0 and W % 2 == 0:
        assert torch.equal(down.inverse(y), x)


# ----------------------------------------------------------------------------- gradients
def _compare(seq, x_shape, x_requires_grad=True, seed=1):
    ref = copy.deepcopy(seq)
    x = torch.randn(*x_shape, dtype=torch.float64)
    xa = x.clone().requires_grad_(x_requires_grad)
    xb = x.clone().requires_grad_(x_requires_grad)
    torch.manual_seed(seed)
    ya = seq(xa)
    torch.manual_seed(seed)
    yb = plain(ref, xb)
    assert torch.allclose(ya, yb, rtol=0, atol=1e-12)
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    if x_requires_grad:
        assert rel(xa.grad, xb.grad) <= 1e-8
    named_b = dict(ref.named_parameters())
    for name, p in seq.named_parameters():
        assert p.grad is not None, name
        assert rel(p.grad, named_b[name].grad) <= 1e-8, name
    buffers_b = dict(ref.named_buffers())
    for name, b in seq.named_buffers():
        assert torch.equal(b, buffers_b[name]), name       # BN stats updated once, identically


def test_gradients_match_autograd_with_dropout_and_batchnorm():
    seq = make_seq(p=0.2)
    _compare(seq, (3, 4, 7, 9))                             # odd sizes through the downsample


class _SubclassBN(nn.BatchNorm2d):
    """A BatchNorm subclass: takes the ordinary path (batch statistics computed again)."""


def _bn_seq(bn):
    def half(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, 6, 3, padding=1, bias=False), bn(6), nn.ReLU(),
                             nn.Dropout(0.2), nn.Conv2d(6, c_out, 3, padding=1, bias=False), bn(c_out))
    return ReversibleSequence([AdditiveCoupling(half(2, 2), half(2, 2))
                               for _ in range(3)]).double()


@pytest.mark.parametrize("kind", ["default", "momentum=None", "affine=False",
                                  "track_running_stats=False", "subclass"])
def test_batchnorm_statistics_reused_in_recomputation(monkeypatch, kind):
    # The recomputation normalizes with the batch statistics recorded in forward (no second
    # statistics pass) for plain nn.BatchNorm*d; gradients and buffers still equal ordinary
    # autograd's for every flavour, and no stand-in forward is left on the modules.
    from memlab import reversible as rv

    kw = {"default": {}, "momentum=None": {"momentum": None}, "affine=False": {"affine": False},
          "track_running_stats=False": {"track_running_stats": False}, "subclass": {}}[kind]
    bn_cls = _SubclassBN if kind == "subclass" else nn.BatchNorm2d
    calls = []
    replay = rv._BatchNormReplay.apply
    monkeypatch.setattr(rv._BatchNormReplay, "apply",
                        lambda *a: calls.append(1) or replay(*a))
    torch.manual_seed(0)
    seq = _bn_seq(lambda c: bn_cls(c, **kw))
    for _ in range(2):                                      # num_batches_tracked moves on
        _compare(seq, (3, 4, 5, 6))
        seq.zero_grad(set_to_none=True)
    assert len(calls) == (0 if kind == "subclass" else 2 * 2 * 3 * 2)
    assert not any("forward" in m.__dict__ for m in seq.modules())


def test_gradients_two_steps_and_accumulation():
    seq = make_seq(p=0.2)
    ref = copy.deepcopy(seq)
    for step in range(2):                                   # .grad accumulates over steps
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        torch.manual_seed(step)
        seq(x).square().sum().backward()
        torch.manual_seed(step)
        plain(ref, x).square().sum().backward()
    for (n, p), (_, q) in zip(seq.named_parameters(), ref.named_parameters()):
        assert rel(p.grad, q.grad) <= 1e-8, n
    for (n, b), (_, c) in zip(seq.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, c), n


def test_input_without_grad():
    _compare(make_seq(p=0.2), (2, 4, 6, 6), x_requires_grad=False)


def test_backward_does_not_disturb_rng():
    seq = make_seq(p=0.5)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    y = seq(x)
    state = torch.get_rng_state()
    y.sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_f_and_g_run_once_each_in_backward():
    seq = make_seq(p=0.0, down=False)
    calls = {}
    for i, layer in enumerate(seq.layers):
        for name in ("f", "g"):
            key = (i, name)
            calls[key] = 0
            getattr(layer, name).register_forward_hook(
                lambda m, a, o, key=key: calls.__setitem__(key, calls[key] + 1))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y = seq(x)
    assert set(calls.values()) == {1}
    y.sum().backward()
    assert set(calls.values()) == {2}                        # forward + one recomputation


def test_autograd_grad_and_no_grad():
    seq = make_seq(p=0.0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    params = list(seq.parameters())
    ref = copy.deepcopy(seq)
    y = seq(x)
    w = torch.randn_like(y)
    gx, *gp = torch.autograd.grad((y * w).sum(), [x] + params)
    assert all(p.grad is None for p in params)              # autograd.grad: no .grad writes
    rx, *rp = torch.autograd.grad((plain(ref, x) * w).sum(), [x] + list(ref.parameters()))
    assert rel(gx, rx) <= 1e-8 and all(rel(a, b) <= 1e-8 for a, b in zip(gp, rp))
    with torch.no_grad():
        y = seq(x)
    assert y.grad_fn is None and not y.requires_grad


def test_caller_input_still_valid():
    seq = make_seq(dtype=torch.float32, p=0.0)
    big = torch.randn(2, 8, 6, 6, requires_grad=True)
    x = big[:, 4:]                                          # a view: the caller owns the storage
    keep = x.detach().clone()
    nbytes = big.untyped_storage().nbytes()
    y = seq(x)
    y.square().sum().backward()
    assert big.untyped_storage().nbytes() == nbytes
    assert torch.equal(x.detach(), keep)
    assert big.grad is not None and big.grad[:, :4].abs().sum() == 0
    z = seq(x).sum()                                        # and it can be used again
    z.backward()


def test_autocast_bf16_reconstruction_is_fp32():
    torch.manual_seed(0)
    seq = make_seq(dtype=torch.float32, p=0.0, down=False)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    ref = copy.deepcopy(seq)
    seen = []
    seq.layers[0].f.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = seq(x)
        yr = plain(ref, x)
    assert y.dtype == torch.float32
    y.float().square().mean().backward()
    assert len(seen) == 2                                  # forward, then the recomputation
    recon = seen[1]
    assert recon.dtype == torch.float32
    assert rel(recon, x.detach()[:, 2:]) <= 1e-5           # the reconstructed input half
    gx = x.grad.clone()
    x.grad = None
    yr.float().square().mean().backward()
    assert rel(gx, x.grad) <= 5e-2                          # same bf16 math, to bf16 rounding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        back = seq.inverse(y.detach())
    assert back.dtype == torch.float32 and rel(back, x.detach()) <= 1e-5


def test_reduced_precision_input_is_carried_in_fp32():
    seq = make_seq(dtype=torch.float32, p=0.0, down=False)
    x = torch.randn(2, 4, 6, 6).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = seq(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_bad_layers():
    with pytest.raises(ValueError, match="layers"):
        ReversibleSequence([])
    with pytest.raises(TypeError, match=r"layers\[0\]"):
        ReversibleSequence([nn.Conv2d(2, 2, 1)])
    with pytest.raises(ValueError, match="preserve_rng_state"):
        ReversibleSequence([coupling(4)], preserve_rng_state="yes")
    with pytest.raises(ValueError, match="channels"):
        coupling(4)(torch.randn(1, 1, 3, 3))


# ----------------------------------------------------------------------------- memory pin
def _activation_peak(module, x) -> int:
    """Activation peak of one step: memlab's MemoryMeter, or saved-tensor bytes without it."""
    try:
        from memlab.memory import MemoryMeter
    except ImportError:
        MemoryMeter = None
    if MemoryMeter is not None:
        with MemoryMeter("cpu", model=module, inputs=[x]) as m:
            module(x).square().mean().backward()
        return m.category_peaks()["activations"]
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module(x).square().mean()
    loss.backward()
    return sum(seen.values())


def test_activation_memory_flat_in_depth():
    from memlab.models.common import Blocks
    from memlab.models.resnet import BasicBlock, basic_coupling

    c = 8

    def stage(kind, depth):
        if kind == "reversible":
            return ReversibleSequence([basic_coupling(c, c) for _ in range(depth)])
        return Blocks([BasicBlock(c, c) for _ in range(depth)], checkpoint=kind == "checkpoint")

    x = torch.randn(2, c, 8, 16, requires_grad=True)
    peak = {(k, d): _activation_peak(stage(k, d), x)
            for k in ("vanilla", "checkpoint", "reversible") for d in (4, 32)}
    assert peak["reversible", 32] <= 1.2 * peak["reversible", 4]
    assert peak["vanilla", 32] >= 5 * peak["vanilla", 4]
    assert peak["reversible", 32] < peak["checkpoint", 32] < peak["vanilla", 32]
    grow = {k: peak[k, 32] / peak[k, 4] for k in ("vanilla", "checkpoint", "reversible")}
    assert grow["reversible"] < grow["checkpoint"] < grow["vanilla"]


def test_bench_rows():
    import json

    from memlab.bench.reversible import STRATEGIES, run

    rows = run(fast=True, depths=(2,), steps=1, threads=1)
    assert [r["strategy"] for r in rows] == list(STRATEGIES)
    json.dumps(rows)                                        # flat, JSON-able
    by = {r["strategy"]: r for r in rows}
    assert by["vanilla"]["activation_ratio"] == 1.0
    assert by["reversible"]["activation_bytes"] < by["vanilla"]["activation_bytes"]
    assert all(r["step_s"] > 0 and r["time_ratio"] > 0 for r in rows)


def test_reconstruction_error_rows():
    from memlab.bench.reversible import reconstruction_error

    rows = reconstruction_error(depths=(1, 6), channels=4, size=(4, 6))
    assert [(r["depth"], r["dtype"]) for r in rows] == [
        (1, "float32"), (6, "float32"), (1, "float64"), (6, "float64")]
    by = {(r["depth"], r["dtype"]): r for r in rows}
    for d in (1, 6):                       # near each format's roundoff, fp64 far below fp32
        assert by[d, "float32"]["rel_error"] < 1e-5
        assert by[d, "float64"]["rel_error"] < 1e-13
        assert by[d, "float64"]["grad_rel_error"] < 1e-12
        assert by[d, "float32"]["grad_rel_error"] < 1e-3
    with pytest.raises(ValueError, match="dtypes"):
        reconstruction_error(depths=(1,), dtypes=("float16",))
    with pytest.raises(ValueError, match="depths"):
        reconstruction_error(depths=(0,))


def test_full_size_rows():
    from memlab.bench.reversible import full_size

    rows = full_size(fast=True, strategies=("vanilla", "reversible"), batch_size=2,
                     frames=40, num_classes=10, steps=1)
    assert [r["strategy"] for r in rows] == ["vanilla", "reversible"]
    van, rev = rows           # tiny: the peak is Adam's first step, so compare activations
    assert van["peak_ratio"] == 1.0 and rev["peak_ratio"] <= 1.01
    assert rev["activation_peak_bytes"] < 0.8 * van["activation_peak_bytes"]
    assert abs(rev["params"] - van["params"]) / van["params"] < 0.01
    with pytest.raises(ValueError, match="models"):
        full_size(models=("ResNet1000",))
    with pytest.raises(ValueError, match="strategies"):
        full_size(fast=True, strategies=("recompute",))


def test_identity_functions_gradients():
    # F = G = identity pass gradients through unchanged: no in-place update may alias them.
    seq = ReversibleSequence([AdditiveCoupling(nn.Identity(), nn.Identity()) for _ in range(3)])
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    (seq(x) * w).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (plain(seq, xr) * w).sum().backward()
    assert rel(x.grad, xr.grad) <= 1e-12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gradients_match_autograd_with_dropout():
    seq = make_seq(p=0.3).cuda()
    ref = copy.deepcopy(seq)
    x = torch.randn(3, 4, 7, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    torch.manual_seed(5)
    y = seq(x)
    torch.manual_seed(5)
    yr = plain(ref, xr)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (yr * w).sum().backward()
    assert rel(x.grad, xr.grad) <= 1e-8
    for (n, p), (_, q) in zip(seq.named_parameters(), ref.named_parameters()):
        assert rel(p.grad, q.grad) <= 1e-8, n
