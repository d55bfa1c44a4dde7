"""LowRankAdam: exactness at full rank, memory of gradients + state, checkpoints, unwrapping."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn

from memlab.lowrank import LowRankAdam, LowRankDelta


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Linear (tall and wide), Conv1d, Conv2d and a 2-layer LSTM: every supported kind."""

    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv1d(4 * 6, 10, 3, padding=1, padding_mode="reflect")
        self.lstm = nn.LSTM(10, 12, num_layers=2, batch_first=True)
        self.wide = nn.Linear(12, 30)
        self.tall = nn.Linear(30, 5)

    def forward(self, x):                                       # x: (B, T, 6)
        h = self.conv2(x.unsqueeze(1))                          # (B, 4, T, 6)
        h = h.permute(0, 1, 3, 2).flatten(1, 2)                 # (B, 24, T)
        h = torch.tanh(self.conv1(h)).transpose(1, 2)           # (B, T, 10)
        h, _ = self.lstm(h)                                     # (B, T, 12)
        return self.tall(torch.tanh(self.wide(h)))              # (B, T, 5)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 7, 6, generator=g), torch.randn(3, 7, 5, generator=g))
            for _ in range(n)]


def train(model, opt, data, sched=None):
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def max_diff(a, b, x):
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("proj,attach", [(None, "auto"), (None, "parametrize"), ("svd", "auto")])
def test_full_rank_matches_adam(proj, attach):
    torch.manual_seed(0)
    ref_model = Net()
    model = copy.deepcopy(ref_model)
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2, weight_decay=0.05)
    opt = LowRankAdam(model, lr=1e-2, weight_decay=0.05, rank=10**6, merge_every=3, min_size=0,
                      proj=proj, attach=attach)
    assert len(opt.targets()) == 8                  # 2 convs, 4 LSTM matrices, 2 linears
    x = batches(1, seed=9)[0][0]
    for xb, yb in batches(7):                       # merges after steps 3 and 6
        train(ref_model, ref, [(xb, yb)])
        train(model, opt, [(xb, yb)])
        assert max_diff(ref_model, model, x) < 1e-5
    opt.remove()
    for (n1, p1), (n2, p2) in zip(sorted(ref_model.named_parameters()),
                                  sorted(model.named_parameters())):
        assert n1 == n2 and (p1 - p2).abs().max() < 1e-5


def test_lr_scheduler_full_rank_matches_adam():
    torch.manual_seed(0)
    ref_model = Net()
    model = copy.deepcopy(ref_model)
    ref = torch.optim.Adam(ref_model.parameters(), lr=2e-2)
    opt = LowRankAdam(model, lr=2e-2, rank=64, merge_every=2, min_size=0)
    s_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.1)
    s = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    data = batches(5)
    train(ref_model, ref, data, s_ref)
    train(model, opt, data, s)
    assert all(g["lr"] == pytest.approx(2e-4) for g in opt.param_groups)
    assert max_diff(ref_model, model, data[0][0]) < 1e-5


# ----------------------------------------------------------------------------- memory
def storage_bytes(tensors):
    seen = {}
    for t in tensors:
        if torch.is_tensor(t):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def grad_and_state_bytes(opt, params):
    return storage_bytes([p.grad for p in params] +
                         [v for p in params for v in opt.state[p].values()])


@pytest.mark.parametrize("r", [1, 4, 16])
def test_gradient_and_state_bytes_shrink_as_predicted(r):
    m, n = 96, 160
    torch.manual_seed(0)
    ref_model = nn.Linear(n, m, bias=False)
    model = copy.deepcopy(ref_model)
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-3)
    opt = LowRankAdam(model, lr=1e-3, rank=r)
    x = torch.randn(8, n)
    for mod, o in ((ref_model, ref), (model, opt)):
        mod(x).square().sum().backward()
        o.step()
    full = grad_and_state_bytes(ref, [ref_model.weight])
    low = grad_and_state_bytes(opt, [p for g in opt.param_groups for p in g["params"]])
    # torch Adam: grad + exp_avg + exp_avg_sq (+ a 4-byte step tensor); ours: same for A and B
    assert full == 3 * m * n * 4 + 4
    assert low == 3 * r * (m + n) * 4
    assert low / (full - 4) == pytest.approx(r * (m + n) / (m * n))
    assert model.weight.grad is None and not model.weight.requires_grad   # no full-size grad


