"""memlab.quant4 and memlab.optim4bit: 4-bit maps, rank-1 normalization, packing, Adam4bit."""

import copy
import io
import math

import pytest
import torch

from memlab.bench.curves import mlp as _mlp, regression_data as _data, train
from memlab.optim4bit import Adam4bit, AdamW4bit, stored_moments
from memlab.quant4 import (Q4Tensor, dequantize4_blockwise, dynamic_exponent_map, error_rows,
                           linear_nozero_map, pack4, quantize4_blockwise, rank1_maxes,
                           rank1_scale, unpack4, use_rank1)

pytestmark = pytest.mark.usefixtures("one_thread")

BIG = 10 ** 9   # min_4bit_size that keeps every state fp32


# the deterministic problem of the optimizer tests (MLP regression): memlab.bench.curves


X, Y = _data()


def _train(model, opt, steps, sched=None, batch=None):
    return train(model, opt, steps, sched, batch, (X, Y))


def _same(m1, m2):
    return all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


# ---------------------------------------------------------------------------------------------
# the maps, value by value


def test_dynamic_exponent_map_4bit_signed_values():
    """Sign bit, E zeros, marker 1, F = 2 - E fraction bits: 10**-E * (0.1 + 0.9 (k+.5) / 2**F),
    E = 0 (4 values), 1 (2), 2 (1); 0000 is 0 and 1000 ("-0") is 1."""
    mags = [0.1 + 0.9 * (k + 0.5) / 4 for k in range(4)]            # E = 0: F = 2
    mags += [0.1 * (0.1 + 0.9 * (k + 0.5) / 2) for k in range(2)]   # E = 1: F = 1
    mags += [0.01 * (0.1 + 0.9 * 0.5)]                              # E = 2: F = 0
    want = sorted([0.0, 1.0] + mags + [-x for x in mags])
    got = dynamic_exponent_map(True, 4)
    assert got.dtype == torch.float32 and got.shape == (16,)
    assert torch.equal(got, torch.tensor(want, dtype=torch.float64).float())
    assert torch.allclose(got, torch.tensor(
        [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0.0,
         0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0]), atol=0, rtol=1e-6)


def test_dynamic_exponent_map_at_8_bits_is_the_8bit_optimizers_map():
    from memlab.quant import dynamic_map
    for signed in (True, False):
        assert torch.equal(dynamic_exponent_map(signed, 8), dynamic_map(signed))


def test_linear_map_excludes_zero():
    got = linear_nozero_map(4)
    assert torch.equal(got, torch.tensor([(i + 1) / 16 for i in range(16)]))
    assert got.min() == 1 / 16 and not bool((got == 0).any())


def test_map_arguments_are_checked():
    with pytest.raises(ValueError, match="bits"):
        dynamic_exponent_map(True, 9)
    with pytest.raises(ValueError, match="bits"):
        linear_nozero_map(0)
    with pytest.raises(TypeError, match="signed"):
        dynamic_exponent_map(1, 4)


# ---------------------------------------------------------------------------------------------
# packing, rounding, normalization


@pytest.mark.parametrize("n", [1, 2, 7, 128, 1001])
def test_pack_unpack_round_trip_and_layout(n):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
    packed = pack4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(unpack4(packed, n), codes)
    assert int(packed[0]) & 15 == int(codes[0])                    # element 0: low nibble
    if n > 1:
        assert int(packed[0]) >> 4 == int(codes[1])


@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_the_nearest_map_value(signed):
    torch.manual_seed(0)
    x = torch.randn(1000) * torch.exp(2 * torch.randn(1000))
    x = x if signed else x.abs()
    q = Q4Tensor.zeros(x.shape, signed, 128)
    q.copy_(x)
    code = dynamic_exponent_map(True, 4) if signed else linear_nozero_map(4)
    absmax = x.view(-1)[:896].view(7, 128).abs().amax(1).tolist() + [x[896:].abs().max().item()]
    scale = torch.tensor(absmax).repeat_interleave(torch.tensor([128] * 7 + [104]))
    xn = x / scale
    want = (xn[:, None] - code[None]).abs().argmin(1)              # brute force
    assert torch.equal(unpack4(q.codes, 1000).long(), want)
    assert torch.allclose(q.dequantize(), code[want] * scale)
    assert torch.equal(q.scale, torch.tensor(absmax))


@pytest.mark.parametrize("signed", [True, False])
def test_fast_encoder_equals_bucketize_on_every_kind_of_float(signed):
    """The table lookup that replaced torch.bucketize (half of a step's time) gives its codes:
    floats spread over all 2^32 bit patterns (every exponent, both signs, subnormals, NaNs with
    payloads, inf), each midpoint and its two neighbours. Only -inf differs (never a normalised
    value)."""
    import numpy as np
    from memlab.quant4 import _encode, _table
    code, mids = _table(signed, torch.device("cpu"))
    bits = np.arange(0, 2 ** 32, 2039, dtype=np.uint64).astype(np.uint32).view(np.int32)
    special = torch.tensor([0x7F800001, 0xFF800001, 0x7FC00000, 0xFFC00000, 0x7F800000, 1,
                            0x80000001, 0xFF80FFFF], dtype=torch.int64).to(torch.int32)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    x = torch.cat([torch.from_numpy(bits).view(torch.float32), special.view(torch.float32),
                   torch.tensor([0.0, -0.0, 1.0, -1.0]), mids, torch.nextafter(mids, up),
                   torch.nextafter(mids, down), code])
    got = _encode(x, mids)
    assert got.dtype == torch.uint8                       # the table path ran
    assert torch.equal(got.int(), torch.bucketize(x, mids, out_int32=True))
    assert int(_encode(torch.tensor([-math.inf]), mids)) == 15


