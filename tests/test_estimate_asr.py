"""estimate() runs the ASR training step on fake tensors: lengths and targets are host tensors
(memlab.memory.host_tensor), so the transducer losses read them and the sample-wise loss plans
its groups as it does for real. Pinned against the meter on the same step run for real."""

import pytest
import torch

from memlab import tasks
from memlab.lab import Config, build_model, build_optimizer, estimate_config, training_step
from memlab.memory import MemoryMeter, estimate, host_tensor, host_values, real_tensors


def _real_peak(cfg, B, T, steps=2):
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    batch = tasks.get(cfg.task).random_batch(cfg, B, T)
    step = training_step(cfg)
    with MemoryMeter("cpu", model=model, optimizer=opt, inputs=list(batch), scan=False) as m:
        for _ in range(steps):
            step(model, opt, batch)
    return m.peak


@pytest.mark.parametrize("loss", ["batched", "samplewise", "pruned", "samplewise-pruned"])
def test_asr_estimate_within_5_percent_of_a_real_cpu_step(loss):
    cfg = Config(task="asr", loss=loss, batch_size=4, vocab_size=128, width=32, depth=1)
    est = estimate_config(cfg, frames=200, steps=2)
    real = _real_peak(cfg, 4, 200)
    assert est.peak == pytest.approx(real, rel=0.05), (est.summary(), real)


def test_samplewise_estimate_sees_the_saving_of_the_whole_step():
    # a large vocabulary: the 4-D joiner tensor dominates the batched step
    # (B 8 x 8 s, 32 tokens, V 1024: logits 216 MB), as in the paper's regime
    kw = dict(task="asr", batch_size=8, vocab_size=1024, width=32, depth=1)
    batched = estimate_config(Config(loss="batched", **kw), frames=800, target_len=32)
    samplewise = estimate_config(Config(loss="samplewise", **kw), frames=800, target_len=32)
    assert samplewise.peak < 0.5 * batched.peak, (batched.summary(), samplewise.summary())


def test_host_tensor_keeps_values_inside_estimate_only():
    seen = {}

    def setup():
        lengths = host_tensor([3, 5, 7])
        return (lengths, torch.ones(3))

    def step(lengths, x):
        derived = torch.div(lengths - 1, 2, rounding_mode="floor") + 1     # host op on host
        seen["values"] = derived.tolist()
        seen["max"] = int(lengths.max())
        seen["mixed"] = host_values(x * lengths)                          # fake x: unknown
        seen["known"] = host_values(lengths)[0].tolist()

    estimate(step, setup)
    assert seen == {"values": [2, 3, 4], "max": 7, "mixed": None, "known": [3, 5, 7]}
    # outside an estimate: a plain tensor, and the limit on kept values is torch's again once
    # no estimate runs (a dashboard of an earlier test may still estimate in a daemon thread)
    import time
    from memlab._estimate import running
    t = host_tensor([1, 2])
    assert type(t) is torch.Tensor and t.tolist() == [1, 2]
    from torch._subclasses import fake_tensor
    deadline = time.monotonic() + 120
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 0 and fake_tensor.CONSTANT_NUMEL_LIMIT == 1


def test_overlapping_estimates_in_two_threads_restore_torchs_limit():
    """A starts, B starts, A ends, B ends: torch's CONSTANT_NUMEL_LIMIT is raised while either
    runs and is torch's again after both (each call used to restore what it had seen at its
    start, so B put back A's raised value for good: a dashboard thread estimating beside the
    main one left it so, and a later test found it at 4,194,304)."""
    import threading
    from torch._subclasses import fake_tensor
    before = fake_tensor.CONSTANT_NUMEL_LIMIT
    b_in, a_out, seen, errors = threading.Event(), threading.Event(), {}, []

    def run(name, step):
        try:
            estimate(lambda x: step(x), lambda: (torch.ones(4),))
        except Exception as e:              # pragma: no cover - reported below
            errors.append(e)
        if name == "a":
            a_out.set()

    def step_a(x):
        assert b_in.wait(30)
        seen["a"] = fake_tensor.CONSTANT_NUMEL_LIMIT
        (x * 2).sum()

    def step_b(x):
        b_in.set()
        assert a_out.wait(30)
        seen["b"] = fake_tensor.CONSTANT_NUMEL_LIMIT      # A has ended, B still runs
        (x * 3).sum()
    ta = threading.Thread(target=run, args=("a", step_a))
    tb = threading.Thread(target=run, args=("b", step_b))
    ta.start()
    tb.start()
    ta.join(60)
    tb.join(60)
    assert not errors, errors
    assert seen["a"] > before and seen["b"] > before            # raised while any runs
    assert fake_tensor.CONSTANT_NUMEL_LIMIT == before


