"""Robustness pins: half-built objects, stochastic recomputation, bad numbers, side-effect-free
inverses, and errors that say which argument (or layer) is wrong."""

import copy
import math

import pytest
import torch
from torch import nn

from memlab.memory import MemoryMeter
from memlab.reversible import AdditiveCoupling, InvertibleDownsample, ReversibleSequence
from memlab.transducer import (chunk_bytes, plan_chunks, rnnt_forward_variables,
                               rnnt_loss_batched, rnnt_loss_reference, samplewise_rnnt_loss)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ 1. half-built optimizers
def _half_built_sgd(params):
    """The object a failed ``SGD(...)`` leaves behind (kept alive by the traceback)."""
    try:
        torch.optim.SGD(params, lr=-1.0)      # raises before Optimizer.__init__ ran
    except ValueError as e:
        err = e
    frame = err.__traceback__.tb_next.tb_frame
    return err, frame.f_locals["self"]


def test_meter_scan_ignores_a_half_built_optimizer():
    model = nn.Linear(4, 3)
    err, half = _half_built_sgd(model.parameters())
    assert not hasattr(half, "param_groups")
    x = torch.randn(2, 4)
    with MemoryMeter("cpu", scan=True) as m:
        model(x).sum().backward()
    assert m.peak > 0
    del err, half


def test_meter_given_a_half_built_optimizer_says_which_argument():
    model = nn.Linear(4, 3)
    err, half = _half_built_sgd(model.parameters())
    with pytest.raises(TypeError, match="optimizer"):
        MemoryMeter("cpu", model=model, optimizer=half)
    with pytest.raises(TypeError, match="optimizer"):
        MemoryMeter("cpu", model=model, optimizer=[torch.optim.SGD(model.parameters(), lr=0.1),
                                                   torch.optim.SGD.__new__(torch.optim.SGD)])
    del err, half


def test_meter_ignores_a_half_built_module_and_refuses_one_given():
    class Broken(nn.Module):
        def __init__(self):
            raise ValueError("fails before nn.Module.__init__")

    half = Broken.__new__(Broken)
    model = nn.Linear(4, 3)
    with MemoryMeter("cpu", scan=True) as m:
        model(torch.randn(2, 4)).sum().backward()
    assert m.peak > 0
    with pytest.raises(TypeError, match="model"):
        MemoryMeter("cpu", model=[model, half])
    del half


def test_meter_given_an_optimizer_whose_state_is_broken_says_which_argument():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    del opt.state
    with pytest.raises(TypeError, match="optimizer"):
        MemoryMeter("cpu", optimizer=opt)


# ------------------------------------------------------------------ 2. reduction="none" + dropout
class DropoutJoiner(nn.Module):
    """A joiner with dropout whose masks can be recorded and then replayed."""

    def __init__(self, h=5, j=12, v=7, p=0.4):
        super().__init__()
        self.enc, self.pred, self.out = nn.Linear(h, j), nn.Linear(h, j), nn.Linear(j, v)
        self.p = p
        self.masks = None        # list: record the masks of each call; None: do not record
        self.replay = None       # list: use these masks in order instead of drawing new ones

    def forward(self, e, p):
        h = torch.tanh(self.enc(e)[:, :, None] + self.pred(p)[:, None])   # (N, T, U+1, J)
        if self.replay is not None:
            mask = self.replay.pop(0)
        else:
            mask = nn.functional.dropout(torch.ones_like(h), self.p, self.training)
            if self.masks is not None:
                self.masks.append(mask)
        return self.out(h * mask)


def _dropout_problem(B=5, T=7, U=4, V=7, H=5):
    g = torch.Generator().manual_seed(3)
    joiner = DropoutJoiner(H, 12, V).double()
    enc = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    pred = torch.randn(B, U + 1, H, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, V, (B, U), generator=g)
    enc_len = torch.tensor([7, 3, 5, 1, 6])
    tgt_len = torch.tensor([4, 2, 0, 1, 3])
    return joiner, enc, pred, targets, enc_len, tgt_len


def _grads(loss, enc, pred, joiner):
    ins = [enc, pred] + list(joiner.parameters())
    return torch.autograd.grad(loss, ins)