def test_blockwise_functions_round_trip():
    x = torch.randn(300)
    packed, absmax = quantize4_blockwise(x, True, 128)
    assert packed.numel() == 150 and absmax.numel() == 3
    y = dequantize4_blockwise(packed, absmax, 300, True, 128)
    assert (y - x).abs().max() <= 0.5 * 0.225 * x.abs().max() + 1e-6   # half the widest gap
    with pytest.raises(TypeError, match="x"):
        quantize4_blockwise(torch.arange(3), True)


def test_rank1_scales_are_row_and_column_maxima():
    torch.manual_seed(0)
    v = torch.rand(6, 9) ** 4
    maxes = rank1_maxes(v)
    assert torch.equal(maxes[:6], v.amax(1)) and torch.equal(maxes[6:], v.amax(0))
    scale = rank1_scale(maxes, v.shape)
    assert torch.equal(scale, torch.minimum(v.amax(1)[:, None], v.amax(0)[None, :]))
    assert bool((scale >= v).all())
    t = torch.rand(4, 1, 5, 3)                                      # size-1 dims are skipped
    m = rank1_maxes(t)
    assert m.numel() == 12
    s = rank1_scale(m, t.shape)
    a = t.squeeze(1)
    ref = torch.minimum(torch.minimum(a.amax((1, 2))[:, None, None], a.amax((0, 2))[None, :, None]),
                        a.amax((0, 1))[None, None, :])
    assert torch.equal(s, ref.unsqueeze(1))


def test_rank1_is_chosen_where_its_scales_are_at_most_one_per_32_elements():
    assert use_rank1((1024, 1024)) and use_rank1((512, 256)) and use_rank1((128, 128, 3, 3))
    assert use_rank1((64, 64)) and use_rank1((128, 64)) and use_rank1((1, 64, 1, 64))
    assert not use_rank1((512, 16)) and not use_rank1((127, 32)) and not use_rank1((2048, 2))
    assert not use_rank1((4096,)) and not use_rank1((4096, 1))
    assert use_rank1((64, 64), rank1=True) and not use_rank1((4096, 1), rank1=True)
    assert not use_rank1((1024, 1024), rank1=False)


def test_dither_thresholds_are_a_shifted_lattice_in_32_bit_integers():
    """u = ((DITHER_I * i + hash(2 step + signed)) mod 2**32 >> 8) / 2**24, checked against
    Python integers (the hash written out here from its constants), also past 2**31 and 2**32
    elements (the 16-bit halves path)."""
    from memlab.quant4 import DITHER_I, dither

    def mix(x):
        x ^= x >> 16
        x = x * 0x7FEB352D % 2 ** 32
        x ^= x >> 15
        x = x * 0x846CA68B % 2 ** 32
        return x ^ (x >> 16)
    assert DITHER_I == round(2 ** 32 / 1.324717957244746)        # the plastic number
    for start, n, step, signed in ((0, 300, 1, True), (5, 64, 7, False),
                                   ((1 << 31) - 40, 80, 123456789, True),
                                   ((1 << 32) - 3, 9, 2, False)):
        u = dither(start, n, step, signed)
        base = mix(2 * step + signed)
        want = [((DITHER_I * (i % 2 ** 32) + base) % 2 ** 32 >> 8) / 2 ** 24
                for i in range(start, start + n)]
        assert u.dtype == torch.float32 and u.tolist() == want
    bases = {mix(2 * t + s) for t in range(1, 1001) for s in (0, 1)}
    assert len(bases) == 2000                                    # every step its own shift


@pytest.mark.parametrize("signed", [True, False])
def test_dithered_codes_are_the_two_neighbours_and_keep_exact_values(signed):
    from memlab.quant4 import _codes, dither
    code = dynamic_exponent_map() if signed else linear_nozero_map()
    torch.manual_seed(0)
    x = torch.rand(5000) * 2 - 1 if signed else torch.rand(5000)
    for step in (1, 2, 3):
        c = _codes(x, signed, 0, step).long()
        got = code[c]
        below = code[torch.searchsorted(code, x, right=True).clamp(1, 15) - 1]
        above = code[torch.searchsorted(code, x, right=False).clamp(0, 15)]
        assert bool(((got == below) | (got == above)).all())
    exact = code.repeat(3)                                 # every map value: its own code
    assert torch.equal(_codes(exact, signed, 0, 5).long(), torch.arange(16).repeat(3))
    odd = torch.tensor([float("nan"), -2.0, 2.0, float("inf")])
    want = [15, 0, 15, 15]
    assert _codes(odd, signed, 0, 1).tolist() == want
    u = dither(0, 16, 1, signed)
    assert u.shape == (16,)


