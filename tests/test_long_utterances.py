"""The long-utterances scenario reaches the sample-wise loss's regime (issue 14), and the Config
fields it turns (max_chunk_bytes, frontend, frontend_channels) reach the Transducer."""

import contextlib
import functools

import pytest
import torch

from memlab import scenarios
from memlab.lab import Config, Experiment, build_model, estimate_config, peak_record
from memlab.models.transducer import Stacking, Subsampling

NAME = "long-utterances"
LOSSES = ("batched", "samplewise")


def test_new_fields_default_to_the_old_model():
    cfg = Config(task="asr")
    assert (cfg.max_chunk_bytes, cfg.frontend, cfg.frontend_channels) == (None, None, None)
    torch.manual_seed(0)
    model = build_model(cfg.validate())
    assert isinstance(model.subsampling, Subsampling) and model.max_chunk_bytes is None
    assert model.subsampling.conv1.out_channels == 32
    torch.manual_seed(0)
    from memlab.models import Transducer
    old = Transducer(cfg.vocab_size, enc_dim=cfg.width, enc_layers=cfg.depth,
                     pred_dim=cfg.width, joint_dim=cfg.width)
    a, b = model.state_dict(), old.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_new_fields_reach_the_transducer():
    cfg = Config(task="asr", loss="samplewise", max_chunk_bytes=1 << 20, frontend_channels=4)
    model = build_model(cfg.validate())
    assert model.max_chunk_bytes == 1 << 20 and model.subsampling.conv1.out_channels == 4
    model = build_model(Config(task="asr", frontend="stack").validate())
    assert isinstance(model.subsampling, Stacking)
    feats, lengths = torch.randn(2, 37, 80), torch.tensor([37, 21])
    out, out_len = model.subsampling(feats, lengths)
    assert out.shape == (2, 10, cfg.width) and out_len.tolist() == [10, 6]
    # padding never leaks: the second utterance's output ignores frames past its length
    noisy = feats.clone()
    noisy[1, 21:] = 100.0
    assert torch.allclose(model.subsampling(noisy, lengths)[0][1, :6], out[1, :6])


@pytest.mark.parametrize("field, bad, err", [
    ("max_chunk_bytes", 0, ValueError), ("max_chunk_bytes", -5, ValueError),
    ("max_chunk_bytes", 1.5, TypeError), ("max_chunk_bytes", True, TypeError),
    ("frontend_channels", 0, ValueError), ("frontend_channels", "8", TypeError),
    ("frontend", "mel", ValueError)])
def test_new_fields_refuse_bad_values(field, bad, err):
    with pytest.raises(err, match=field):
        Config(task="asr", **{field: bad}).validate()


@pytest.mark.parametrize("field, value", [("max_chunk_bytes", 1 << 20), ("frontend", "stack"),
                                          ("frontend_channels", 8)])
def test_new_fields_are_asr_only(field, value):
    with pytest.raises(ValueError, match=f"{field} applies to task='asr' only"):
        Config(task="speaker", **{field: value}).validate()


def test_estimate_samplewise_at_most_a_quarter_at_full_size(one_thread):
    """The meter on fake tensors, the scenario's full (~2 min a run) sizes."""
    peaks = {L: estimate_config(scenarios.config(NAME, loss=L, fast=False), steps=2).peak
             for L in LOSSES}
    assert 4 * peaks["samplewise"] <= peaks["batched"], peaks


def _live_peaks(fast, **over):
    peaks = {}
    for L in LOSSES:
        cfg = scenarios.config(NAME, loss=L, fast=fast, **over)
        peaks[L] = peak_record(list(Experiment(cfg).run()))
    return peaks


def test_real_metered_step_samplewise_at_most_a_quarter(one_thread):
    """Real CPU steps under the MemoryMeter at the fast-mode sizes (same regime, seconds)."""
    peaks = _live_peaks(True, steps=2, measure_every=1, eval_every=2)
    assert all(p.peak for p in peaks.values())
    assert 4 * peaks["samplewise"].peak <= peaks["batched"].peak, \
        {k: p.peak for k, p in peaks.items()}



