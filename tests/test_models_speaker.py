"""Speaker models: shapes, parameter counts, memory variants, input validation, AAM-softmax."""

import copy

import pytest
import torch

from memlab.models.dfresnet import DFResNet
from memlab.models.heads import AAMSoftmax, StatsPool
from memlab.models.resnet import ResNet
from memlab.reversible import ReversibleSequence

MEMORY = ("vanilla", "checkpoint", "reversible", "reversible-full")
TINY = dict(width=8, feat_dim=20, embed_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cls, memory, **kw):
    if cls is ResNet:
        return ResNet(num_blocks=(2, 2, 2, 1), memory=memory, **TINY, **kw)
    return DFResNet(depths=(1, 2, 2, 1), memory=memory, **TINY, **kw)


@pytest.mark.parametrize("cls", [ResNet, DFResNet])
@pytest.mark.parametrize("memory", MEMORY)
def test_forward_backward_shapes(cls, memory):
    net = tiny(cls, memory)
    x = torch.randn(3, 13, 20)                              # odd T: padding in the downsampling
    emb = net(x)
    assert emb.shape == (3, 16)
    emb.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 5, 20)).shape == (1, 16)


def test_resnet34_param_count():
    n = ResNet().num_params()                               # wespeaker ResNet34: 6.63 M
    assert abs(n - 6.63e6) / 6.63e6 < 0.01, n


@pytest.mark.parametrize("cls,kw", [(ResNet, {}), (DFResNet, {})])
def test_variants_have_nearly_the_same_params(cls, kw):
    counts = {m: cls(memory=m, **kw).num_params() for m in MEMORY}
    base = counts["vanilla"]
    assert counts["checkpoint"] == base
    for m, n in counts.items():
        assert abs(n - base) / base < 0.01, (m, n, base)


def test_dfresnet_param_counts_plausible():
    n56 = DFResNet(depths=(3, 3, 9, 3)).num_params()
    n233 = DFResNet(depths=(3, 8, 63, 3)).num_params()
    assert 4.0e6 < n56 < 5.5e6 and 11e6 < n233 < 13.5e6, (n56, n233)


@pytest.mark.parametrize("cls", [ResNet, DFResNet])
def test_checkpoint_equals_vanilla(cls):
    torch.manual_seed(0)
    van = tiny(cls, "vanilla").double()
    ck = tiny(cls, "checkpoint").double()
    ck.load_state_dict(van.state_dict())
    x = torch.randn(2, 11, 20, dtype=torch.float64)
    w = torch.randn(2, 16, dtype=torch.float64)
    (van(x) * w).sum().backward()
    (ck(x) * w).sum().backward()
    for (n, p), (_, q) in zip(van.named_parameters(), ck.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12), n
    for (n, b), (_, c) in zip(van.named_buffers(), ck.named_buffers()):
        assert torch.equal(b, c), n                          # BN stats updated once


@pytest.mark.parametrize("cls", [ResNet, DFResNet])
@pytest.mark.parametrize("memory", ["reversible", "reversible-full"])
def test_reversible_model_gradients_equal_plain(cls, memory):
    torch.manual_seed(0)
    net = tiny(cls, memory).double()
    ref = copy.deepcopy(net)
    for m in ref.modules():                                 # the same blocks, ordinary autograd
        if isinstance(m, ReversibleSequence):
            m.forward = m._plain
    x = torch.randn(2, 13, 20, dtype=torch.float64)
    w = torch.randn(2, 16, dtype=torch.float64)
    ya, yb = net(x), ref(x)
    assert torch.allclose(ya, yb, rtol=0, atol=1e-10)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    for (n, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        err = (p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)
        assert err <= 1e-8 or (p.grad - q.grad).abs().max() < 1e-12, (n, err.item())
    for (n, b), (_, c) in zip(net.named_buffers(), ref.named_buffers()):
        assert torch.allclose(b, c, rtol=0, atol=1e-12), n


@pytest.mark.parametrize("cls", [ResNet, DFResNet])
def test_bad_input(cls):
    net = tiny(cls, "vanilla")
    with pytest.raises(ValueError, match=r"x must have shape .*\(4, 20\)"):
        net(torch.randn(4, 20))
    with pytest.raises(ValueError, match=r"feat_dim=20.*\(2, 10, 40\)"):
        net(torch.randn(2, 10, 40))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        net([[1.0] * 20])
    with pytest.raises(TypeError, match="floating"):
        net(torch.zeros(2, 10, 20, dtype=torch.long))


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="memory must be one of"):
        ResNet(memory="magic")
    with pytest.raises(TypeError, match="memory must be a str"):
        DFResNet(memory=None)
    with pytest.raises(ValueError, match="width must be even"):
        ResNet(width=7, memory="reversible")
    with pytest.raises(ValueError, match="num_blocks"):
        ResNet(num_blocks=(3, 4, 6))
    with pytest.raises(ValueError, match="depths"):
        DFResNet(depths=(3, 0, 9, 3))


def test_stats_pool_single_frame_is_finite():
    out = StatsPool()(torch.randn(2, 3, 4, 1))
    assert out.shape == (2, 24) and torch.isfinite(out).all()


def test_aam_softmax():
    torch.manual_seed(0)
    head = AAMSoftmax(16, 5, margin=0.2, scale=32.0)
    emb = torch.randn(6, 16, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss, logits = head(emb, labels)
    assert loss.dim() == 0 and torch.isfinite(loss) and logits.shape == (6, 5)
    assert logits.abs().max() <= 1.0 + 1e-6                 # cosines, no margin, no scale
    loss.backward()
    assert emb.grad is not None and head.weight.grad is not None
    no_margin = AAMSoftmax(16, 5, margin=0.0, scale=32.0).requires_grad_(False)
    no_margin.weight.copy_(head.weight)
    assert no_margin(emb, labels)[0] < loss                 # the margin makes the task harder
    with pytest.raises(ValueError, match="labels must have shape"):
        head(emb, labels[:3])
    with pytest.raises(ValueError, match="emb must have shape"):
        head(torch.randn(6, 8), labels)
    with pytest.raises(ValueError, match="margin"):
        AAMSoftmax(16, 5, margin=-0.1)