@pytest.mark.parametrize("signed", [True, False])
def test_dithered_rounding_is_unbiased_over_steps(signed):
    """The same values rounded at steps 1..256: the mean stored value is within 20% of a gap
    of the value (4% on average: independent draws, ~1/sqrt(256) of a gap), where the nearest
    value is off by a quarter of a gap on average -- what makes a 4-bit EMA stall; and within a
    step, the mean over a block of 128 equal values is within 4% of a gap (the lattice: 2.7% at
    most here; independent draws would be off by 4.4% of a gap as one standard deviation)."""
    from memlab.quant4 import _codes
    code = dynamic_exponent_map() if signed else linear_nozero_map()
    torch.manual_seed(1)
    x = torch.rand(4096) * 1.77 - 0.885 if signed else torch.rand(4096) * 0.9 + 0.0625
    gap = code[1:] - code[:-1]
    j = (torch.searchsorted(code, x, right=True) - 1).clamp(0, 14)
    mean = torch.stack([code[_codes(x, signed, 0, t).long()] for t in range(1, 257)]).mean(0)
    err = (mean - x).abs() / gap[j]
    assert err.max() < 0.2 and err.mean() < 0.04, (err.max(), err.mean())
    nearest = code[_codes(x, signed).long()]
    assert ((nearest - x).abs() / gap[j]).mean() > 0.2
    for value in x[:20].tolist():
        flat = torch.full((128,), value)
        k = int((torch.searchsorted(code, flat[:1], right=True) - 1).clamp(0, 14))
        for t in (1, 2, 3):
            m = code[_codes(flat, signed, 0, t).long()].mean()
            assert abs(m - value) < 0.04 * gap[k], (value, t, m)


def test_a_4bit_ema_follows_its_input_with_dither_and_stalls_to_nearest():
    """m <- 0.9 m + 0.1 g with g constant, stored in 4 bits after each update (one block whose
    absmax element is 1, the others 0.3): with nearest rounding the others stall at the map
    value 0.2125 (the next, 0.4375, is never reached: 0.1 * (0.3 - 0.2125) is less than half
    the gap), dithered they average 0.3 to within 0.01."""
    g = torch.full((128,), 0.3)
    g[0] = 1.0
    out = {}
    for name, at in (("nearest", lambda t: None), ("dither", lambda t: t)):
        q, m = Q4Tensor.zeros((128,), True), torch.zeros(128)
        for t in range(1, 101):
            m = q.dequantize().lerp_(g, 0.1)
            q.copy_(m, at(t))
        out[name] = q.dequantize()[1:]
    stalled = torch.full((127,), 0.2125 * (1 - 0.9 ** 100))             # 0.2125 x absmax
    torch.testing.assert_close(out["nearest"], stalled, rtol=1e-6, atol=0)
    assert abs(out["dither"].mean().item() - 0.3) < 0.01


@pytest.mark.parametrize("shape,rank1", [((1 << 14,), False), ((128, 128), True),
                                         ((128, 128), False)])
def test_no_nonzero_second_moment_is_stored_as_zero(shape, rank1):
    """Second moments spanning ~30 decades (a map with 0 would store most as 0): every positive
    value reads back positive (block-wise: at least its block absmax / 16 >= itself / 16); a
    scale of zeros reads back as zeros."""
    torch.manual_seed(0)
    v = torch.exp(7 * torch.randn(shape)).clamp(max=1e15)
    v.view(-1)[::97] = 0
    q = Q4Tensor.zeros(shape, False, 128, rank1)
    v_hat = q.copy_(v).dequantize()
    assert bool((v_hat[v > 0] > 0).all())
    assert bool((v_hat[v > 0] >= v[v > 0] / 16 * 0.999).all()) or rank1  # block: >= absmax/16
    zero_blocks = Q4Tensor.zeros(shape, False, 128, rank1).copy_(torch.zeros(shape))
    assert bool((zero_blocks.dequantize() == 0).all())


# ---------------------------------------------------------------------------------------------
# the optimizer: fp32 path, memory


@pytest.mark.parametrize("ours,theirs", [
    (lambda p: Adam4bit(p, lr=3e-3, weight_decay=1e-2, min_4bit_size=BIG),
     lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-2, foreach=False)),
    (lambda p: AdamW4bit(p, lr=3e-3, min_4bit_size=BIG),
     lambda p: torch.optim.AdamW(p, lr=3e-3, foreach=False)),
    (lambda p: Adam4bit(p, lr=3e-3, maximize=True, min_4bit_size=BIG),
     lambda p: torch.optim.Adam(p, lr=3e-3, maximize=True, foreach=False)),
])
def test_fp32_state_path_equals_torch(ours, theirs):
    m1, m2 = _mlp(32), _mlp(32)
    _train(m1, ours(m1.parameters()), 30)
    _train(m2, theirs(m2.parameters()), 30)
    assert _same(m1, m2)


def test_small_tensors_step_in_one_foreach_call_per_group(monkeypatch):
    """The fp32-state tensors of a group (below min_4bit_size) step together in
    memlab._foreach_steps (one torch._foreach_* call an operation, not ~10 torch ops a tensor:
    a DF-ResNet233's 483 small tensors took 79 ms a step with the rest, now 70), with torch's
    bits (test above: its first step here too); one call per group, the 4-bit ones apart."""
    from memlab import _foreach_steps
    calls = []
    real = _foreach_steps.adam
    monkeypatch.setattr(_foreach_steps, "adam",
                        lambda items, **kw: (calls.append(len(items)), real(items, **kw)))
    m1, m2 = _mlp(), _mlp()
    groups = [{"params": list(m1[0].parameters()) + [m1[4].bias]},
              {"params": list(m1[2].parameters()) + [m1[4].weight], "lr": 1e-3}]
    opt = Adam4bit(groups, lr=3e-3)
    ref = torch.optim.Adam([{"params": list(m2[0].parameters()) + [m2[4].bias]},
                            {"params": list(m2[2].parameters()) + [m2[4].weight], "lr": 1e-3}],
                           lr=3e-3, foreach=False)
    _train(m1, opt, 1)                            # one step: the same gradients as fp32
    _train(m2, ref, 1)
    for a, b in ((m1[0].weight, m2[0].weight), (m1[4].bias, m2[4].bias),
                 (m1[2].bias, m2[2].bias), (m1[4].weight, m2[4].weight)):
        assert torch.equal(a, b)
    _train(m1, opt, 2)
    assert calls == [3, 2] * 3                    # the 64 x 64 weight is 4-bit
    assert any(k.endswith("_q4") for k in opt.state[m1[2].weight])