def test_memory_meter_agrees():
    """The lead's MemoryMeter sees the same: r(m+n) gradient, 2 r(m+n) state, no m x n grad."""
    meter_mod = pytest.importorskip("memlab.memory")
    m, n, r = 96, 160, 4
    seen = {}
    for name, make in [("adam", lambda mod: torch.optim.Adam(mod.parameters())),
                       ("hook", lambda mod: LowRankAdam(mod, rank=r)),
                       ("parametrize", lambda mod: LowRankAdam(mod, rank=r, attach="parametrize")),
                       ("svd", lambda mod: LowRankAdam(mod, rank=r, proj="svd"))]:
        model = nn.Linear(n, m, bias=False)
        opt = make(model)
        x = torch.randn(8, n)
        with meter_mod.MemoryMeter("cpu", model=model, optimizer=opt, inputs=[x]) as meter:
            model(x).sum().backward()
            opt.step()
            seen[name] = (meter.now(), meter.category_peaks())
    mn, rmn = m * n * 4, r * (m + n) * 4
    now, peaks = seen["adam"]
    assert (now["gradients"], now["optimizer"]) == (mn, 2 * mn + 4)
    for name in ("hook", "parametrize"):
        now, peaks = seen[name]
        assert (now["parameters"], now["gradients"], now["optimizer"]) == (mn + rmn, rmn, 2 * rmn)
    assert seen["hook"][1]["gradients"] < mn / 10               # never a full-size gradient
    assert seen["hook"][1]["activations"] < mn / 5              # nor a full-size W_eff
    assert seen["parametrize"][1]["gradients"] >= mn            # transient dL/dW_eff
    assert seen["parametrize"][1]["activations"] >= mn          # W_eff kept for backward
    now, _ = seen["svd"]
    assert (now["gradients"], now["optimizer"]) == (mn, (2 * r * n + m * r) * 4)


def test_svd_variant_state_is_rank_r_but_gradient_full():
    m, n, r = 64, 160, 4
    model = nn.Linear(n, m, bias=False)
    opt = LowRankAdam(model, rank=r, proj="svd")
    model(torch.randn(8, n)).square().sum().backward()
    opt.step()
    st = opt.state[model.weight]
    assert st["exp_avg"].shape == (r, n) and st["P"].shape == (m, r)
    assert storage_bytes([model.weight.grad]) == m * n * 4
    assert storage_bytes(st.values()) == (2 * r * n + m * r) * 4


def test_hook_attach_makes_no_full_size_tensor_in_backward():
    """With attach='hook' nothing of W's size is created; with 'parametrize' W_eff is."""
    m, n = 64, 128
    sizes = {}
    for attach in ("hook", "parametrize"):
        model = nn.Linear(n, m, bias=False)
        w = model.weight
        LowRankAdam(model, rank=4, attach=attach)
        x = torch.randn(2, n, requires_grad=True)
        big = []

        def pack(t):                                # tensors saved for backward, W aside
            big.append(t.numel() >= m * n and t.data_ptr() != model.weight.data_ptr())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
        y.sum().backward()
        sizes[attach] = any(big)
        assert x.grad is not None and w.grad is None
    assert sizes == {"hook": False, "parametrize": True}


# ----------------------------------------------------------------------------- merge, remove
@pytest.mark.parametrize("attach", ["auto", "parametrize"])
def test_merge_folds_and_restarts(attach):
    torch.manual_seed(0)
    model = Net()
    opt = LowRankAdam(model, lr=1e-2, rank=2, min_size=0, merge_every=1000, attach=attach)
    train(model, opt, batches(3))
    x = batches(1, seed=5)[0][0]
    with torch.no_grad():
        before = model(x)
    f = model.wide.lowrank_weight if attach == "auto" else model.wide.parametrizations.weight[0]
    B_old = f.B.detach().clone()
    assert f.A.abs().sum() > 0 and opt.state[f.A]
    opt.merge()
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-5          # W_eff unchanged
    assert f.A.abs().sum() == 0 and not opt.state[f.A] and not opt.state[f.B]
    assert not torch.equal(f.B, B_old)                          # B re-drawn
    torch.testing.assert_close(f.B @ f.B.T, torch.eye(2) * 12 / 2)  # orthogonal rows, n=12
    train(model, opt, batches(2))                               # trains on after a merge


def test_scheduled_merge_happens():
    model = nn.Linear(64, 64)
    opt = LowRankAdam(model, lr=1e-2, rank=2, merge_every=2)
    w0 = model.weight.detach().clone()
    data = [(torch.randn(4, 64), torch.randn(4, 64)) for _ in range(3)]
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        changed = not torch.equal(model.weight, w0)
        assert changed == (i >= 1)                              # folded after step 2


