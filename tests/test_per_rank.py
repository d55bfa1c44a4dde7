"""Memory per rank (memlab._per_rank via estimate_config; memlab plan --nproc): the sharding
arithmetic of FSDP2, DDP's full copies, the refusals, and the meter on DTensors. One process:
the estimates run in a fake process group (no ranks started); the check against real 2-rank runs
is tests/test_distributed_estimate.py."""

import math

import pytest
import torch

from memlab import planner
from memlab.cli import main
from memlab.lab import Config, build_model, estimate_config

dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

# every parameter's first dim is even (channels 16/32/64, 6 speakers, embedding 64): FSDP2's
# Shard(0) over 2 ranks splits each tensor exactly in half, no padding
SMALL = dict(task="speaker", width=16, batch_size=8, seconds=0.5, num_speakers=6)


def _tensor_bytes(model):
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers


def _shard_bytes(model, n):
    """Rank 0's FSDP2 shard of every parameter: ceil(dim0 / n) rows."""
    return sum(math.ceil(p.shape[0] / n) * (p.numel() // p.shape[0]) * p.element_size()
               for p in model.parameters())


def test_model_is_block_aligned():
    model = build_model(Config(**SMALL))
    assert all(p.shape[0] % 2 == 0 for p in model.parameters())


@pytest.mark.parametrize("optimizer", ["adam", "adam8bit"])
def test_fsdp2_shards_parameters_and_optimizer(optimizer, one_thread):
    cfg = Config(**SMALL, optimizer=optimizer, parallel="fsdp2", nproc=2)
    one = estimate_config(cfg.replace(parallel="none", nproc=1), batch_size=4, steps=2)
    rank = estimate_config(cfg, steps=2)
    params, buffers = _tensor_bytes(build_model(cfg))
    b1, br = one.breakdown(), rank.breakdown()
    assert b1["parameters"] == params + buffers
    assert br["parameters"] == params // 2 + buffers          # shards; buffers are not sharded
    if optimizer == "adam8bit":       # block-wise states of each half: exactly half
        assert br["optimizer"] == b1["optimizer"] // 2
    else:                             # exp_avg, exp_avg_sq halve; each 'step' scalar does not
        n = len(list(build_model(cfg).parameters()))
        assert br["optimizer"] - b1["optimizer"] / 2 == pytest.approx(n * 4 / 2, abs=n * 8)
    assert br["other"] == b1["other"]                          # the local batch, B / N
    assert rank.nproc == 2 and rank.local_batch == 4 and "per rank" in rank.summary()


def test_fsdp2_three_ranks_pad_the_shards(one_thread):
    cfg = Config(**dict(SMALL, batch_size=6), parallel="fsdp2", nproc=3)
    model = build_model(cfg)
    _, buffers = _tensor_bytes(model)
    rank = estimate_config(cfg, steps=1)
    assert rank.breakdown()["parameters"] == _shard_bytes(model, 3) + buffers


def test_ddp_keeps_full_copies_at_the_local_batch(one_thread):
    cfg = Config(**SMALL, optimizer="adam8bit", parallel="ddp", nproc=2)
    one = estimate_config(cfg.replace(parallel="none", nproc=1), batch_size=4, steps=2)
    rank = estimate_config(cfg, steps=2)
    params, buffers = _tensor_bytes(build_model(cfg))
    b1, br = one.breakdown(), rank.breakdown()
    for c in ("parameters", "optimizer", "other"):
        assert br[c] == b1[c], c
    # the gradient buckets live through the whole step: the full gradients at the peak
    assert br["gradients"] >= params
    assert rank.category_peaks()["gradients"] >= one.category_peaks()["gradients"]
    # the global batch: activations of 8, not 4
    whole = estimate_config(cfg.replace(parallel="none", nproc=1), steps=2).breakdown()
    assert br["activations"] < 0.75 * whole["activations"]


def test_sync_bn_estimates(one_thread):
    """SyncBatchNorm reads no values (it used to: float(n) > 1), so it runs on fake tensors."""
    cfg = Config(**SMALL, parallel="fsdp2", nproc=2, sync_bn=True)
    assert estimate_config(cfg, steps=1).peak > 0


def test_sync_bn_running_stats_unchanged():
    """The tensor-only running-statistics update equals BatchNorm's (one rank's statistics)."""
    from memlab._per_rank import fake_group
    from memlab.parallel import SyncBatchNorm
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5)
    ref = torch.nn.BatchNorm1d(4)
    with fake_group(2, "cpu"):     # in a group of 2 whose all-reduce does nothing
        sync = SyncBatchNorm(4)
        sync.train()
        y = sync(x)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)
    torch.testing.assert_close(sync.running_mean, ref.running_mean)