SHAPES = [(1024, 512), (512, 256), (256, 64), (100, 300), (64, 64, 3, 3), (8192,), (4095,), (7,)]


def _stepped(make, shapes=SHAPES):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    opt.step()
    return opt, params


@pytest.mark.parametrize("make", [lambda p: Adam4bit(p), lambda p: AdamW4bit(p),
                                  lambda p: Adam4bit(p, rank1=False)])
def test_state_bytes_per_param(make):
    """<= 1.07 B/param over the 4-bit tensors, counted from the storages in optimizer.state and
    by MemoryMeter's optimizer category (fp32 Adam: 8)."""
    from memlab.bench.optim import state_bytes_per_param
    from memlab.memory import MemoryMeter
    opt, params = _stepped(make)
    bpp = state_bytes_per_param(opt, params, min_numel=4096)
    assert bpp <= 1.07, bpp
    ref, ref_params = _stepped(lambda p: torch.optim.Adam(p, foreach=False))
    assert state_bytes_per_param(ref, ref_params, min_numel=4096) == pytest.approx(8, abs=1e-3)
    big = [p for p in params if p.numel() >= 4096]
    Q4Tensor.zeros((2,), True)                # the cached maps exist before metering
    Q4Tensor.zeros((2,), False)
    opt2, params2 = _stepped(make, [p.shape for p in big])
    with MemoryMeter("cpu", optimizer=opt2) as meter:
        opt2.step()
    numel = sum(p.numel() for p in params2)
    assert meter.now()["optimizer"] == opt2.state_nbytes()
    assert meter.now()["optimizer"] / numel <= 1.07
    for p in big:
        st = opt.state[p]
        assert st["exp_avg_q4"].dtype == st["exp_avg_sq_q4"].dtype == torch.uint8
        assert st["exp_avg_q4"].numel() == (p.numel() + 1) // 2
        assert ("exp_avg_sq_rank1" in st) == use_rank1(p.shape, 128, opt.defaults["rank1"])


def test_small_tensors_keep_fp32_state():
    opt, params = _stepped(lambda p: Adam4bit(p))
    small = [p for p in params if p.numel() < 4096]
    assert small
    for p in small:
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_estimate_on_fake_tensors_measures_the_real_step():
    from memlab.memory import MemoryMeter, estimate

    def setup():
        net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                  torch.nn.Linear(512, 64))
        return net, Adam4bit(net.parameters()), torch.randn(16, 256)

    def step(m, o, x):
        m(x).sum().backward()
        o.step()
    est = estimate(step, setup, steps=2)
    net, opt, x = setup()
    with MemoryMeter("cpu", model=net, optimizer=opt) as meter:
        for _ in range(2):
            step(net, opt, x)
    assert est.category_peaks()["optimizer"] == meter.category_peaks()["optimizer"]


# ---------------------------------------------------------------------------------------------
# training behaviour