def test_host_tensor_refuses_fake_data_and_real_tensors_is_a_no_op_outside():
    def setup():
        with pytest.raises(ValueError, match="fake tensor"):
            host_tensor(torch.zeros(3))                 # made inside the estimate: fake
        with real_tensors():
            return (host_tensor(torch.zeros(3)),)      # real again: fine

    estimate(lambda t: t.sum(), setup)
    with real_tensors():
        assert type(torch.zeros(1)) is torch.Tensor


def test_a_step_reading_unknown_values_names_host_tensor():
    with pytest.raises(NotImplementedError, match="host_tensor"):
        estimate(lambda x: int(x.sum()), lambda: (torch.ones(3),))


def test_invalid_targets_still_rejected_on_a_real_step():
    # the value checks moved behind host_values: a real batch with a blank target still fails
    cfg = Config(task="asr", batch_size=2, vocab_size=16, width=32, depth=1)
    model = build_model(cfg)
    feats, fl, targets, tl = tasks.get("asr").random_batch(cfg, 2, 100)
    targets[0, 0] = 0                                   # blank
    with pytest.raises(ValueError, match="blank"):
        model(feats, fl, targets, tl)


def test_paper_headline_on_the_meter():
    # Braun et al.'s batch x 40 s, V 1024: sample-wise per utterance within 6 GB; 128 of the
    # 1024 utterances here (the groups are the same: one utterance each); the whole batch: slow
    from memlab.bench.transducer import metered_bytes, sizes
    T, U = sizes(40.0)
    sw = metered_bytes("samplewise", 128, T, U, 1024)
    bat = metered_bytes("batched", 128, T, U, 1024)
    assert sw["peak_bytes"] < 6 * 2**30 < bat["peak_bytes"]


@pytest.mark.slow
def test_paper_headline_full_batch_on_the_meter():
    from memlab.bench.transducer import run_paper
    rows = {r["method"]: r for r in run_paper(device="cpu")}
    assert rows["samplewise"]["batch_size"] == 1024 and rows["samplewise"]["T"] == 1000
    assert rows["samplewise"]["peak_bytes"] < 6 * 2**30 < rows["batched"]["peak_bytes"]
    # the analytic model agrees with the meter within 25%
    for r in rows.values():
        assert 0.75 <= r["estimated_bytes"] / r["peak_bytes"] <= 1.25, r


@pytest.mark.parametrize("loss", ["batched", "samplewise"])
def test_default_estimate_pads_like_the_real_batches(loss):
    """With no frames given, an ASR estimate measures a batch padded as the config's corpus pads
    one (its longest utterance and transcript; Task.padded_batch): it lies within the live
    per-step peaks of a real run. Sized at exactly ``seconds`` it fell below all of them
    (batched 10.3 MiB against 11.1-13.6 live)."""
    from memlab.lab import Experiment
    cfg = Config(task="asr", loss=loss, vocab_size=200, seconds=2.0, batch_size=4, num_utts=24,
                 eval_utts=4, width=32, depth=1, steps=8, measure_every=1, eval_every=8,
                 max_chunk_bytes=1 << 20).validate()
    live = [r.peak for r in Experiment(cfg).run() if r.metered]
    est = estimate_config(cfg, steps=2).peak
    assert len(live) == 8 and min(live) <= est <= 1.05 * max(live), (est, sorted(live))
    frames, tokens = tasks.get("asr").padded_batch(cfg, 4)
    assert frames > 200 and tokens > 200 // 25                   # longer than `seconds`


def test_padded_batch_none_for_a_what_if_vocabulary():
    cfg = Config(task="asr", vocab_size=1024).validate()
    assert tasks.get("asr").padded_batch(cfg, 8) is None
    assert tasks.get("speaker").padded_batch(Config().validate(), 8) is None
