"""memlab._lattice: the fused transducer loss of one chunk and its in-place gradient -- the C
kernel and the torch code agree with the autograd reference; the gradient overwrites the logits
only when that is safe; the sample-wise step's peak is one chunk's logits (MemoryMeter)."""

import pytest
import torch

from memlab import _lattice, _lattice_kernel
from memlab.memory import MemoryMeter
from memlab.transducer import chunk_bytes, rnnt_loss_reference, samplewise_rnnt_loss

kernel = pytest.mark.skipif(not _lattice_kernel.available(), reason="no C compiler")


def lattice_case(N=4, T=9, U=5, V=37, blank=0, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, U + 1, V, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, V - 1, (N, U), generator=g)
    targets[targets >= blank] += 1                                    # never blank
    t_len = torch.tensor([T, 4, 1, 7][:N])
    u_len = torch.tensor([U, 0, 2, 3][:N])
    w = torch.tensor([0.5, -1.0, 2.0, 0.0][:N], dtype=torch.float64)
    return logits, targets, t_len, u_len, w


def reference(logits, targets, t_len, u_len, w, blank):
    x = logits.detach().double().requires_grad_()
    losses = rnnt_loss_reference(x, targets, t_len, u_len, blank=blank, reduction="none")
    (losses * w).sum().backward()
    return losses.detach(), x.grad


def padded(targets, u_len, blank):
    return torch.where(torch.arange(targets.shape[1])[None] < u_len[:, None], targets, blank)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run(path, logits, targets, t_len, u_len, w, blank, in_place):
    out = logits if in_place else torch.empty_like(logits)
    tg = padded(targets, u_len, blank)
    fn = _lattice.torch_loss if path == "torch" else _lattice_kernel.chunk_loss
    costs = fn(logits, tg, t_len, u_len, blank, w, out)
    return costs, out