def _curve_gaps(got, ref):
    """(max pointwise relative gap, relative gap of the final loss, mean relative gap over the
    second half of the run)."""
    d = (got - ref).abs() / ref
    return d.max().item(), d[-1].item(), d[len(d) // 2:].mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_curve_within_5_percent_of_fp32_adam_at_every_step(seed):
    """The 8-bit tests' criterion: 200 full-batch steps of their MLP regression with the
    defaults (the 64 x 64 matrix in 4 bits with a rank-1 second moment, the smaller tensors
    fp32), every step's loss within 5% of fp32 Adam's; three initializations. Before dithered
    rounding and rank-1 for this matrix were the defaults (nearest rounding, a block-wise second
    moment) seed 0's curve was off by 63% at the steep part."""
    m1, m2 = _mlp(seed=seed), _mlp(seed=seed)
    ref = _train(m1, torch.optim.Adam(m1.parameters(), lr=3e-3), 200)
    got = _train(m2, Adam4bit(m2.parameters(), lr=3e-3), 200)
    worst, final, late = _curve_gaps(got, ref)
    print(f"seed {seed} defaults: max gap {worst:.3f}, final gap {final:.4f}, mean gap steps "
          f"100-199 {late:.4f}")
    assert got[-1] < 0.2 * ref[0]                 # it learns
    assert worst < 0.05, (worst, final, late)


def test_nearest_rounding_stalls_the_moments_and_trails_fp32():
    """rounding="nearest" (the paper's) on the same problem: the steep part of the curve comes
    late, a pointwise gap of more than 30%; dithered rounding's is less than a fifth of it."""
    m0, m1, m2 = _mlp(), _mlp(), _mlp()
    ref = _train(m0, torch.optim.Adam(m0.parameters(), lr=3e-3), 200)
    near = _train(m1, Adam4bit(m1.parameters(), lr=3e-3, rounding="nearest"), 200)
    dith = _train(m2, Adam4bit(m2.parameters(), lr=3e-3), 200)
    (w_near, *_), (w_dith, *_) = _curve_gaps(near, ref), _curve_gaps(dith, ref)
    print(f"max gap: nearest {w_near:.3f}, dither {w_dith:.3f}")
    assert w_near > 0.3 and w_dith < w_near / 5, (w_near, w_dith)


@pytest.mark.parametrize("hidden,kw", [(64, dict(rank1=True)), (64, dict()),
                                       (128, dict(rank1=True))])
def test_loss_curve_every_state_in_4bit(hidden, kw):
    """min_4bit_size=0 (every tensor in 4 bits): it learns and ends within 15% of fp32 Adam
    (figures printed; the 8-bit tests' 5%-everywhere criterion holds with the defaults, above,
    and is the xfail below here)."""
    m1, m2 = _mlp(hidden), _mlp(hidden)
    ref = _train(m1, torch.optim.Adam(m1.parameters(), lr=3e-3), 200)
    got = _train(m2, Adam4bit(m2.parameters(), lr=3e-3, min_4bit_size=0, **kw), 200)
    worst, final, late = _curve_gaps(got, ref)
    print(f"hidden={hidden} min_4bit_size=0 {kw}: max gap {worst:.3f}, final gap {final:.4f}, "
          f"mean gap steps 100-199 {late:.4f}")
    assert got[-1] < 0.2 * ref[0]
    assert final < 0.15, (worst, final, late)


@pytest.mark.xfail(strict=True, reason="with every tensor in 4 bits (the 64-element biases and "
                   "the 1 x 64 output weight too, whose second moments are block-wise: the "
                   "zero-free map stores a small v as at least absmax / 16) the steep part of "
                   "the curve is off by up to 17% (nearest rounding: 99%; 8-bit: 1.3%)")
def test_loss_curve_within_5_percent_everywhere_like_8bit():
    m1, m2 = _mlp(), _mlp()
    ref = _train(m1, torch.optim.Adam(m1.parameters(), lr=3e-3), 200)
    got = _train(m2, Adam4bit(m2.parameters(), lr=3e-3, min_4bit_size=0, rank1=True), 200)
    assert ((got - ref).abs() / ref).max().item() < 0.05


def _sched(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)


@pytest.mark.parametrize("make", [
    lambda p: Adam4bit(p, lr=3e-3, min_4bit_size=1024),
    lambda p: AdamW4bit(p, lr=3e-3, min_4bit_size=1024, rank1=True, block_size=64),
])
def test_resume_is_bit_for_bit(make):
    m_ref = _mlp()
    o_ref = make(m_ref.parameters())
    s_ref = _sched(o_ref)
    _train(m_ref, o_ref, 25, s_ref, batch=True)

    m_a = _mlp()
    o_a = make(m_a.parameters())
    s_a = _sched(o_a)
    _train(m_a, o_a, 10, s_a, batch=True)
    assert any(k.endswith("_q4") for st in o_a.state.values() for k in st)
    buf = io.BytesIO()
    torch.save({"model": m_a.state_dict(), "opt": o_a.state_dict(), "sched": s_a.state_dict()},
               buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    m_b = _mlp(seed=123)
    m_b.load_state_dict(ckpt["model"])
    o_b = make(m_b.parameters())
    s_b = _sched(o_b)
    o_b.load_state_dict(ckpt["opt"])
    s_b.load_state_dict(ckpt["sched"])
    for st in o_b.state.values():
        for k, v in st.items():
            if k.endswith("_q4"):
                assert v.dtype == torch.uint8
    for i in range(10, 25):
        xb, yb = X[i % 8::8], Y[i % 8::8]
        o_b.zero_grad()
        ((m_b(xb) - yb) ** 2).mean().backward()
        o_b.step()
        s_b.step()
    assert _same(m_ref, m_b)


def test_rounding_is_saved_and_a_checkpoint_from_before_it_resumes_as_nearest():
    """``rounding`` travels in the param groups; a state_dict saved before the option existed
    (no 'rounding' key: its states were rounded to the nearest value) resumes as nearest, bit
    for bit with the run that made it."""
    def run(opt, m, a, b):
        for i in range(a, b):
            xb, yb = X[i % 8::8], Y[i % 8::8]
            opt.zero_grad()
            ((m(xb) - yb) ** 2).mean().backward()
            opt.step()
    m_ref = _mlp()
    o_ref = Adam4bit(m_ref.parameters(), lr=3e-3, min_4bit_size=1024, rounding="nearest")
    run(o_ref, m_ref, 0, 6)
    sd = copy.deepcopy(o_ref.state_dict())
    model = copy.deepcopy(m_ref.state_dict())
    assert {g["rounding"] for g in sd["param_groups"]} == {"nearest"}
    for g in sd["param_groups"]:
        del g["rounding"]
    run(o_ref, m_ref, 6, 12)
    m_b = _mlp(seed=3)
    m_b.load_state_dict(model)
    o_b = Adam4bit(m_b.parameters(), lr=3e-3, min_4bit_size=1024)          # default: dither
    o_b.load_state_dict(sd)
    assert o_b.param_groups[0]["rounding"] == "nearest"
    run(o_b, m_b, 6, 12)
    assert _same(m_ref, m_b)
    o_c = Adam4bit(_mlp().parameters(), rounding="dither")
    o_d = Adam4bit(_mlp().parameters(), rounding="nearest")
    o_d.load_state_dict(o_c.state_dict())
    assert o_d.param_groups[0]["rounding"] == "dither"


def test_registered_optimizers_pick_the_rounding():
    """'adam4bit' (and 'adamw4bit') round dithered; 'adam4bit-nearest' is the paper's rounding,
    so the lab, the dashboard and ``memlab compare`` can put the two side by side."""
    from memlab import techniques as tech
    model = _mlp()
    for name, want in (("adam4bit", "dither"), ("adamw4bit", "dither"),
                       ("adam4bit-nearest", "nearest")):
        opt = tech.get("optimizer", name).factory(model, lr=1e-3, weight_decay=0.0)
        assert isinstance(opt, Adam4bit) and opt.param_groups[0]["rounding"] == want, name


def test_lr_scheduler_drives_the_update():
    def lam(i):
        return 1.0 / (1 + i)
    m1, m2 = _mlp(), _mlp()
    o1 = Adam4bit(m1.parameters(), lr=1e-2, min_4bit_size=0)
    o2 = Adam4bit(m2.parameters(), lr=1e-2, min_4bit_size=0)
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


def test_param_groups_grad_none_and_closure():
    m = _mlp()
    first, rest = list(m[0].parameters()), list(m[2].parameters()) + list(m[4].parameters())
    before = [p.detach().clone() for p in m.parameters()]
    opt = Adam4bit([{"params": first, "lr": 0.0}, {"params": rest}], lr=1e-2, min_4bit_size=0)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = ((m(X[:64]) - Y[:64]) ** 2).mean()
        loss.backward()
        return loss
    assert torch.is_tensor(opt.step(closure)) and calls
    after = list(m.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before[:2], after[:2]))
    assert not any(torch.equal(a, b) for a, b in zip(before[2:], after[2:]))
    lone = torch.nn.Parameter(torch.randn(5000))
    opt.add_param_group({"params": [lone]})
    opt.step()                                               # lone has no grad: no state
    assert len(opt.state[lone]) == 0
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": -1.0})
    assert len(opt.param_groups) == 3


def test_bad_gradient_changes_nothing():
    a, b = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    opt = Adam4bit([a, b])
    a.grad, b.grad = torch.randn(5000), torch.randn(5000).to_sparse()
    a0 = a.detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(a, a0) and len(opt.state) == 0


def test_bad_hyperparameters_raise():
    ps = [torch.nn.Parameter(torch.zeros(3))]
    cases = [
        (lambda: Adam4bit(ps, lr=-1), "lr"),
        (lambda: Adam4bit(ps, lr=float("nan")), "lr"),
        (lambda: Adam4bit(ps, betas=(1.0, 0.999)), "betas"),
        (lambda: Adam4bit(ps, betas=(0.9,)), "betas"),
        (lambda: Adam4bit(ps, eps=0), "eps"),
        (lambda: AdamW4bit(ps, weight_decay=-0.1), "weight_decay"),
        (lambda: Adam4bit(ps, block_size=0), "block_size"),
        (lambda: Adam4bit(ps, block_size=True), "block_size"),
        (lambda: Adam4bit(ps, min_4bit_size=-1), "min_4bit_size"),
        (lambda: Adam4bit(ps, min_4bit_size=1.5), "min_4bit_size"),
        (lambda: Adam4bit(ps, rank1=1), "rank1"),
        (lambda: Adam4bit(ps, maximize=1), "maximize"),
        (lambda: Adam4bit(ps, rounding="stochastic"), "rounding"),
        (lambda: AdamW4bit(ps, rounding=None), "rounding"),
    ]
    for make, name in cases:
        with pytest.raises(ValueError, match=name):
            make()
    with pytest.raises(TypeError, match="floating-point"):
        Adam4bit([torch.zeros(3, dtype=torch.long)])


def test_load_state_dict_checks_before_changing_anything():
    m = _mlp()
    opt = Adam4bit(m.parameters(), lr=3e-3, min_4bit_size=1024)
    _train(m, opt, 3)
    good = opt.state_dict()
    snapshot = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in st.items()}
                for k, st in opt.state.items()}

    def unchanged():
        return all(all(torch.equal(v, snapshot[p][n]) if torch.is_tensor(v) else v == snapshot[p][n]
                       for n, v in st.items()) for p, st in opt.state.items())

    def broken(key, value, pid=2):
        sd = {"state": {k: dict(v) for k, v in good["state"].items()},
              "param_groups": [dict(g) for g in good["param_groups"]]}
        sd["state"][pid][key] = value
        return sd
    q4 = good["state"][2]["exp_avg_q4"]
    for sd, match in [
        (broken("exp_avg_q4", q4[:-1]), "exp_avg_q4"),
        (broken("exp_avg_q4", q4.float()), "uint8"),
        (broken("exp_avg_absmax", torch.zeros(3)), "block_size=128"),
        (broken("step", -1), "step"),
        (broken("exp_avg_sq", torch.zeros(3), pid=1), "exp_avg_sq"),
    ]:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        assert unchanged() and opt.param_groups[0]["lr"] == 3e-3
    torch_sd = torch.optim.Adam(m.parameters()).state_dict()
    with pytest.raises(ValueError, match="min_4bit_size"):
        opt.load_state_dict(torch_sd)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(sd)
    opt.load_state_dict(good)                          # copies: never shares storage
    pid = next(k for k, st in good["state"].items() if "exp_avg_sq" in st)
    p = list(m.parameters())[pid]
    assert opt.state[p]["exp_avg_sq"].data_ptr() != good["state"][pid]["exp_avg_sq"].data_ptr()
    assert torch.equal(opt.state[p]["exp_avg_sq"], good["state"][pid]["exp_avg_sq"])