@pytest.mark.parametrize("attach", ["auto", "parametrize"])
def test_remove_restores_plain_modules(attach):
    torch.manual_seed(0)
    model = Net()
    model.tall.weight.requires_grad_(False)                     # a user-frozen weight stays so
    plain = copy.deepcopy(model)
    keys = set(model.state_dict())
    opt = LowRankAdam(model, lr=1e-2, rank=2, min_size=0, attach=attach)
    assert len(list(model.parameters())) > len(list(plain.parameters()))
    train(model, opt, batches(3))
    x = batches(1, seed=5)[0][0]
    with torch.no_grad():
        before = model(x)
    opt.remove()
    assert set(model.state_dict()) == keys
    for name, mod in model.named_modules():
        assert type(mod) is type(dict(plain.named_modules())[name])
        assert not mod._forward_hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in plain.named_parameters()}
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-5
    fresh = copy.deepcopy(plain)
    fresh.load_state_dict(model.state_dict())                   # a plain checkpoint
    assert max_diff(fresh, model, x) == 0
    with pytest.raises(RuntimeError, match="remove"):
        opt.step()
    LowRankAdam(model, rank=2, min_size=0)                      # can be wrapped again


def test_deepcopy_of_wrapped_model_uses_its_own_factors():
    model = nn.Sequential(nn.Conv1d(64, 64, 1), nn.Flatten(), nn.Linear(64, 64))
    opt = LowRankAdam(model, rank=2, min_size=0)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 64, 1)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
        for f in (twin[0].lowrank_weight, twin[2].lowrank_weight):
            f.A.fill_(0.1)
        assert (twin(x) - model(x)).abs().max() > 0.1
    model(x).sum().backward()
    opt.step()


def test_tied_weights_are_left_to_plain_adam():
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    b.weight = a.weight
    model = nn.Sequential(a, b, nn.Linear(64, 64))
    opt = LowRankAdam(model, rank=2)
    assert [t[0] for t in opt.targets()] == ["2.weight"]
    assert a.weight.requires_grad


def test_wrapping_twice_raises():
    model = nn.Linear(64, 64)
    LowRankAdam(model, rank=2)
    with pytest.raises(ValueError, match="already wrapped"):
        LowRankAdam(model, rank=2)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("proj", [None, "svd"])
def test_state_dict_round_trip_resumes_identically(proj):
    torch.manual_seed(0)
    model = Net()
    opt = LowRankAdam(model, lr=1e-2, rank=2, min_size=0, merge_every=3, proj=proj,
                      weight_decay=0.01)
    data = batches(8)
    train(model, opt, data[:4])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, data[4:])                                 # merges at 6 re-draw B

    torch.manual_seed(123)                                      # different init and RNG
    model2 = Net()
    opt2 = LowRankAdam(model2, lr=1e-2, rank=2, min_size=0, merge_every=3, proj=proj,
                       weight_decay=0.01)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, data[4:])
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_state_dict_survives_torch_save_weights_only(tmp_path):
    model = Net()
    opt = LowRankAdam(model, rank=2, min_size=0)
    train(model, opt, batches(2))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="rank"):
        LowRankAdam(Net(), rank=3, min_size=0).load_state_dict(sd)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("proj,attach", [(None, "auto"), (None, "parametrize"), ("svd", "auto")])
def test_low_rank_training_reduces_loss(proj, attach):
    torch.manual_seed(0)
    model = Net()
    opt = LowRankAdam(model, lr=3e-2, rank=2, min_size=0, merge_every=10, proj=proj,
                      attach=attach)
    x, y = batches(1)[0]
    losses = train(model, opt, [(x, y)] * 25)
    assert losses[-1] < 0.8 * losses[0]
    # the low-rank group holds only factors (or the projected weights)
    for t, (m, n), r, how in opt.targets():
        assert r == min(2, m, n) and how == (proj or ("parametrize" if "lstm" in t else attach
                                                      if attach != "auto" else "hook"))


def test_hook_and_parametrize_give_the_same_training():
    models = []
    for attach in ("hook", "parametrize"):
        torch.manual_seed(0)
        model = Net()
        opt = LowRankAdam(model, lr=1e-2, rank=2, modules=[nn.Linear, nn.Conv1d, nn.Conv2d],
                          min_size=0, merge_every=2, attach=attach, seed=7)
        train(model, opt, batches(5))
        models.append(model)
    assert max_diff(*models, batches(1, seed=3)[0][0]) < 1e-5


