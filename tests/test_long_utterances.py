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
    batched one (measured: 280 MiB vs 66 MiB, TER 0.997 both after 60 steps)."""
    runs = _full_size_runs()
    (ter_b, peak_b), (ter_s, peak_s) = runs["batched"], runs["samplewise"]
    assert 4 * peak_s <= peak_b, runs
    assert abs(ter_b - ter_s) < 0.05, runs


@pytest.mark.slow
@FULL_SIZE
@pytest.mark.xfail(strict=True, reason="issue 14, open: in a ~2-min run (60 steps) the "
                   "320-syllable Transducer is still on the blank plateau (loss ~ uniform over "
                   "the tokens, TER ~1.0, an empty transcript's); trained longer on 800 "
                   "utterances it memorises them (900 steps: train loss 87 -> 30, test loss "
                   "90 -> 133, TER 0.98), and on fresh utterances it leaves the plateau only "
                   "after ~500 steps")
def test_full_size_runs_learn():
    runs = _full_size_runs()
    assert all(ter < 0.7 for ter, _ in runs.values()), runs