@functools.lru_cache(maxsize=1)
def _full_size_runs():
    """Both losses trained at the scenario's full size (~3 min for the two on a laptop CPU):
    loss -> (final TER, peak bytes)."""
    out = {}
    with _one_thread():
        for L in LOSSES:
            records = list(Experiment(scenarios.config(NAME, loss=L, fast=False)).run())
            out[L] = ([r.metrics["ter"] for r in records if r.metrics][-1],
                      peak_record(records).peak)
    return out


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# pytest-xdist (-n 2 --dist loadgroup): the two tests below share one training of both losses
# (_full_size_runs is cached per process), so they keep one worker
FULL_SIZE = pytest.mark.xdist_group("long_utterances_full_size")


@pytest.mark.slow
@FULL_SIZE
def test_full_size_runs_agree_at_a_quarter_of_the_memory():
    """The same gradients, so the same TER curve; the sample-wise peak a quarter of the
    batched one (measured: 145.8 MiB vs 29.8 MiB, TER 0.692 / 0.692)."""
    runs = _full_size_runs()
    (ter_b, peak_b), (ter_s, peak_s) = runs["batched"], runs["samplewise"]
    assert 4 * peak_s <= peak_b, runs
    assert abs(ter_b - ter_s) < 0.05, runs


@pytest.mark.slow
@FULL_SIZE
def test_full_size_runs_learn():
    """Both runs learn: TER well below an empty transcript's 1.0 (0.692 / 0.692 measured; before
    the context front end and the factored output layer it stayed at 0.997). The bound leaves
    room for where the plateau ends (0.68-0.76 at learning rates 0.008-0.015)."""
    runs = _full_size_runs()
    assert all(ter < 0.85 for ter, _ in runs.values()), runs


# ---------------------------------------------------------------------------------------------
# what makes the corpus learnable in minutes: the context front end and the factored output


def test_context_front_end_shapes_and_padding():
    from memlab.models.transducer import ContextWindow
    torch.manual_seed(0)
    fe = ContextWindow(80, 16)
    feats, lengths = torch.randn(2, 41, 80), torch.tensor([41, 22])
    out, out_len = fe(feats, lengths)
    assert out.shape == (2, 11, 16) and out_len.tolist() == [11, 6]
    noisy = feats.clone()
    noisy[1, 22:] = 100.0                      # padding never leaks into the valid frames
    assert torch.allclose(fe(noisy, lengths)[0][1, :6], out[1, :6])
    # each output frame is one 24-frame window: a Linear on the unfolded, centred windows
    x = torch.nn.functional.pad(feats[:1].transpose(1, 2), (10, 4 * 10 + 24 - 10 - 41))
    win = x.unfold(2, 24, 4)                                                  # (1, 80, 11, 24)
    ref = torch.einsum("bftw,dfw->btd", win, fe.conv.weight) + fe.conv.bias
    assert torch.allclose(out[:1], ref, atol=1e-5)
    with pytest.raises(ValueError, match="window"):
        ContextWindow(80, 16, 4, window=2)


def test_factored_output_layer():
    from memlab.data import syllable_factors
    from memlab.data.syllables import syllable
    from memlab.models.transducer import Joiner
    f = syllable_factors(321)
    assert f.shape == (321, 2) and f[0].tolist() == [16, 20]
    assert f[5].tolist() == list(syllable(5))
    torch.manual_seed(0)
    j = Joiner(8, 8, 8, 321, factors=f)
    assert (j.out.weight == 0).all()           # starts as onset row + nucleus row
    e, p = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    logits = j(e, p)
    w = j.out.weight + j.factor_embed[0][f[:, 0]] + j.factor_embed[1][f[:, 1]]
    h = torch.tanh(j.enc_proj(e)[:, :, None] + j.pred_proj(p)[:, None])
    assert torch.allclose(logits, h @ w.T + j.out.bias, atol=1e-6)
    logits.sum().backward()
    assert j.out.weight.grad.abs().sum() > 0 and j.factor_embed[0].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="factors"):
        Joiner(8, 8, 8, 321, factors=f[:10])


@pytest.mark.parametrize("field, bad, match", [("output", "tied", "output"),
                                               ("dropout", 1.5, "dropout"),
                                               ("dropout", "0.1", "dropout")])
def test_output_and_dropout_fields_checked(field, bad, match):
    with pytest.raises(ValueError, match=match):
        Config(task="asr", vocab_size=321, **{field: bad}).validate()


def test_factored_output_needs_the_syllable_corpus():
    with pytest.raises(ValueError, match="syllable corpus"):
        Config(task="asr", vocab_size=12, output="factored").validate()
    with pytest.raises(ValueError, match="asr"):
        Config(task="speaker", dropout=0.0).validate()