# ---------------------------------------------------------------------------------------------
# figures: error vs 8-bit on Adam-like states, drift to fp32 Adam on heavy tails


def test_error_rows_against_8bit():
    from memlab.bench.optim import adam_like_states
    m, v = adam_like_states(2 ** 16)
    rows = error_rows(m, v)
    by = {(r["measure"], r["subject"]): r for r in rows}
    for r in rows:
        print(r)
    m4 = by["quant_error", "exp_avg de4 block128"]
    assert 1 < m4["ratio"] < 30                                  # 4 bits: coarser than 8
    assert by["quant_error", "exp_avg_sq linear0-4 block128"]["zero_fraction"] == 0
    assert by["quant_error", "exp_avg_sq linear0-4 rank1"]["zero_fraction"] == 0
    assert by["quant_error", "exp_avg_sq de4 block128"]["zero_fraction"] > 0.1   # the problem
    assert 0 < by["update_error", "adam4bit block128"]["value"] < 1


def test_drift_to_fp32_on_heavy_tails_vs_adam8bit():
    from memlab.bench.optim import drift_to_fp32, heavy_tailed_gradients
    from memlab.optim import Adam8bit
    n, steps = 2 ** 16, 20
    for sigma in (0.5, 1.5):
        made = []

        def make4(ps):
            made.append(Adam4bit(ps, lr=1e-3))
            return made[-1]
        d4 = drift_to_fp32(make4, sigma=sigma, n=n, steps=steps)
        d8 = drift_to_fp32(lambda ps: Adam8bit(ps, lr=1e-3), sigma=sigma, n=n, steps=steps)
        v = torch.zeros(n)
        for g in heavy_tailed_gradients(n, steps, sigma):
            v.mul_(0.999).addcmul_(g, g, value=0.001)
        opt = made[0]
        p = opt.param_groups[0]["params"][0]
        _, v_hat = stored_moments(opt, p)
        zeros = ((v_hat == 0) & (v > 0)).float().mean().item()
        print(f"sigma={sigma}: drift adam4bit {d4['distance']:.4f}, adam8bit "
              f"{d8['distance']:.4f}, adam4bit zero fraction {zeros}")
        assert zeros == 0
        assert d8["distance"] < d4["distance"] < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    m_a = _mlp(128)
    m_b = _mlp(128).cuda()
    o_a = Adam4bit(m_a.parameters(), lr=3e-3, min_4bit_size=0, rank1=True)
    o_b = Adam4bit(m_b.parameters(), lr=3e-3, min_4bit_size=0, rank1=True)
    la = _train(m_a, o_a, 30)
    lb = []
    for _ in range(30):
        o_b.zero_grad()
        loss = ((m_b(X.cuda()) - Y.cuda()) ** 2).mean()
        loss.backward()
        o_b.step()
        lb.append(loss.item())
    assert ((la - torch.tensor(lb)).abs() / la).max() < 0.05
    st = o_b.state[next(iter(o_b.state))]
    assert all(v.is_cuda for v in st.values() if torch.is_tensor(v))