def test_samplewise_none_with_dropout_gradient_is_that_of_the_returned_loss():
    joiner, enc, pred, targets, el, tl = _dropout_problem()
    w = torch.randn(enc.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    joiner.masks = []
    # one sample per joiner call: the recorded masks belong to known samples
    losses = samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl, reduction="none",
                                  max_chunk_bytes=1, stats=(stats := {}))
    masks = joiner.masks[1:]                 # [0] is the 1 x 1 x 1 probe
    joiner.masks = None
    got = _grads((losses * w).sum(), enc, pred, joiner)
    # the same loss, masks replayed, through the fp64 reference with ordinary autograd
    want_losses = []
    for chunk, mask in zip(stats["chunks"], masks):
        (i,) = chunk
        t, u = int(el[i]), int(tl[i])
        joiner.replay = [mask]
        logits = joiner(enc[i:i + 1, :t], pred[i:i + 1, :u + 1])
        want_losses.append((i, rnnt_loss_reference(logits, targets[i:i + 1, :u], el[i:i + 1],
                                                   tl[i:i + 1], reduction="none")[0]))
    joiner.replay = None
    want_losses = torch.stack([l for _, l in sorted(want_losses, key=lambda x: x[0])])
    # torchaudio computes in fp32: the values agree to fp32 rounding
    assert torch.allclose(losses, want_losses.detach(), rtol=1e-5, atol=1e-5)
    want = _grads((want_losses * w).sum(), enc, pred, joiner)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


def test_samplewise_none_with_dropout_matches_sum_for_unit_weights():
    joiner, enc, pred, targets, el, tl = _dropout_problem()
    torch.manual_seed(5)
    loss_sum = samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl, reduction="sum")
    want = _grads(loss_sum, enc, pred, joiner)
    torch.manual_seed(5)
    losses = samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl, reduction="none")
    after_forward = torch.get_rng_state()
    got = _grads(losses.sum(), enc, pred, joiner)
    assert torch.equal(torch.get_rng_state(), after_forward)     # backward leaves the RNG alone
    assert torch.allclose(losses.sum(), loss_sum, rtol=1e-12)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ 3. bad numbers
BAD_NUMBERS = [float("nan"), -1, -1.5, float("-inf"), 0, True, False, "64MiB", None.__class__]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_meter_budget_bad_values_name_argument_and_value(value):
    with pytest.raises((ValueError, TypeError), match="budget") as info:
        MemoryMeter("cpu", budget=value)
    assert repr(value) in str(info.value) or type(value).__name__ in str(info.value)


def test_meter_budget_inf_means_no_limit():
    m = MemoryMeter("cpu", budget=float("inf"))
    assert m.budget is None
    with m:
        torch.ones(1000)
    assert m.peak >= 4000


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_max_chunk_bytes_bad_values_name_argument_and_value(value):
    joiner = DropoutJoiner(5, 6, 7, p=0.0)
    enc, pred = torch.randn(2, 4, 5), torch.randn(2, 3, 5)
    tg, el, tl = torch.tensor([[1, 2], [3, 4]]), torch.tensor([4, 3]), torch.tensor([2, 1])
    for call in (lambda: samplewise_rnnt_loss(joiner, enc, pred, tg, el, tl, max_chunk_bytes=value),
                 lambda: plan_chunks([4, 3], [2, 1], 7, max_chunk_bytes=value)):
        with pytest.raises((ValueError, TypeError), match="max_chunk_bytes") as info:
            call()
        assert repr(value) in str(info.value) or type(value).__name__ in str(info.value)


def test_max_chunk_bytes_inf_means_one_call():
    assert plan_chunks([4, 3, 9], [2, 1, 5], 7, max_chunk_bytes=float("inf")) == [[2, 0, 1]]
    joiner = DropoutJoiner(5, 6, 7, p=0.0)
    enc, pred = torch.randn(2, 4, 5), torch.randn(2, 3, 5)
    tg, el, tl = torch.tensor([[1, 2], [3, 4]]), torch.tensor([4, 3]), torch.tensor([2, 1])
    stats = {}
    a = samplewise_rnnt_loss(joiner, enc, pred, tg, el, tl, max_chunk_bytes=math.inf, stats=stats)
    assert len(stats["chunks"]) == 1
    b = samplewise_rnnt_loss(joiner, enc, pred, tg, el, tl, max_chunk_bytes=1)
    assert torch.allclose(a, b)


# ------------------------------------------------------------------ 4. inverse leaves the model alone
def _bn_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, c_out, 3, padding=1), nn.BatchNorm2d(c_out, momentum=None))