def test_selection_by_pattern_type_and_min_size():
    model = Net()
    opt = LowRankAdam(model, rank=2, modules=["lstm", nn.Linear], min_size=0)
    names = [t[0] for t in opt.targets()]
    assert names == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1",
                     "lstm.weight_hh_l1", "wide.weight", "tall.weight"]
    assert model.conv1.weight.requires_grad
    big = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 2))
    opt = LowRankAdam(big, rank=2)                              # min_size=4096: only 5000
    assert [t[0] for t in opt.targets()] == ["0.weight"]
    assert len(opt.param_groups) == 2 and opt.param_groups[0]["lowrank"]
    with pytest.raises(ValueError, match="modules"):
        LowRankAdam(nn.Linear(4, 4), modules=["encoder.*"])
    with pytest.warns(UserWarning, match="plain Adam"):
        LowRankAdam(nn.Linear(4, 4))


def test_grouped_conv_uses_parametrize_and_hook_refuses_it():
    model = nn.Conv1d(8, 8, 5, groups=2)
    opt = LowRankAdam(model, rank=2, min_size=0)
    assert opt.targets()[0][3] == "parametrize"
    model(torch.randn(2, 8, 9)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="attach"):
        LowRankAdam(nn.Conv1d(8, 8, 5, groups=2), min_size=0, attach="hook")


def test_lstm_effective_weight_freed_after_backward():
    lstm = nn.LSTM(8, 16)
    opt = LowRankAdam(lstm, rank=2, min_size=0)
    out, _ = lstm(torch.randn(5, 2, 8))
    refs = [weakref.ref(w) for w in lstm._flat_weights if w is not None]
    out.sum().backward()
    opt.step()
    del out
    gc.collect()
    live = [r() for r in refs if r() is not None]
    assert all(isinstance(w, nn.Parameter) for w in live)     # only biases are still there


def test_autocast_keeps_fp32_factors():
    torch.manual_seed(0)
    model = Net()
    opt = LowRankAdam(model, lr=1e-2, rank=2, min_size=0)
    x, y = batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = (model(x).float() - y).pow(2).mean()
    loss.backward()
    opt.step()
    factors = [p for m in model.modules() if isinstance(m, LowRankDelta) for p in m.trained()]
    assert len(factors) == 16
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in factors)


def test_half_precision_weights():
    model = nn.Linear(64, 64).to(torch.bfloat16)
    opt = LowRankAdam(model, rank=2, merge_every=1)
    assert model.lowrank_weight.A.dtype == torch.float32
    model(torch.randn(2, 64, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    assert model.weight.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lstm_and_autocast():
    torch.manual_seed(0)
    model = Net().cuda()
    ref_model = copy.deepcopy(model)
    opt = LowRankAdam(model, lr=1e-2, rank=10**6, min_size=0, merge_every=2)
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    data = [(x.cuda(), y.cuda()) for x, y in batches(4)]
    train(model, opt, data)
    train(ref_model, ref, data)
    assert max_diff(model, ref_model, data[0][0]) < 1e-4
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(data[0][0]).float().pow(2).mean()
    loss.backward()
    opt.step()


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kw,name", [
    (dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(rank=True), "rank"),
    (dict(merge_every=0), "merge_every"), (dict(lr=-1.0), "lr"), (dict(proj="qr"), "proj"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1), "eps"),
    (dict(weight_decay=-1), "weight_decay"),
    (dict(min_size=-1), "min_size"), (dict(attach="x"), "attach"), (dict(seed="a"), "seed"),
])
def test_bad_args_raise(kw, name):
    with pytest.raises(ValueError, match=name):
        LowRankAdam(nn.Linear(64, 64), **kw)


def test_bad_types_raise():
    with pytest.raises(TypeError, match="model"):
        LowRankAdam([nn.Parameter(torch.zeros(3))])
    with pytest.raises(TypeError, match="modules"):
        LowRankAdam(nn.Linear(64, 64), modules=[3])


def test_registry_factory():
    pytest.importorskip("memlab.optim")         # the factory imports LowRankAdam from there
    from memlab.registry import get
    model = nn.Linear(64, 64)
    opt = get("optimizer", "lowrank-adam").factory(model, lr=1e-3, weight_decay=0.0, rank=3)
    assert isinstance(opt, LowRankAdam) and opt.rank == 3