@pytest.mark.parametrize("shape, kw", [
    ((700, 300), {}), ((700, 300), {"rank1": False}), ((300, 7, 70), {}), ((150001,), {}),
    ((257, 1031), {"weight_decay": 0.1}), ((257, 1031), {"decoupled": True, "weight_decay": 0.1}),
    ((513, 1, 400), {"maximize": True})])
def test_large_tensors_step_by_chunks_with_the_whole_tensor_bits(shape, kw, monkeypatch):
    """Tensors above 2 x 65,536 elements are updated a chunk of rows at a time (two passes for
    a rank-1 second moment); the parameters and every state tensor equal the whole-tensor
    step's, bit for bit, over 4 steps (odd rows, 3 axes, a vector, L2 and decoupled decay,
    maximize)."""
    from memlab import _q4_chunks
    monkeypatch.setenv("MEMLAB_CPU_KERNEL", "0")        # the torch-op step (the C one: below)
    calls = []
    real = _q4_chunks.adam4bit_step

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def run(chunked):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape))
        opts = dict(kw)
        make = AdamW4bit if opts.pop("decoupled", False) else Adam4bit
        opt = make([p], lr=1e-2, **opts)
        with monkeypatch.context() as m:
            if chunked:
                m.setattr(_q4_chunks, "adam4bit_step", counted)
            else:
                m.setattr(_q4_chunks, "usable", lambda *a: False)
            for k in range(4):
                p.grad = torch.randn(shape) * (k + 1) * torch.rand(shape) ** 3
                opt.step()
        return p.detach(), opt.state[p]
    (a, sa), (b, sb) = run(False), run(True)
    assert len(calls) == 4
    assert torch.equal(a, b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


@pytest.mark.parametrize("kernel", [False, True])
def test_step_temporaries_do_not_grow_with_the_tensor(kernel, monkeypatch):
    """The meter's peak of one Adam4bit step over its baseline, for a 1024 x 1024 weight: the
    torch-op step holds the temporaries of one chunk of 65,536+ elements (measured 1.70 MB), not
    ~25.5 B per element of the whole tensor (26.7 MB before the chunked step); the C step no
    torch tensor but its few int64 of axis sizes (its two block buffers are its own)."""
    from memlab import _q4_kernel
    from memlab.memory import MemoryMeter
    if kernel and _q4_kernel.library() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("MEMLAB_CPU_KERNEL", "1" if kernel else "0")
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    p.grad = torch.randn(1024, 1024)
    opt = Adam4bit([p], lr=1e-3)
    opt.step()
    with MemoryMeter("cpu", inputs=[p, p.grad], optimizer=opt) as meter:
        opt.step()
    step = meter.peak - meter.baseline
    assert (0 <= step < 1024) if kernel else (0 < step < 2.5e6), step
    assert opt.state_nbytes() < 1.07 * p.numel()


def _steps(shape, make, kernel, monkeypatch, nan=False, steps=4):
    monkeypatch.setenv("MEMLAB_CPU_KERNEL", "1" if kernel else "0")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = make([p])
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        p.grad = torch.randn(shape, generator=g) * 10 ** torch.randn(shape, generator=g)
        if nan and s == 2:
            p.grad.view(-1)[3] = float("nan")
        opt.step()
    return p.detach().clone(), dict(opt.state[p])


@pytest.mark.parametrize("shape", [(1000,), (7,), (33, 65), (300, 513), (16, 8, 3, 3),
                                   (5, 1, 7), (300001,)])
@pytest.mark.parametrize("make", [
    lambda ps: Adam4bit(ps, lr=1e-2, min_4bit_size=0),
    lambda ps: Adam4bit(ps, lr=1e-2, min_4bit_size=0, rank1=True, weight_decay=0.1),
    lambda ps: AdamW4bit(ps, lr=1e-2, min_4bit_size=0, block_size=64, rank1=False),
    lambda ps: AdamW4bit(ps, lr=1e-2, min_4bit_size=0, maximize=True, betas=(0.3, 0.9)),
    lambda ps: Adam4bit(ps, lr=1e-2, min_4bit_size=0, rank1=True, rounding="nearest"),
    lambda ps: AdamW4bit(ps, lr=1e-2, min_4bit_size=0, rank1=False, rounding="nearest")])
def test_c_step_equals_the_torch_step_bit_for_bit(shape, make, monkeypatch):
    """memlab._q4_kernel against the torch-op step (whole tensor, or by chunks above 131,072
    elements): parameters and every state tensor after 4 steps with gradients spread over ten
    orders of magnitude, block-wise and rank-1 (2 and 4 axes), L2 and decoupled decay,
    maximize, a lerp weight above 0.5 (beta1 = 0.3), dithered and nearest rounding."""
    from memlab import _q4_kernel
    if _q4_kernel.library() is None:
        pytest.skip("no C compiler")
    (a, sa), (b, sb) = (_steps(shape, make, k, monkeypatch) for k in (True, False))
    assert torch.equal(a, b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor)), \
        [k for k in sa if isinstance(sa[k], torch.Tensor) and not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("rank1", [False, True])
def test_c_step_with_a_nan_gradient_equals_the_torch_step(rank1, monkeypatch):
    from memlab import _q4_kernel
    if _q4_kernel.library() is None:
        pytest.skip("no C compiler")

    def make(ps):
        return Adam4bit(ps, lr=1e-2, min_4bit_size=0, rank1=rank1)
    (a, sa), (b, sb) = (_steps((40, 64, 3, 3), make, k, monkeypatch, nan=True)
                        for k in (True, False))
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert bool(a.isnan().any())
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, equal_nan=True)