def test_batch_not_divisible_is_refused():
    with pytest.raises(ValueError, match=r"batch_size must be divisible by nproc=2.*"
                                         r"batch_size=5"):
        estimate_config(Config(**SMALL, parallel="ddp", nproc=2), batch_size=5)
    with pytest.raises(ValueError, match=r"divisible by nproc=4.*batch_size=6"):
        estimate_config(Config(**dict(SMALL, batch_size=6), parallel="fsdp2", nproc=4))


def test_refused_inside_a_process_group():
    import socket
    from memlab._per_rank import fake_group
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(ValueError, match="outside a process group"):
            with fake_group(2, "cpu"):
                pass
    finally:
        dist.destroy_process_group()


def test_meter_counts_a_dtensor_as_its_local_shard():
    """A DTensor's own storage has the global size; a rank holds its local shard (bug: FSDP2
    parameters were metered at their full size on every rank)."""
    from torch.distributed.tensor import DTensor, Shard

    from memlab._per_rank import fake_group
    from memlab.memory import MemoryMeter
    with fake_group(2, "cpu") as mesh:
        dt = DTensor.from_local(torch.zeros(4, 8), mesh, [Shard(0)], run_check=False)
        assert dt.shape == (8, 8)
        with MemoryMeter("cpu", inputs=[dt], scan=False) as m:
            out = dt * 2
        assert m.baseline == 4 * 8 * 4                    # the local shard, not 8 x 8
        assert m.peak == 2 * 4 * 8 * 4
        del out


def test_parallel_slice_is_a_copy():
    """Each rank's slice of the global batch is its own (a view kept the whole global batch
    alive on every CPU rank)."""
    from memlab.parallel import ParallelExperiment
    exp = ParallelExperiment.__new__(ParallelExperiment)
    exp.config, exp.rank, exp.world = Config(**SMALL), 1, 2
    feats, labels = torch.randn(8, 50, 80), torch.arange(8)
    f, lab = exp._to_device((feats, labels))
    assert f.untyped_storage().nbytes() == 4 * 50 * 80 * 4
    assert lab.tolist() == [1, 3, 5, 7]


# ----------------------------------------------------------------------------- planner / CLI
def test_plan_per_rank(one_thread):
    cfg = Config(**SMALL, parallel="fsdp2", nproc=2)
    result = planner.plan(cfg, "1GiB", kinds=("optimizer",),
                          choices={"optimizer": ("adam", "adam8bit")}, extrapolate=False)
    assert result.per_rank == "fsdp2 on 2 ranks, 4 utterances each"
    assert result.base["peak"] == estimate_config(cfg, steps=2).peak
    text = planner.format_plan(result)
    assert "per rank" in text.splitlines()[0] and "peak and breakdown: per rank" in text


def test_cli_plan_nproc(capsys, one_thread):
    rc = main(["plan", "--fit", "1GiB", "--nproc", "2", "--parallel", "fsdp2", "--width", "16",
               "--batch-size", "4", "--vary", "optimizer", "--optimizer", "adam8bit",
               "--no-extrapolate"])
    out = capsys.readouterr().out
    assert rc == 0 and "per rank (fsdp2 on 2 ranks, 2 utterances each)" in out, out


@pytest.mark.parametrize("argv, needles", [
    (["--nproc", "2", "--batch-size", "3"], ("batch_size must be divisible by nproc=2",
                                              "batch_size=3")),
    (["--nproc", "0"], ("nproc must be an int >= 1",)),
    (["--nproc", "2", "--batch-size", "0"], ("batch_size must be >= 1",)),
])
def test_cli_plan_nproc_mistakes_are_one_line(argv, needles, capsys):
    from test_cli_errors import one_line_error
    assert main(["plan", "--fit", "1GB", *argv]) == 2
    one_line_error(capsys.readouterr().err, *needles)
