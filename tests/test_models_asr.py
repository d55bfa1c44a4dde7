"""memlab.models.transducer.Transducer: shapes, padding, both loss strategies, decoding, checks."""

import pytest
import torch

from memlab.models.transducer import Joiner, Transducer

V = 12


def tiny(loss="batched", **kw):
    torch.manual_seed(0)
    return Transducer(V, feat_dim=20, enc_dim=32, enc_layers=1, pred_dim=24, joint_dim=16,
                      loss=loss, **kw)


def batch(B=4, T=37, U=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feat_lengths = torch.tensor([T, 20, 9, 1][:B])
    feats = torch.randn(B, T, 20, generator=g)
    feats = feats * (torch.arange(T)[None, :, None] < feat_lengths[:, None, None])  # zero padding
    target_lengths = torch.tensor([U, 3, 0, 1][:B])
    targets = torch.randint(1, V, (B, U), generator=g)
    return feats, feat_lengths, targets, target_lengths


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_encode_shapes_and_lengths():
    model = tiny().eval()
    feats, fl, _, _ = batch()
    enc, lengths = model.encode(feats, fl)
    assert enc.shape == (4, 10, 32)                           # ceil(37 / 4) = 10
    assert lengths.tolist() == [10, 5, 3, 1]                  # ceil(L / 4)
    assert model.joiner(enc, torch.randn(4, 7, 24)).shape == (4, 10, 7, V)
    assert isinstance(model.joiner, Joiner)


@pytest.mark.parametrize("loss", ["batched", "samplewise"])
def test_padding_does_not_leak(loss):
    model = tiny(loss).eval()
    feats, fl, tg, tl = batch()
    together = model(feats, fl, tg, tl)
    alone = [model(feats[i:i + 1, :fl[i]], fl[i:i + 1], tg[i:i + 1, :tl[i]], tl[i:i + 1])
             for i in range(4)]
    assert torch.allclose(together, torch.stack(alone).mean(), rtol=1e-5)


def test_batched_and_samplewise_give_the_same_loss_and_grads():
    feats, fl, tg, tl = batch()
    results = []
    for loss, kw in (("batched", {}), ("samplewise", {"max_chunk_bytes": 4000})):
        model = tiny(loss, dropout=0.0, **kw)
        value = model(feats, fl, tg, tl)
        value.backward()
        results.append((value.detach(), grads(model)))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) == len(list(tiny().parameters()))
    for name in g1:
        err = (g1[name] - g2[name]).norm() / g1[name].norm().clamp_min(1e-12)
        assert err <= 1e-5, (name, float(err))


def test_training_lowers_the_loss():
    model = tiny("samplewise", dropout=0.0)
    feats, fl, tg, tl = batch()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(feats, fl, tg, tl)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_greedy_decode_shapes():
    model = tiny().eval()
    feats, fl, _, _ = batch()
    hyps = model.greedy_decode(feats, fl, max_symbols_per_frame=3)
    assert len(hyps) == 4
    for h, n in zip(hyps, [10, 5, 3, 1]):
        assert isinstance(h, list) and len(h) <= 3 * n
        assert all(isinstance(k, int) and 1 <= k < V for k in h)
    # batching does not change a hypothesis
    assert model.greedy_decode(feats[1:2, :20], fl[1:2], max_symbols_per_frame=3)[0] == hyps[1]
    with pytest.raises(ValueError, match="max_symbols_per_frame"):
        model.greedy_decode(feats, fl, max_symbols_per_frame=0)


def test_input_checks():
    model = tiny()
    feats, fl, tg, tl = batch()
    with pytest.raises(ValueError, match="feats"):
        model(feats[..., :10], fl, tg, tl)
    with pytest.raises(ValueError, match="feats"):
        model(feats[0], fl, tg, tl)
    with pytest.raises(ValueError, match="feat_lengths"):
        model(feats, fl + 1, tg, tl)
    with pytest.raises(TypeError, match="feat_lengths"):
        model(feats, fl.float(), tg, tl)
    with pytest.raises(ValueError, match="target_lengths"):
        model(feats, fl, tg, tl + 1)
    bad = tg.clone()
    bad[0, 0] = 0
    with pytest.raises(ValueError, match="blank"):
        model(feats, fl, bad, tl)
    with pytest.raises(ValueError, match="loss"):
        tiny("sparse")
    with pytest.raises(ValueError, match="subsample"):
        tiny(subsample=3)
    with pytest.raises(ValueError, match="blank"):
        tiny(blank=V)


@pytest.mark.parametrize("subsample", [1, 2, 4])
def test_subsampling_factors(subsample):
    model = tiny(subsample=subsample).eval()
    feats, fl, tg, tl = batch()
    enc, lengths = model.encode(feats, fl)
    assert enc.shape[1] == -(-37 // subsample)
    assert lengths.tolist() == [-(-int(n) // subsample) for n in fl]
    assert torch.isfinite(model(feats, fl, tg, tl))


@pytest.mark.parametrize("loss", ["pruned", "samplewise-pruned"])
def test_pruned_losses_from_the_model_table(loss):
    """loss='pruned' adds the simple joint's projections; with a band as wide as the lattice the
    pruned part is the full RNN-T loss, so the model's loss = 0.5 * simple + full (fp64)."""
    from memlab.models.transducer import LOSSES, batched_loss
    from memlab.pruned import simple_rnnt_loss
    torch.manual_seed(0)
    m = Transducer(10, enc_dim=16, enc_layers=0, pred_dim=16, joint_dim=16, loss=loss,
                   prune_range=8, dropout=0.0).double()
    enc = torch.randn(2, 12, 16, dtype=torch.float64)
    pred = torch.randn(2, 5, 16, dtype=torch.float64)
    t, el, tl = torch.randint(1, 10, (2, 4)), torch.tensor([12, 9]), torch.tensor([4, 2])
    got = LOSSES[loss](m, enc, pred, t, el, tl)
    simple = simple_rnnt_loss(m.simple_am_proj(enc), m.simple_lm_proj(pred), t, el, tl)
    want = 0.5 * simple + batched_loss(m, enc, pred, t, el, tl)
    assert torch.allclose(got, want, rtol=1e-6)      # torchaudio computes in float32
    feats = torch.randn(2, 40, 80, dtype=torch.float64)
    m(feats, torch.tensor([40, 28]), t, tl).backward()
    assert m.simple_am_proj.weight.grad is not None and m.simple_lm_proj.weight.grad is not None
    assert not hasattr(Transducer(10, enc_dim=16, pred_dim=16, joint_dim=16), "simple_am_proj")
    with pytest.raises(ValueError, match="prune_range"):
        Transducer(10, loss=loss, prune_range=0)