class _CountingLayer(nn.Module):
    """An invertible layer with a buffer that its calls update."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return x * 2

    def inverse(self, y):
        self.calls += 1
        return y / 2


@pytest.mark.parametrize("train", [True, False])
def test_inverse_does_not_change_buffers(train):
    seq = ReversibleSequence([AdditiveCoupling(_bn_block(2, 2), _bn_block(2, 2)), _CountingLayer(),
                              InvertibleDownsample(),
                              AdditiveCoupling(_bn_block(8, 8), _bn_block(8, 8))]).double()
    seq.train(train)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = seq(x)
    before = copy.deepcopy(seq.state_dict())
    xr = seq.inverse(y)
    after = seq.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert (xr - x).abs().max() < 1e-9           # batch statistics, as in forward: exact inverse
    c = seq.layers[0]                            # a coupling's own inverse, too
    before = copy.deepcopy(c.state_dict())
    with torch.no_grad():
        c.inverse(torch.randn_like(x))
    for k, v in c.state_dict().items():
        assert torch.equal(before[k], v), k


# ------------------------------------------------------------------ 5. coupling shape errors
def test_odd_channels_with_shape_preserving_halves_say_which_coupling():
    seq = ReversibleSequence([AdditiveCoupling(nn.Identity(), nn.Identity()),
                              AdditiveCoupling(nn.Identity(), nn.Identity())])
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    for call, i in ((lambda: seq(x), 0), (lambda: seq(x.detach()), 0),
                    (lambda: seq.inverse(x.detach()), 1)):
        with pytest.raises(ValueError, match=rf"layers\[{i}\] \(AdditiveCoupling\)") as info:
            call()
        msg = str(info.value)
        assert "(2, 3, 3, 3)" in msg and "(2, 2, 3, 3)" in msg and "odd channel count (5)" in msg


def test_shape_changing_g_says_which_coupling_expected_and_received():
    class Shrink(nn.Module):
        def forward(self, x):
            return x[..., :-1]

    seq = ReversibleSequence([AdditiveCoupling(nn.Identity(), nn.Identity()),
                              AdditiveCoupling(nn.Identity(), Shrink())])
    x = torch.randn(2, 4, 5, requires_grad=True)
    for call in (lambda: seq(x), lambda: seq(x.detach()), lambda: seq.inverse(x.detach())):
        with pytest.raises(ValueError, match=r"layers\[1\] \(AdditiveCoupling\)") as info:
            call()
        msg = str(info.value)
        assert "g" in msg and "(2, 2, 5)" in msg and "(2, 2, 4)" in msg
    with pytest.raises(ValueError, match=r"AdditiveCoupling.*\(2, 2, 4\)"):
        seq.layers[1](x)


# ------------------------------------------------------------------ argument hardening
class _Joiner(nn.Module):
    def __init__(self, h=4, v=6):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(h, 8), nn.Linear(h, 8), nn.Linear(8, v)

    def forward(self, e, p):
        return self.o(torch.tanh(self.a(e)[:, :, None] + self.b(p)[:, None]))


def _loss_case():
    lg = torch.randn(2, 5, 4, 6)
    tg, el, tl = torch.tensor([[1, 2, 3], [4, 5, 1]]), torch.tensor([5, 4]), torch.tensor([3, 2])
    return lg, tg, el, tl


_LOSS_BAD = [
    ("logits", lambda lg, tg, el, tl: (lg[:, :, :0], tg[:, :0], el, tl * 0), {}),
    ("logits", lambda lg, tg, el, tl: (lg.to_sparse(), tg, el, tl), {}),
    ("logits", lambda lg, tg, el, tl: (lg.to("meta"), tg.to("meta"), el.to("meta"),
                                       tl.to("meta")), {}),
    ("logit_lengths", lambda lg, tg, el, tl: (lg, tg, -el, tl), {}),
    ("target_lengths", lambda lg, tg, el, tl: (lg, tg, el, -tl), {}),
    ("reduction", lambda *a: a, {"reduction": torch.tensor([1, 2])}),
    ("reduction", lambda *a: a, {"reduction": None}),
]


@pytest.mark.parametrize("case", range(len(_LOSS_BAD)))
@pytest.mark.parametrize("fn", [rnnt_loss_reference, rnnt_loss_batched, rnnt_forward_variables])
def test_losses_refuse_bad_inputs_naming_the_argument(fn, case):
    name, change, kw = _LOSS_BAD[case]
    if fn is rnnt_forward_variables and "reduction" in kw:
        pytest.skip("no reduction argument")
    with pytest.raises((ValueError, TypeError), match=name):
        fn(*change(*_loss_case()), **kw)


@pytest.mark.parametrize("clamp", ["x", float("nan"), True, None])
def test_batched_clamp_must_be_a_number(clamp):
    with pytest.raises(TypeError, match="clamp"):
        rnnt_loss_batched(*_loss_case(), clamp=clamp)


def test_samplewise_refuses_bad_inputs_naming_the_argument():
    j = _Joiner()
    enc, pred = torch.randn(2, 5, 4, requires_grad=True), torch.randn(2, 4, 4, requires_grad=True)
    _, tg, el, tl = _loss_case()
    S = samplewise_rnnt_loss
    cases = [
        ("pred_out", lambda: S(j, enc.double(), pred, tg, el, tl)),
        ("pred_out", lambda: S(j, enc, pred[:, :0], tg[:, :0], el, tl * 0)),
        ("joiner.*enc_out", lambda: S(j, torch.randn(2, 5, 3), pred, tg, el, tl)),
        ("joiner.*enc_out", lambda: S(j, enc[..., :0], pred, tg, el, tl)),
        ("joiner", lambda: S(lambda e, p: j(e, p).long(), enc, pred, tg, el, tl)),
        ("joiner", lambda: S(lambda e, p: [1], enc, pred, tg, el, tl)),
        ("joiner", lambda: S(lambda e, p: j(e, p).to("meta"), enc, pred, tg, el, tl)),
        ("accumulate_joiner_grads", lambda: S(j, enc, pred, tg, el, tl,
                                              accumulate_joiner_grads="no")),
        ("stats", lambda: S(j, enc, pred, tg, el, tl, stats=[])),
        ("enc_out", lambda: S(j, enc.to("meta"), pred.to("meta"), tg.to("meta"), el.to("meta"),
                              tl.to("meta"))),
        ("enc_lengths", lambda: S(j, enc, pred, tg, torch.tensor([-3, 2]), tl)),
    ]
    for name, call in cases:
        with pytest.raises((ValueError, TypeError), match=name):
            call()


def test_samplewise_smallest_lattices_work():
    j = _Joiner()
    enc, pred = torch.randn(2, 5, 4, requires_grad=True), torch.randn(2, 4, 4, requires_grad=True)
    _, tg, el, tl = _loss_case()
    samplewise_rnnt_loss(j, enc, pred[:, :1], tg[:, :0], el, tl * 0).backward()   # U = 0
    samplewise_rnnt_loss(j, enc[:1, :1], pred[:1], tg[:1], torch.tensor([1]), tl[:1]).backward()


@pytest.mark.parametrize("call,name", [
    (lambda: plan_chunks([1, 2, 3], [1, 2], 5), "target_lengths"),
    (lambda: plan_chunks([-1, 2], [1, 2], 5), r"enc_lengths\[0\]"),
    (lambda: plan_chunks([3.5, 2], [1, 2], 5), r"enc_lengths\[0\]"),
    (lambda: plan_chunks([1, 2], [1, -2], 5), r"target_lengths\[1\]"),
    (lambda: plan_chunks("ab", "cd", 5), "enc_lengths"),
    (lambda: plan_chunks([1, 2], [1, 2], 0), "vocab_size"),
    (lambda: plan_chunks([1, 2], [1, 2], 5, bytes_per_element=0), "bytes_per_element"),
    (lambda: plan_chunks(torch.ones(2, 2, dtype=torch.long), [1, 2], 5), "enc_lengths"),
    (lambda: chunk_bytes(-1, 2, 3, 4), "n"),
    (lambda: chunk_bytes(1, 2.5, 3, 4), "T"),
    (lambda: chunk_bytes(1, 2, 3, True), "vocab_size"),
])
def test_chunk_planning_refuses_bad_inputs(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()


def test_chunk_planning_takes_numpy_and_tensors():
    import numpy as np
    assert plan_chunks(np.array([3, 4]), torch.tensor([1, 2]), 5) == [[1, 0]]
    assert plan_chunks([], [], 5) == []
    assert chunk_bytes(np.int64(2), 3, 4, 5) == 2 * 2 * 3 * 5 * 5 * 4


def _rev_seq():
    def blk(c):
        return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Dropout(0.1), nn.Conv2d(4, c, 3, padding=1))
    return ReversibleSequence([AdditiveCoupling(blk(2), blk(2)), InvertibleDownsample(),
                               AdditiveCoupling(blk(8), blk(8))])


@pytest.mark.parametrize("make,name", [
    (lambda: torch.ones(2, 4, 6, 6, dtype=torch.long), "x"),
    (lambda: torch.ones(2, 4, 6, 6, dtype=torch.bool), "x"),
    (lambda: torch.ones(2, 4, 6, 6, dtype=torch.complex64), "x"),
    (lambda: [1.0, 2.0], "x"),
    (lambda: torch.randn(2, 6, 6, 6), r"layers\[0\] \(AdditiveCoupling\): f .*argument x"),
    (lambda: torch.randn(2, 6, 6, 6, requires_grad=True), r"layers\[0\].*argument x"),
    (lambda: torch.randn(2, 4, 6), r"layers\[0\].*argument x"),
    (lambda: torch.randn(1, 4, 1, 1, requires_grad=True), r"layers\[0\].*argument x"),
    (lambda: torch.randn(2, 4, 6, 6, dtype=torch.float64), r"layers\[0\].*argument x"),
    (lambda: torch.randn(2, 1, 6, 6), "x must have at least 2 channels"),
])
def test_reversible_forward_refuses_bad_inputs_naming_the_layer(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        _rev_seq()(make())


def test_reversible_empty_batch_and_odd_sizes_work():
    seq = _rev_seq()
    x = torch.randn(0, 4, 6, 6, requires_grad=True)
    y = seq(x)
    assert y.shape == (0, 16, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape
    d = InvertibleDownsample()
    assert d(torch.randn(0, 3, 5, 5)).shape == (0, 12, 3, 3)
    assert d.inverse(torch.randn(0, 12, 3, 3), size=(5, 5)).shape == (0, 3, 5, 5)
    with torch.no_grad():
        seq.eval()
        x = torch.randn(2, 4, 5, 7)
        assert seq(x).shape == (2, 16, 3, 4)


@pytest.mark.parametrize("call,name", [
    (lambda s: s.inverse(torch.ones(2, 16, 3, 3, dtype=torch.long)), "y"),
    (lambda s: s.inverse(torch.randn(2, 12, 3, 3)), r"layers\[2\].*argument y"),
    (lambda s: s.inverse(torch.randn(2, 16, 3, 3), sizes=[None]), "sizes"),
    (lambda s: s.inverse(torch.randn(2, 16, 3, 3), sizes=[None, "ab", None]), "size"),
    (lambda s: s.inverse(torch.randn(2, 16, 3, 3), sizes=[None, (2, 2), None]), "size"),
    (lambda s: InvertibleDownsample().inverse(torch.randn(2, 4, 3)), "y"),
    (lambda s: InvertibleDownsample().inverse(torch.randn(2, 6, 3, 3)), "y"),
    (lambda s: InvertibleDownsample()([1]), "x"),
    (lambda s: AdditiveCoupling(nn.Identity(), nn.Identity())([1]), "x"),
    (lambda s: AdditiveCoupling(nn.Identity(), nn.Identity())(torch.ones(2, 4, dtype=torch.long)),
     "x"),
    (lambda s: AdditiveCoupling(nn.Identity(), nn.Identity()).inverse(torch.tensor(1.0)), "y"),
])
def test_reversible_inverse_and_layers_refuse_bad_inputs(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call(_rev_seq())


def test_frozen_running_stats_refuses_non_batchnorms():
    from memlab.reversible import frozen_running_stats
    with pytest.raises(TypeError, match=r"norms\[0\]"):
        with frozen_running_stats([nn.Linear(2, 2)]):
            pass


def test_reference_losses_fuzzed():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(B=st.integers(0, 3), T=st.integers(0, 4), U1=st.integers(0, 4),
                      V=st.integers(0, 5), el=st.lists(st.integers(-2, 6), min_size=0, max_size=4),
                      tl=st.lists(st.integers(-2, 6), min_size=0, max_size=4),
                      tv=st.integers(-2, 6), blank=st.integers(-1, 5),
                      dtype=st.sampled_from([torch.float32, torch.float64, torch.float16,
                                             torch.bfloat16, torch.int64]))
    def check(B, T, U1, V, el, tl, tv, blank, dtype):
        logits = torch.randn(B, T, U1, V).to(dtype)
        targets = torch.full((B, max(U1 - 1, 0)), tv)
        for fn in (rnnt_loss_reference, rnnt_loss_batched, rnnt_forward_variables):
            try:
                fn(logits, targets, torch.tensor(el, dtype=torch.long),
                   torch.tensor(tl, dtype=torch.long), blank=blank)
            except (ValueError, TypeError) as e:
                assert any(n in str(e) for n in ("logits", "targets", "logit_lengths",
                                                 "target_lengths", "blank", "batch")), str(e)

    check()
