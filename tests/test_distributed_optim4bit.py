"""4-bit optimizers under FSDP2 (DTensor parameters) on 2 CPU ranks (gloo): sharded states that
equal a single process's bit for bit, and DCP checkpoints that reshard.

Model: Linear(99, 5) -> Linear(5, 64). Under FSDP2 on 2 ranks the first weight (5 x 99, 495
elements) splits into rows 0-2 (297 elements) and 3-4 (198): rank 1's shard starts at an *odd*
element (two codes of one byte in one process sit on two ranks) inside the 128-block [256, 384);
the second weight (64 x 5, 320 elements) splits 160 / 160 inside the block [128, 256). Every rank
trains on the same batch, so its gradient is the single-process one bit for bit (FSDP2 averages
equal gradients), and the sharded run must equal the single-process run to the last bit.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from memlab.distributed import launch
from memlab.optim4bit import Adam4bit, AdamW4bit
from memlab.quant4 import unpack4
from test_distributed_optim import _full, _shard  # noqa: E402  (the same FSDP2 helpers)

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.xdist_group("distributed"), pytest.mark.distributed]

SHAPE = (99, 5, 64)
OPTS = {
    "adam4bit": lambda ps: Adam4bit(ps, lr=1e-2, min_4bit_size=100),
    "adam4bit-rank1": lambda ps: Adam4bit(ps, lr=1e-2, min_4bit_size=100, rank1=True),
    "adamw4bit": lambda ps: AdamW4bit(ps, lr=1e-2, min_4bit_size=100, weight_decay=0.1,
                                      block_size=64),
}


# large shards, stepped in parts (memlab._q4_chunks.CHUNK): weight 4097 x 65 splits into 2049
# rows (133,185 elements) and 2048 rows, rank 1 starting at an odd element inside a block
BIG = (65, 4097, 8)


def _model(shape=SHAPE):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(shape[0], shape[1]), nn.ReLU(), nn.Linear(shape[1], shape[2]))


def _batch(step, shape=SHAPE):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, shape[0], generator=g), torch.randn(16, shape[2], generator=g)


def _train_step(model, opt, step, bad=None):
    x, y = _batch(step, (model[0].in_features, 0, model[2].out_features))
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    if bad is not None:                       # (flat index, value) into the first weight's grad
        g = model[0].weight.grad
        flat = (g.to_local() if hasattr(g, "to_local") else g).view(-1)
        start = _start(model[0].weight)
        if start <= bad[0] < start + flat.numel():
            flat[bad[0] - start] = bad[1]
    opt.step()


def _start(w):
    from memlab.distributed import flat_shard
    return flat_shard(w)[0]


def _global_state(opt, params):
    """{param index: {key: tensor}} in the single-process form (codes one per element)."""
    out = {}
    for k, st in opt.state_dict()["state"].items():
        n = params[k].numel()
        row = {}
        for key, v in st.items():
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            if key.endswith("_q4"):
                v = v.reshape(-1) if v.numel() == n else unpack4(v, n)
            row[key] = v.clone() if isinstance(v, torch.Tensor) else v
        out[k] = row
    return out


def _run(name, steps, shard, bad=None, shape=SHAPE):
    model = _model(shape)
    if shard:
        model = _shard(model)
    opt = OPTS[name](model.parameters())
    for s in range(steps):
        _train_step(model, opt, s, bad if s == 1 else None)
    params = list(model.parameters())
    return dict(params=_full(model), state=_global_state(opt, params),
                nbytes=opt.state_nbytes(), keys=sorted(opt.state[params[0]]))


def _fsdp(rank, world, names, steps, bad=None, shape=SHAPE):
    return {name: _run(name, steps, True, bad, shape) for name in names}


def _assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            _assert_same(x, y, f"{what}[{k}]")
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, (what, k, x.shape, y.shape)
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{what}[{k}]: {m}")
        else:
            assert x == y, (what, k, x, y)


def test_fsdp2_4bit_states_equal_a_single_process_bit_for_bit(one_thread):
    """Parameters and every state (codes, block absmaxes, rank-1 maxima) after 3 steps; the
    sharded block-wise states take about half of the unsharded bytes on each rank (the rank-1
    maxima, a float per row and column, are whole on every rank). Before, Adam4bit refused
    DTensor parameters."""
    names = list(OPTS)
    ranks = launch(_fsdp, 2, (names, 3), timeout=240)
    for name in names:
        single = _run(name, 3, False)
        for r, out in enumerate(ranks):
            got = out[name]
            _assert_same(got["params"], single["params"], f"{name} rank {r} params")
            _assert_same(got["state"], single["state"], f"{name} rank {r} state")
            assert got["keys"] == single["keys"]
        per_rank = [out[name]["nbytes"] for out in ranks]
        print(f"{name}: state bytes per rank {per_rank}, one process {single['nbytes']}")
        if "rank1" not in name:        # rank-1 maxima (sum of the dims) are on every rank
            assert all(0.40 * single["nbytes"] < b < 0.62 * single["nbytes"] for b in per_rank)
        assert ("exp_avg_sq_rank1" in single["keys"]) == ("rank1" in name)


def test_fsdp2_4bit_large_shards_step_in_parts_bit_for_bit(one_thread):
    """Shards of 133,185 and 133,120 elements, each stepped in three parts of whole rows (the
    temporaries of one part, ~58 K elements); block-wise and rank-1: one process's bits."""
    from memlab import _q4_shards
    assert len(_q4_shards._parts(133185, 133120, 128, 65)) == 3
    names = ["adam4bit", "adam4bit-rank1"]
    ranks = launch(_fsdp, 2, (names, 2, None, BIG), timeout=240)
    for name in names:
        single = _run(name, 2, False, shape=BIG)
        for r, out in enumerate(ranks):
            _assert_same(out[name]["params"], single["params"], f"{name} rank {r} params")
            _assert_same(out[name]["state"], single["state"], f"{name} rank {r} state")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fsdp2_4bit_bad_gradient_in_a_shared_block_as_one_process(bad, one_thread):
    """A NaN / inf gradient element at flat index 300 of the first weight (rank 1's part of the
    128-block [256, 384) that both ranks share; with rank-1 scales, row 3's and column 3's): the
    states on both ranks are the single-process states, NaN where one process has NaN."""
    names = ["adam4bit", "adam4bit-rank1"]
    ranks = launch(_fsdp, 2, (names, 3, (300, bad)), timeout=240)
    for name in names:
        single = _run(name, 3, False, (300, bad))
        assert not torch.isfinite(single["state"][0]["exp_avg_absmax"]).all()
        for r, out in enumerate(ranks):
            _assert_same(out[name]["state"], single["state"], f"{name} {bad} rank {r}")


