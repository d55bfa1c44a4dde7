"""LowRankAdam: exactness at full rank, memory of gradients + state, checkpoints, unwrapping."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

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
    (dict(other_lr=-1e-3), "other_lr"), (dict(other_lr="a"), "other_lr"),
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


# ----------------------------------------------------------------------------- bare weights
class Bare(nn.Module):
    """A custom module whose weight matrix is a bare nn.Parameter (not a Linear)."""

    def __init__(self, n, m):
        super().__init__()
        self.w = nn.Parameter(torch.randn(m, n) / n ** 0.5)       # (m, n)
        self.b = nn.Parameter(torch.zeros(m))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w, self.b)


class AttnNet(nn.Module):
    """A Transformer layer (MultiheadAttention: packed in_proj_weight), a cross-attention with
    kdim/vdim (separate q/k/v_proj_weight), a bare matrix and an embedding."""

    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
        self.cross = nn.MultiheadAttention(d, 2, kdim=6, vdim=6, batch_first=True)
        self.bare = Bare(d, 5)

    def forward(self, x, tokens):                               # x: (B, T, 6), tokens: (B, T)
        h = self.layer(self.embed(tokens))                      # (B, T, d)
        h = h + self.cross(h, x, x, need_weights=False)[0]      # (B, T, d)
        return self.bare(h)                                     # (B, T, 5)


def attn_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(3, 7, 6, generator=g), torch.randint(0, 10, (3, 7), generator=g)),
             torch.randn(3, 7, 5, generator=g)) for _ in range(n)]


def attn_train(model, opt, data):
    for (x, tok), y in data:
        opt.zero_grad()
        (model(x, tok) - y).pow(2).mean().backward()
        opt.step()


ATTN_TARGETS = ["layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight",
                "layer.linear1.weight", "layer.linear2.weight", "cross.q_proj_weight",
                "cross.k_proj_weight", "cross.v_proj_weight", "cross.out_proj.weight", "bare.w"]


def test_bare_weight_matrices_are_adapted():
    model = AttnNet()
    opt = LowRankAdam(model, rank=2, min_size=0)
    got = {name: how for name, _, _, how in opt.targets()}
    assert list(got) == ATTN_TARGETS                            # the embedding keeps Adam
    assert got["layer.self_attn.in_proj_weight"] == got["bare.w"] == "parametrize"
    assert model.embed.weight.requires_grad
    assert all(not p.requires_grad for m in (model.layer.self_attn, model.cross, model.bare)
               for n, p in m.named_parameters() if n.endswith("original"))
    attn_train(model, opt, attn_batches(2))
    assert model.layer.self_attn.parametrizations.in_proj_weight.original.grad is None
    (x, tok), _ = attn_batches(1, seed=5)[0]
    f = model.layer.self_attn.parametrizations.in_proj_weight[0]
    assert f.A.abs().sum() > 0
    with torch.no_grad():
        before = model(x, tok)
        opt.merge()                                             # folds A B into W
        assert (model(x, tok) - before).abs().max() < 1e-5 and f.A.abs().sum() == 0
    with pytest.raises(ValueError, match="attach"):
        LowRankAdam(AttnNet(), rank=2, min_size=0, attach="hook")
    opt = LowRankAdam(AttnNet(), rank=2, modules=[nn.MultiheadAttention], min_size=0)
    assert [t[0] for t in opt.targets()] == ["layer.self_attn.in_proj_weight",
                                             "cross.q_proj_weight", "cross.k_proj_weight",
                                             "cross.v_proj_weight"]


def test_attention_full_rank_matches_adam():
    torch.manual_seed(0)
    ref_model = AttnNet()
    model = copy.deepcopy(ref_model)
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2, weight_decay=0.05)
    opt = LowRankAdam(model, lr=1e-2, weight_decay=0.05, rank=10**6, merge_every=3, min_size=0)
    (x, tok), _ = attn_batches(1, seed=9)[0]
    for batch in attn_batches(7):                              # merges after steps 3 and 6
        attn_train(ref_model, ref, [batch])
        attn_train(model, opt, [batch])
        with torch.no_grad():
            assert (ref_model(x, tok) - model(x, tok)).abs().max() < 1e-5
    opt.remove()
    for (n1, p1), (n2, p2) in zip(sorted(ref_model.named_parameters()),
                                  sorted(model.named_parameters())):
        if n1.endswith("in_proj_bias"):     # the key bias has a zero gradient (softmax is
            d = p1.shape[0] // 3            # shift-invariant): Adam blows its rounding noise
            p1, p2 = p1[[*range(d), *range(2 * d, 3 * d)]], p2[[*range(d), *range(2 * d, 3 * d)]]
        assert n1 == n2 and (p1 - p2).abs().max() < 1e-5, n1


@pytest.mark.parametrize("r", [1, 4])
def test_in_proj_bytes_shrink_as_predicted(r):
    """MultiheadAttention's packed (3d, d) in_proj_weight: r(m+n) gradient, 2 r(m+n) state,
    no m x n gradient, and MemoryMeter agrees."""
    meter_mod = pytest.importorskip("memlab.memory")
    d = 64
    m, n = 3 * d, d
    torch.manual_seed(0)
    seen = {}
    for name in ("adam", "lowrank"):
        mha = nn.MultiheadAttention(d, 4, bias=False, batch_first=True)
        mha.out_proj.weight.requires_grad_(False)              # only in_proj_weight trains
        opt = (torch.optim.Adam([mha.in_proj_weight]) if name == "adam" else
               LowRankAdam(mha, rank=r))
        x = torch.randn(2, 5, d)
        mha(x, x, x)[0].square().sum().backward()              # warm-up: state allocated
        opt.step()
        with meter_mod.MemoryMeter("cpu", model=mha, optimizer=opt, inputs=[x]) as meter:
            opt.zero_grad(set_to_none=True)
            mha(x, x, x)[0].square().sum().backward()
            opt.step()
            now = meter.now()
        params = [p for g in opt.param_groups for p in g["params"]]
        seen[name] = (grad_and_state_bytes(opt, params), now)
    mn, rmn = m * n * 4, r * (m + n) * 4
    assert seen["adam"][0] == 3 * mn + 4
    assert seen["lowrank"][0] == 3 * rmn
    assert seen["lowrank"][0] / (seen["adam"][0] - 4) == pytest.approx(r * (m + n) / (m * n))
    now = seen["lowrank"][1]
    assert (now["gradients"], now["optimizer"]) == (rmn, 2 * rmn)
    now = seen["adam"][1]
    assert (now["gradients"], now["optimizer"]) == (mn, 2 * mn + 4)


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_fast_path_and_need_weights(need_weights, monkeypatch):
    """In eval mode without grad, a wrapped MultiheadAttention still takes the fused fast path
    (it reads in_proj_weight = W + A B) and gives the same output as a plain copy holding W_eff."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    opt = LowRankAdam(mha, lr=1e-2, rank=2, min_size=0, merge_every=1000)
    x = torch.randn(3, 7, 16)
    for _ in range(3):
        opt.zero_grad()
        mha(x, x, x)[0].square().mean().backward()
        opt.step()
    plain = nn.MultiheadAttention(16, 2, batch_first=True)
    with torch.no_grad():
        plain.in_proj_weight.copy_(mha.in_proj_weight)        # W + A B
        plain.in_proj_bias.copy_(mha.in_proj_bias)
        plain.out_proj.weight.copy_(mha.out_proj.weight)
        plain.out_proj.bias.copy_(mha.out_proj.bias)
    assert not torch.equal(plain.in_proj_weight, mha.parametrizations.in_proj_weight.original)
    calls = []
    fused = torch._native_multi_head_attention

    def spy(*args, **kw):
        calls.append(1)
        return fused(*args, **kw)

    monkeypatch.setattr(torch, "_native_multi_head_attention", spy)
    mha.eval(), plain.eval()
    with torch.no_grad():
        out, w = mha(x, x, x, need_weights=need_weights)
        ref, w_ref = plain(x, x, x, need_weights=need_weights)
    assert calls == [1, 1]                                      # both took the fast path
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)
    else:
        assert w is None and w_ref is None