PATHS = ["torch", pytest.param("kernel", marks=kernel)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("blank", [0, 5])
def test_chunk_loss_matches_reference_fp64(path, in_place, blank):
    logits, targets, t_len, u_len, w = lattice_case(blank=blank)
    want_loss, want_grad = reference(logits, targets, t_len, u_len, w, blank)
    costs, grad = run(path, logits.clone(), targets, t_len, u_len, w, blank, in_place)
    assert costs.dtype == torch.float64
    assert (costs - want_loss).abs().max() <= 1e-10 * want_loss.abs().max()
    assert (grad - want_grad).abs().max() <= 1e-10
    # cells past each sample's lengths get exactly zero
    for n in range(len(t_len)):
        assert grad[n, t_len[n]:].abs().sum() == 0 and grad[n, :, u_len[n] + 1:].abs().sum() == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("in_place", [False, True])
def test_chunk_loss_matches_reference_fp32(path, in_place):
    logits, targets, t_len, u_len, w = lattice_case(N=4, T=30, U=8, V=300, seed=1)
    want_loss, want_grad = reference(logits.float(), targets, t_len, u_len, w, 0)
    costs, grad = run(path, logits.float(), targets, t_len, u_len, w, 0, in_place)
    assert grad.dtype == torch.float32
    assert rel(costs, want_loss) <= 1e-6
    assert rel(grad, want_grad) <= 1e-5
    for n in range(len(t_len)):                                      # per sample, too
        assert rel(grad[n], want_grad[n]) <= 1e-5 or w[n] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_use_a_float32_lattice(dtype):
    logits, targets, t_len, u_len, w = lattice_case(seed=2, scale=1.0)
    x = logits.to(dtype)
    want_loss, want_grad = reference(x.float(), targets, t_len, u_len, w, 0)
    costs = _lattice.chunk_loss(x, targets, t_len, u_len, 0, w, x)   # the torch code
    assert x.dtype == dtype
    assert rel(costs, want_loss) <= 1e-6                 # only the input was rounded
    assert rel(x, want_grad) <= (1e-2 if dtype == torch.bfloat16 else 2e-3)


@kernel
def test_kernel_and_torch_code_agree_on_edge_shapes():
    g = torch.Generator().manual_seed(3)
    for N, T, U, V in [(1, 1, 0, 2), (2, 1, 3, 3), (3, 5, 0, 17), (2, 3, 2, 16), (1, 40, 7, 33)]:
        for dtype in (torch.float32, torch.float64):
            logits = (torch.randn(N, T, U + 1, V, generator=g) * 4).to(dtype)
            targets = torch.randint(1, V, (N, U), generator=g)
            t_len = torch.randint(1, T + 1, (N,), generator=g)
            u_len = torch.randint(0, U + 1, (N,), generator=g)
            t_len[0], u_len[0] = T, U
            w = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
            a = run("torch", logits.clone(), targets, t_len, u_len, w, 0, True)
            b = run("kernel", logits.clone(), targets, t_len, u_len, w, 0, True)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert rel(b[0], a[0]) <= tol and rel(b[1], a[1]) <= tol, (N, T, U, V, dtype)
            no_grad = _lattice_kernel.chunk_loss(logits, padded(targets, u_len, 0), t_len,
                                                 u_len, 0)
            assert torch.equal(no_grad, b[0])                 # loss only: same values


@kernel
def test_kernel_threads_give_the_same_bits():
    logits, targets, t_len, u_len, w = lattice_case(N=4, T=40, U=6, V=64, seed=4)
    x = logits.float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run("kernel", x.clone(), targets, t_len, u_len, w, 0, True)
        torch.set_num_threads(2)
        b = run("kernel", x.clone(), targets, t_len, u_len, w, 0, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@kernel
def test_kernel_refuses_tensors_it_cannot_read():
    logits, targets, t_len, u_len, w = lattice_case()
    tg = padded(targets, u_len, 0)
    x = logits.float()
    with pytest.raises(ValueError, match="logits"):
        _lattice_kernel.chunk_loss(x.transpose(1, 2), tg, t_len, u_len, 0, w, x)
    with pytest.raises(ValueError, match="out"):
        _lattice_kernel.chunk_loss(x, tg, t_len, u_len, 0, w, x[:2])
    with pytest.raises(ValueError, match="lengths"):
        _lattice_kernel.chunk_loss(x, tg, t_len + 1, u_len, 0, w, x)
    with pytest.raises(ValueError, match="targets"):
        _lattice_kernel.chunk_loss(x, tg + 100, t_len, u_len, 0, w, x)
    with pytest.raises(ValueError, match="weights"):
        _lattice_kernel.chunk_loss(x, tg, t_len, u_len, 0, w[:2], x)


def test_no_kernel_means_the_torch_code(monkeypatch):
    logits, targets, t_len, u_len, w = lattice_case()
    want = _lattice.torch_loss(logits.float(), padded(targets, u_len, 0), t_len, u_len, 0)
    monkeypatch.setenv("MEMLAB_CPU_KERNEL", "0")
    assert not _lattice._kernel_ok(logits, None)
    assert torch.equal(_lattice.chunk_loss(logits.float(), targets, t_len, u_len, 0), want)


@kernel
def test_kernel_cache_is_private_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLAB_CACHE", str(tmp_path / "cache"))
    lib = _lattice_kernel._build()                 # built (not loaded: it is rewritten below)
    folder = tmp_path / "cache" / "kernels"
    assert lib.parent == folder and lib.name.startswith("rnnt-")
    assert (folder.stat().st_mode & 0o077) == 0
    assert _lattice_kernel._build() == lib         # reused while it is unchanged
    lib.write_bytes(lib.read_bytes() + b"planted")                    # checksum now differs
    with pytest.warns(UserWarning, match="rebuilding"):
        assert _lattice_kernel._build() == lib
    assert not lib.read_bytes().endswith(b"planted")


# ------------------------------------------------------------------ in place or not
class LinearJoiner(torch.nn.Module):
    def __init__(self, h=6, v=11, last=None):
        super().__init__()
        self.enc, self.pred, self.out = (torch.nn.Linear(h, h), torch.nn.Linear(h, h),
                                         torch.nn.Linear(h, v))
        self.last = last

    def forward(self, e, p):
        x = self.out(torch.tanh(self.enc(e)[:, :, None] + self.pred(p)[:, None]))
        return x if self.last is None else self.last(x)


def _sw_problem(B=4, T=7, U=3, H=6, V=11, seed=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    pred = torch.randn(B, U + 1, H, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(1, V, (B, U), generator=g)
    el, tl = torch.tensor([T, 5, 1, 6][:B]), torch.tensor([U, 1, 0, 2][:B])
    return enc, pred, targets, el, tl


@pytest.mark.parametrize("last,in_place", [(None, True), (torch.tanh, False),
                                           (lambda x: 3 * x, True),
                                           (lambda x: x.log_softmax(-1), False)])
def test_gradient_overwrites_the_logits_only_when_nothing_saved_them(last, in_place):
    torch.manual_seed(0)
    joiner = LinearJoiner(last=last).double()
    enc, pred, targets, el, tl = _sw_problem(dtype=torch.float64)
    stats = {}
    loss = samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl, reduction="sum",
                                max_chunk_bytes=1, stats=stats)
    assert stats["in_place"] == [in_place] * 4
    ins = [enc, pred, *joiner.parameters()]
    got = torch.autograd.grad(loss, ins)
    want_loss = rnnt_loss_reference(joiner(enc, pred), targets, el, tl, reduction="sum")
    want = torch.autograd.grad(want_loss, ins)
    assert abs(float(loss.detach() - want_loss.detach())) <= 1e-10 * abs(float(want_loss.detach()))
    for a, b in zip(got, want):
        assert rel(a, b) <= 1e-10


def test_a_view_of_a_parameter_is_never_overwritten():
    V, H = 5, 3
    table = torch.nn.Parameter(torch.randn(1, 4, 3, V))

    def joiner(e, p):                       # logits independent of the inputs: a leaf's view
        return table.expand(e.shape[0], -1, -1, -1)[:, :e.shape[1], :p.shape[1]]

    joiner.parameters = lambda: iter([table])
    enc, pred = torch.randn(2, 4, H, requires_grad=True), torch.randn(2, 3, H)
    before = table.detach().clone()
    stats = {}
    loss = samplewise_rnnt_loss(joiner, enc, pred, torch.tensor([[1, 2], [3, 4]]),
                                torch.tensor([4, 2]), torch.tensor([2, 1]), stats=stats)
    loss.backward()
    assert stats["in_place"] == [False]
    assert torch.equal(table.detach(), before)
    x = table.detach().expand(2, -1, -1, -1).requires_grad_()
    rnnt_loss_reference(x.double(), torch.tensor([[1, 2], [3, 4]]), torch.tensor([4, 2]),
                        torch.tensor([2, 1])).backward()
    assert rel(table.grad, x.grad.sum(0, keepdim=True)) <= 1e-5


# ------------------------------------------------------------------ memory
def test_samplewise_peak_is_one_chunk_of_logits():
    """Pinned against the known allocation: a joiner without parameters or hidden activations
    (logits = enc[:, :, None] + pred[:, None]) makes the step's live bytes the inputs' gradient
    buffers, one chunk's logits (overwritten by their gradient) and the lattice scratch; the
    old torchaudio path held the logits and their gradient (2x) at once."""
    B, T, U, V = 6, 40, 9, 96
    g = torch.Generator().manual_seed(6)
    enc = torch.randn(B, T, V, generator=g, requires_grad=True)
    pred = torch.randn(B, U + 1, V, generator=g, requires_grad=True)
    targets = torch.randint(1, V, (B, U), generator=g)
    el, tl = torch.full((B,), T), torch.full((B,), U)

    def joiner(e, p):
        return e[:, :, None] + p[:, None]                                     # (N, T, U+1, V)

    n = 2
    budget = chunk_bytes(n, T, U, V)
    stats = {}
    with MemoryMeter("cpu", inputs=[enc, pred, targets, el, tl], scan=False,
                     timeline=False) as meter:
        samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl, max_chunk_bytes=budget,
                             stats=stats).backward()
    assert stats["in_place"] == [True] * (B // n)
    logits = n * T * (U + 1) * V * 4                       # one chunk's logits
    assert logits == budget // 2
    buffers = 2 * (enc.numel() + pred.numel()) * 4         # enc/pred grads: stored + .grad
    scratch = 5 * n * T * (U + 1) * 8 + 2 * n * (T + U + 1) * V * 4 + 16 * 1024
    step = meter.peak - meter.baseline
    assert logits + buffers <= step <= logits + buffers + scratch, (step, logits, buffers)
    assert step - buffers <= budget                        # within the planned chunk bytes


def test_samplewise_peak_with_a_joiner_stays_within_the_plan():
    from memlab.models.transducer import Joiner
    B, T, U, V, H = 4, 30, 6, 256, 32
    torch.manual_seed(7)
    joiner = Joiner(H, H, H, V)
    enc, pred, targets, el, tl = _sw_problem(B, T, U, H, V, seed=7)
    el, tl = torch.full((B,), T), torch.full((B,), U)
    budget = chunk_bytes(1, T, U, V)
    with MemoryMeter("cpu", model=joiner, inputs=[enc, pred, targets, el, tl],
                     timeline=False) as meter:
        samplewise_rnnt_loss(joiner, enc, pred, targets, el, tl,
                             max_chunk_bytes=budget).backward()
    hidden = 3 * T * (U + 1) * H * 4                       # tanh output + 2 in backward
    params = sum(p.numel() for p in joiner.parameters()) * 4 * 2   # stored + .grad
    buffers = 2 * (enc.numel() + pred.numel()) * 4
    step = meter.peak - meter.baseline
    assert step <= budget // 2 + hidden + params + buffers + 64 * 1024, (step, budget)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_chunk_loss_matches_reference():
    logits, targets, t_len, u_len, w = lattice_case(N=4, T=30, U=8, V=300, seed=8)
    want_loss, want_grad = reference(logits, targets, t_len, u_len, w, 0)
    dev = torch.device("cuda")
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        x = logits.to(dev, dtype)
        costs = _lattice.chunk_loss(x, targets.to(dev), t_len.to(dev), u_len.to(dev), 0,
                                    w.to(dev), x)                # the torch code, in place
        assert rel(costs.cpu(), want_loss) <= tol and rel(x.cpu(), want_grad) <= tol