def test_c_step_is_taken_for_cpu_float32_and_not_on_fake_tensors():
    from memlab import _q4_kernel
    from memlab.optim4bit import _states
    if _q4_kernel.library() is None:
        pytest.skip("no C compiler")
    p = torch.nn.Parameter(torch.randn(64, 64))
    p.grad = torch.randn(64, 64)
    opt = Adam4bit([p], min_4bit_size=0)
    opt.step()
    m, v = _states(p, opt.state[p], opt.param_groups[0])
    assert _q4_kernel.eligible(p.detach(), p.grad, m, v)
    assert not _q4_kernel.eligible(p.detach().double(), p.grad.double(), m, v)
    assert not _q4_kernel.eligible(p.detach().t(), p.grad.t(), m, v)      # not contiguous


@pytest.mark.parametrize("shape,rank1", [((300001,), None), ((600, 700), True),
                                         ((192, 64, 3, 3), True)])
def test_c_step_on_two_threads_equals_the_torch_step(shape, rank1, monkeypatch):
    """The kernel's OpenMP team (whole blocks a thread, rank-1 maxima combined by max) gives the
    one-thread bits."""
    from memlab import _q4_kernel
    if _q4_kernel.library() is None or _q4_kernel._LIBRARY_MT.get() is None:
        pytest.skip("no C compiler with OpenMP")

    def make(ps):
        return Adam4bit(ps, lr=1e-2, min_4bit_size=0, rank1=rank1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a, sa = _steps(shape, make, True, monkeypatch)
    finally:
        torch.set_num_threads(before)
    b, sb = _steps(shape, make, False, monkeypatch)
    assert torch.equal(a, b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


def test_c_step_without_avx512_equals_the_torch_step(monkeypatch):
    """The kernel's plain loops (what a CPU without AVX-512 runs: the build without
    -march=native) give the torch step's bits too."""
    import warnings

    from memlab import _cbuild, _q4_kernel
    if _q4_kernel.library() is None:
        pytest.skip("no C compiler")
    flags = [f for f in _q4_kernel.FLAGS if f not in ("-march=native", "-fopenmp")]

    def build():
        cc = _cbuild.compiler()
        name = _cbuild.lib_name("adam4bit-generic", _q4_kernel.SOURCE, flags, cc,
                                _cbuild.cpu_id())
        return _cbuild.build(name, _q4_kernel.SOURCE, (flags,), cc, warnings.warn)
    generic = _cbuild.LazyLibrary(build, _q4_kernel._declare, "generic 4-bit kernel", "torch")
    monkeypatch.setattr(_q4_kernel, "_LIBRARY", generic)
    monkeypatch.setattr(_q4_kernel, "_LIBRARY_MT", generic)
    for shape, rank1, rounding in (((1000,), None, "dither"), ((300, 513), True, "dither"),
                                   ((16, 8, 3, 3), True, "dither"), ((300, 513), True, "nearest"),
                                   ((1000,), None, "nearest")):
        def make(ps, rank1=rank1, rounding=rounding):
            return AdamW4bit(ps, lr=1e-2, min_4bit_size=0, rank1=rank1, weight_decay=0.1,
                             rounding=rounding)
        (a, sa), (b, sb) = (_steps(shape, make, k, monkeypatch) for k in (True, False))
        assert torch.equal(a, b), shape
        assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