def _dcp(rank, world, plan, name):
    """``plan``: [(load checkpoint or None, first step, last step, {step: save dir})]."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_model_state_dict, set_state_dict)
    out = []
    for load, first, last, saves in plan:
        model = _shard(_model())
        opt = OPTS[name](model.parameters())
        if load is not None and load.endswith(".pt"):            # a single process's torch.save
            full = torch.load(load, weights_only=True)
            set_model_state_dict(model, full["model"],
                                 options=StateDictOptions(full_state_dict=True))
            opt.load_state_dict(full["optim"])
        elif load is not None:
            msd, osd = get_state_dict(model, opt)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=load)
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        for s in range(first, last + 1):
            _train_step(model, opt, s)
            if s in saves:
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=saves[s])
        out.append(dict(params=_full(model), state=_global_state(opt, list(model.parameters())),
                        step=opt.state[model[0].weight]["step"]))
    return out


@pytest.mark.parametrize("name", ["adam4bit", "adam4bit-rank1"])
def test_fsdp2_4bit_dcp_checkpoint_reshards_and_resumes_bit_for_bit(name, tmp_path, one_thread):
    """Save at step 2 (steps 1-2 done) on 2 ranks; resume on 2 and on 1 rank, and 1 -> 2, and
    from a single process's torch.save: step 3 equals the uninterrupted run's to the last bit."""
    a, c, single = str(tmp_path / "a"), str(tmp_path / "c"), str(tmp_path / "single.pt")
    model = _model()
    opt = OPTS[name](model.parameters())
    for s in range(2):
        _train_step(model, opt, s)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, single)
    (whole,), _ = launch(_dcp, 2, ([(None, 0, 2, {1: a})], name), timeout=240)
    (on_one,) = launch(_dcp, 1, ([(a, 2, 2, {2: c})], name), timeout=240)[0]   # 2 -> 1
    r0, r1 = launch(_dcp, 2, ([(a, 2, 2, {}), (c, 3, 3, {}), (single, 2, 2, {})], name),
                    timeout=240)
    for what, got in (("2 -> 1", on_one), ("2 -> 2", r0[0]), ("2 -> 2 rank 1", r1[0]),
                      ("single -> 2", r0[2])):
        _assert_same(got["params"], whole["params"], f"{name} {what} params")
        _assert_same(got["state"], whole["state"], f"{name} {what} state")
        assert got["step"] == 3
    (longer,), _ = launch(_dcp, 2, ([(None, 0, 3, {})], name), timeout=240)
    _assert_same(r0[1]["params"], longer["params"], f"{name} 1 -> 2 params")
    _assert_same(r0[1]["state"], longer["state"], f"{name} 1 -> 2 state")


def _step_temporaries(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from memlab.memory import MemoryMeter
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    p = nn.Parameter(distribute_tensor(torch.randn(2048, 1024), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.randn(2048, 1024), mesh, [Shard(0)])
    opt = Adam4bit([p], lr=1e-3)
    opt.step()
    with MemoryMeter("cpu", inputs=[p, p.grad], optimizer=opt) as meter:
        opt.step()
    return dict(step=meter.peak - meter.baseline, state=opt.state_nbytes(),
                local=p.to_local().numel())


def test_fsdp2_4bit_step_temporaries_do_not_grow_with_the_shard(one_thread):
    """A 2048 x 1024 weight on 2 ranks (shards of 1 M elements, rank-1 second moment): the peak
    of a step over its baseline is one part's temporaries, as one process's chunked step, not
    ~27 B per element of the shard (27 MB)."""
    for r in launch(_step_temporaries, 2, (), timeout=240):
        print(r)
        assert r["local"] == 1024 * 1024
        assert 0 < r["step"] < 2.5e6, r
        assert r["state"] < 1.07 * r["local"]