def test_remove_restores_plain_attention():
    torch.manual_seed(0)
    model = AttnNet()
    plain = copy.deepcopy(model)
    keys = set(model.state_dict())
    opt = LowRankAdam(model, lr=1e-2, rank=2, min_size=0)
    assert type(model.layer.self_attn) is not nn.MultiheadAttention      # parametrized class
    attn_train(model, opt, attn_batches(3))
    (x, tok), _ = attn_batches(1, seed=5)[0]
    with torch.no_grad():
        before = model(x, tok)
    opt.remove()
    assert set(model.state_dict()) == keys
    for name, mod in model.named_modules():
        assert type(mod) is type(dict(plain.named_modules())[name])
        assert not parametrize.is_parametrized(mod) and not mod._forward_hooks
    w = model.layer.self_attn.in_proj_weight
    assert isinstance(w, nn.Parameter) and w.requires_grad
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert (model(x, tok) - before).abs().max() < 1e-5
    fresh = copy.deepcopy(plain)
    fresh.load_state_dict(model.state_dict())
    fresh.eval(), model.eval()
    with torch.no_grad():                                       # the fused path, plain modules
        assert torch.equal(fresh(x, tok), model(x, tok))


def test_attention_state_dict_round_trip():
    torch.manual_seed(0)
    model = AttnNet()
    opt = LowRankAdam(model, lr=1e-2, rank=2, min_size=0, merge_every=3, weight_decay=0.01)
    data = attn_batches(8)
    attn_train(model, opt, data[:4])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    attn_train(model, opt, data[4:])
    torch.manual_seed(123)
    model2 = AttnNet()
    opt2 = LowRankAdam(model2, lr=1e-2, rank=2, min_size=0, merge_every=3, weight_decay=0.01)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    attn_train(model2, opt2, data[4:])
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_other_lr_sets_the_plain_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    ref_model = copy.deepcopy(model)
    opt = LowRankAdam(model, lr=1e-3, rank=2, other_lr=1e-2)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]
    assert [g["lowrank"] for g in opt.param_groups] == [True, False]
    ref = torch.optim.Adam([ref_model[0].bias, *ref_model[1].parameters()], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    x = torch.randn(4, 64)
    for mod, o in ((model, opt), (ref_model, ref)):
        mod(x).pow(3).mean().backward()
        o.step()
    # the plain group (bias, LayerNorm) is plain Adam at other_lr
    torch.testing.assert_close(model[1].weight, ref_model[1].weight)
    torch.testing.assert_close(model[0].bias, ref_model[0].bias)
    sched.step()                                                # each group scaled on its own
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-3])
    assert LowRankAdam(nn.Linear(64, 64), lr=1e-3).param_groups[1]["lr"] == 1e-3
