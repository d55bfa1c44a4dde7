"""8-bit optimizers under FSDP2 (DTensor parameters) and DDP, on 2 CPU ranks (gloo).

Each test launches its ranks with ``memlab.distributed.launch`` (spawn, a timeout, every process
ended before it returns). Model: Linear(64, 256) -> Linear(256, 64): each weight (16384
elements) is split in two shards of 8192 starting on a 256-block boundary ("block-aligned"), so
the sharded 8-bit states are the single-process states cut in two; with ``min_8bit_size=12000``
a weight is 8-bit on its global size although each shard (8192) is below it.
"""

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from memlab.distributed import launch
from memlab.optim import Adam8bit, AdamW8bit, SGD8bit

# pytest-xdist (-n 2 --dist loadgroup): one 2-rank launch at a time
pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.xdist_group("distributed")]

MIN8 = 12000
OPTS = {
    "adam8bit": lambda ps: Adam8bit(ps, lr=1e-2, min_8bit_size=MIN8),
    "adamw8bit": lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=MIN8),
    "sgd8bit": lambda ps: SGD8bit(ps, lr=1e-2, momentum=0.9, min_8bit_size=MIN8),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}
GLOBAL_BATCH = 16
# off the block grid: weight (7, 100) in shards of 400 (rows 0-3) and 300 elements, so the
# 256-block [256, 512) is split 144 / 112 between the ranks; weight (64, 7) (448 elements, two
# blocks) in shards of 224 and 224: block [0, 256) is split 224 / 32
OFF_GRID = (100, 7, 64)
OPTS_OFF_GRID = {
    "adam8bit": lambda ps: Adam8bit(ps, lr=1e-2, min_8bit_size=400),
    "adamw8bit": lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=400),
    "sgd8bit": lambda ps: SGD8bit(ps, lr=1e-2, momentum=0.9, min_8bit_size=400),
}


def _model(shape=(64, 256, 64)):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(shape[0], shape[1]), nn.ReLU(), nn.Linear(shape[1], shape[2]))


def _batch(step, n=GLOBAL_BATCH, d=64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, d, generator=g), torch.randn(n, 64, generator=g)   # (B, 64) each


def _loss(model, x, y):
    return (model(x) - y).square().mean()


def _shard(model):
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _full(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.named_parameters()}


def _single(name, steps=3, shape=(64, 256, 64), halves=1, opts=OPTS):
    """Single-process reference at the global batch: params after ``steps``, state bytes.

    ``halves=2``: the gradient of the global batch computed as the ranks compute it, the mean of
    its two halves' gradients (each half's loss / 2, accumulated in rank order): the same float32
    rounding, so a run that treats the ranks' states right matches it to the last bit. With
    ``halves=1`` (one loss over the whole batch) the gradients differ in the last bits, which
    Adam's 1/sqrt(v) amplifies and an 8-bit code at a quantization boundary turns into one code
    step (~1e-4 here on some CPUs, exactly 0 on others)."""
    model = _model(shape)
    opt = opts[name](model.parameters())
    t0 = time.perf_counter()
    for s in range(steps):
        x, y = _batch(s, d=shape[0])
        opt.zero_grad()
        n = GLOBAL_BATCH // halves
        for h in range(halves):
            (_loss(model, x[h * n:(h + 1) * n], y[h * n:(h + 1) * n]) / halves).backward()
        opt.step()
    nbytes = opt.state_nbytes() if hasattr(opt, "state_nbytes") else None
    if opts is not OPTS:
        return _full(model), _full_state(opt)
    return _full(model), nbytes, time.perf_counter() - t0


# ---------------------------------------------------------------------------------- rank bodies
def _fsdp_steps(rank, world, names, steps):
    """FSDP2: each rank trains on its half of the global batch."""
    from torch.distributed.tensor import DTensor
    out = {}
    for name in names:
        model = _shard(_model())
        opt = OPTS[name](model.parameters())
        t0 = time.perf_counter()
        for s in range(steps):
            x, y = _batch(s)
            part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
            opt.zero_grad()
            _loss(model, x[part], y[part]).backward()
            opt.step()
        w = model[0].weight
        st = opt.state[w]
        out[name] = dict(params=_full(model), seconds=time.perf_counter() - t0,
                         nbytes=opt.state_nbytes(), is_dtensor=isinstance(w, DTensor),
                         keys=sorted(st), local_numel=w.to_local().numel(),
                         codes=[v.numel() for k, v in st.items() if k.endswith("_codes")],
                         plain=all(type(v) is torch.Tensor for v in st.values()
                                   if isinstance(v, torch.Tensor)))
    return out


def _full_state(opt):
    """The optimizer's state_dict states with every DTensor gathered: {param id: {key: tensor}}."""
    return {k: {n: (v.full_tensor() if hasattr(v, "full_tensor") else v) for n, v in st.items()}
            for k, st in opt.state_dict()["state"].items()}


def _fsdp_off_grid(rank, world, names, steps):
    """FSDP2 on shards that start and end inside 256-blocks (see OFF_GRID)."""
    out = {}
    for name in names:
        model = _shard(_model(OFF_GRID))
        opt = OPTS_OFF_GRID[name](model.parameters())
        for s in range(steps):
            x, y = _batch(s, d=OFF_GRID[0])
            part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
            opt.zero_grad()
            _loss(model, x[part], y[part]).backward()
            opt.step()
        st = opt.state[model[0].weight]
        q = [k for k in st if k.endswith("_codes")][0][:-6]
        out[name] = dict(params=_full(model), state=_full_state(opt),
                         absmax_local=st[q + "_absmax"].numel(),
                         codes_local=st[q + "_codes"].numel())
    # a NaN / inf gradient element at flat index 300 of the first weight (rank 0's part of the
    # block [256, 512) that both ranks share): that block's absmax is NaN / inf on both ranks
    for bad in ("nan", "inf"):
        model = _shard(_model(OFF_GRID))
        opt = OPTS_OFF_GRID["adam8bit"](model.parameters())
        x, y = _batch(0, d=OFF_GRID[0])
        _loss(model, x, y).backward()
        if rank == 0:
            model[0].weight.grad.to_local().view(-1)[300] = float(bad)
        opt.step()
        out[bad + "_absmax"] = {k: opt.state[model[0].weight][k + "_absmax"].clone()
                                for k in ("exp_avg", "exp_avg_sq")}
    return out


def _dcp_run(rank, world, plan, off_grid=False):
    """Train on the same batch on every rank (the gradient is then the single-process one, bit
    for bit); ``plan``: list of (load checkpoint or None, first step, last step, {step: save})."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    out = []
    for load, first, last, saves in plan:
        shape = OFF_GRID if off_grid else (64, 256, 64)
        model = _shard(_model(shape))
        opt = (OPTS_OFF_GRID if off_grid else OPTS)["adam8bit"](model.parameters())
        if load is not None and load.endswith(".pt"):          # a single-process torch.save
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_model_state_dict)
            full = torch.load(load, weights_only=True)
            set_model_state_dict(model, full["model"],
                                 options=StateDictOptions(full_state_dict=True))
            opt.load_state_dict(full["optim"])     # full-size states: each rank takes its shard
        elif load is not None:
            msd, osd = get_state_dict(model, opt)               # templates of our layout
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=load)
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        for s in range(first, last + 1):
            x, y = _batch(s, d=shape[0])
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
            if s in saves:
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=saves[s])
        out.append(dict(params=_full(model), step=opt.state[model[0].weight]["step"]))
    return out


def _ddp_steps(rank, world, names, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    for name in names:
        model = DDP(_model())
        opt = OPTS[name](model.parameters())
        t0 = time.perf_counter()
        for s in range(steps):
            x, y = _batch(s)
            part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
            opt.zero_grad()
            _loss(model, x[part], y[part]).backward()
            opt.step()
        st = opt.state[model.module[0].weight]
        out[name] = dict(params=_full(model.module), seconds=time.perf_counter() - t0,
                         plain=all(type(v) is torch.Tensor for v in st.values()
                                   if isinstance(v, torch.Tensor)))
    return out


def _assert_close(a, b, tol, what):
    assert a.keys() == b.keys()
    for k in a:
        d = (a[k] - b[k]).abs().max().item()
        assert d <= tol, f"{what}: {k} differs by {d:.3g} > {tol}"


# ---------------------------------------------------------------------------------- tests
@pytest.mark.distributed
def test_fsdp2_8bit_states_are_sharded_and_match_a_single_process(one_thread):
    names = ["adam8bit", "adamw8bit", "sgd8bit"]
    ranks = launch(_fsdp_steps, 2, (names, 3), timeout=240)
    for name in names:
        ref, ref_bytes, ref_s = _single(name, halves=2)
        plain, _, _ = _single(name)
        for r in ranks:
            got = r[name]
            assert got["is_dtensor"] and got["plain"]          # states: plain local tensors
            assert got["local_numel"] == 8192 and all(n == 8192 for n in got["codes"]), got
            assert any(k.endswith("_codes") for k in got["keys"])  # 8-bit on the global size
            _assert_close(got["params"], ref, 1e-5, f"{name} FSDP2 vs single process")
            _assert_close(got["params"], plain, 1e-3, f"{name} FSDP2 vs one loss on the batch")
        per_rank = [r[name]["nbytes"] for r in ranks]
        assert sum(per_rank) == ref_bytes                      # shards tile the states
        assert all(0.45 <= b / ref_bytes <= 0.55 for b in per_rank), (per_rank, ref_bytes)
        print(f"{name}: state bytes per rank {per_rank} vs single process {ref_bytes}; 3 steps "
              f"{[round(r[name]['seconds'], 4) for r in ranks]} s per rank vs {ref_s:.4f} s")


@pytest.mark.distributed
def test_fsdp2_8bit_shards_off_the_block_grid_equal_a_single_process_bit_for_bit(one_thread):
    """A block split between two ranks gets the absmax of the whole block (all-reduced): the
    states and parameters are the single process's to the last bit, and state_dict() works
    (the shards used to quantize such a block as two, and state_dict() refused them)."""
    names = list(OPTS_OFF_GRID)
    ranks = launch(_fsdp_off_grid, 2, (names, 3), timeout=240)
    for name in names:
        params, state = _single(name, shape=OFF_GRID, halves=2, opts=OPTS_OFF_GRID)
        assert any(k.endswith("_codes") for st in state.values() for k in st)
        for r, got in enumerate(ranks):
            g = got[name]
            assert (g["codes_local"], g["absmax_local"]) == ((400, 2), (300, 2))[r], g
            assert g["params"].keys() == params.keys()
            for k in params:
                assert torch.equal(g["params"][k], params[k]), f"{name} rank {r}: {k} differs"
            assert g["state"].keys() == state.keys()
            for pid, st in state.items():
                assert g["state"][pid].keys() == st.keys(), (name, pid)
                for key, want in st.items():
                    have = g["state"][pid][key]
                    same = torch.equal(have.reshape(-1), want.reshape(-1)) \
                        if isinstance(want, torch.Tensor) else have == want   # codes: flat
                    assert same, f"{name} rank {r}: state {pid} {key} differs"
    for bad in ("nan", "inf"):                          # the same gradient in one process
        model = _model(OFF_GRID)
        opt = OPTS_OFF_GRID["adam8bit"](model.parameters())
        x, y = _batch(0, d=OFF_GRID[0])
        _loss(model, x, y).backward()
        model[0].weight.grad.view(-1)[300] = float(bad)
        opt.step()
        for k in ("exp_avg", "exp_avg_sq"):
            want = opt.state[model[0].weight][k + "_absmax"]              # (3,) blocks
            assert not want[1].isfinite() and want[[0, 2]].isfinite().all(), (bad, k, want)
            for r, blocks in ((0, [0, 1]), (1, [1, 2])):
                got = ranks[r][bad + "_absmax"][k]
                assert torch.equal(got.isnan(), want[blocks].isnan()), (bad, k, r, got, want)
                assert torch.equal(got.nan_to_num(0.0, 1.0, -1.0),
                                   want[blocks].nan_to_num(0.0, 1.0, -1.0)), (bad, k, r, got)


@pytest.mark.distributed
def test_fsdp2_dcp_checkpoint_resumes_bit_for_bit_on_2_and_1_ranks(tmp_path, one_thread):
    a, c = str(tmp_path / "step2_2ranks"), str(tmp_path / "step3_1rank")
    single = str(tmp_path / "step2_single_process.pt")
    model = _model()                              # a plain single-process run's checkpoint
    opt = OPTS["adam8bit"](model.parameters())
    for s in range(2):
        x, y = _batch(s)
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, single)
    (uninterrupted,), _ = launch(_dcp_run, 2, ([(None, 0, 3, {1: a})],), timeout=240)
    (on_one,) = launch(_dcp_run, 1, ([(a, 2, 3, {2: c})],), timeout=240)[0]     # 2 -> 1
    r0, r1 = launch(_dcp_run, 2, ([(a, 2, 3, {}), (c, 3, 3, {}), (single, 2, 3, {})],),
                    timeout=240)                                   # 2 -> 2, 1 -> 2, plain -> 2
    want = uninterrupted["params"]
    for got, what in ((on_one, "2 ranks -> 1"), (r0[0], "2 -> 2"), (r1[0], "2 -> 2 (rank 1)"),
                      (r0[1], "1 rank -> 2"), (r1[1], "1 -> 2 (rank 1)"),
                      (r0[2], "single-process torch.save -> 2"), (r1[2], "plain -> 2 (rank 1)")):
        assert got["step"] == uninterrupted["step"] == 4, what
        for k in want:
            assert torch.equal(got["params"][k], want[k]), f"{what}: {k} differs"
    ref, _, _ = _single("adam8bit", steps=4)       # the same batch on every rank: one process
    _assert_close(want, ref, 1e-6, "FSDP2 (same batch on each rank) vs single process")


@pytest.mark.distributed
def test_fsdp2_dcp_checkpoint_off_the_block_grid_resumes_bit_for_bit(tmp_path, one_thread):
    """OFF_GRID shards (blocks split between the ranks): DCP saves the global absmax, and a
    resume on 2 ranks or on 1 continues bit for bit (state_dict() used to refuse them)."""
    a, c = str(tmp_path / "step2_2ranks"), str(tmp_path / "step3_1rank")
    kw = (True,)                                  # off_grid
    (uninterrupted,), _ = launch(_dcp_run, 2, ([(None, 0, 3, {1: a})], *kw), timeout=240)
    (on_one,) = launch(_dcp_run, 1, ([(a, 2, 3, {2: c})], *kw), timeout=240)[0]
    r0, r1 = launch(_dcp_run, 2, ([(a, 2, 3, {}), (c, 3, 3, {})], *kw), timeout=240)
    want = uninterrupted["params"]
    for got, what in ((on_one, "2 ranks -> 1"), (r0[0], "2 -> 2"), (r1[0], "2 -> 2 (rank 1)"),
                      (r0[1], "1 rank -> 2"), (r1[1], "1 -> 2 (rank 1)")):
        assert got["step"] == 4, what
        for k in want:
            assert torch.equal(got["params"][k], want[k]), f"{what}: {k} differs"
    ref, _ = _single("adam8bit", steps=4, shape=OFF_GRID, opts=OPTS_OFF_GRID)
    for k in want:
        assert torch.equal(want[k], ref[k]), f"FSDP2 (same batch on each rank) vs one process: {k}"


@pytest.mark.distributed
def test_ddp_matches_a_single_process_for_adam_and_adam8bit(one_thread):
    names = ["adam", "adam8bit"]
    ranks = launch(_ddp_steps, 2, (names, 3), timeout=240)
    for name in names:
        ref, _, ref_s = _single(name, halves=2)
        plain, _, _ = _single(name)
        for r in ranks:
            assert r[name]["plain"]
            _assert_close(r[name]["params"], ref, 1e-5, f"{name} DDP vs single process")
            # one loss over the whole batch: rounding of the gradient only (see _single)
            _assert_close(r[name]["params"], plain, 1e-5 if name == "adam" else 1e-3,
                          f"{name} DDP vs one loss on the batch")
        print(f"DDP {name}: 3 steps {[round(r[name]['seconds'], 4) for r in ranks]} s per rank "
              f"vs {ref_s:.4f} s single process")


def _fail_or_hang(rank, world):
    if rank == 0:
        raise RuntimeError("rank 0 fails on purpose")
    time.sleep(600)                       # rank 1 would hang: launch must end it


@pytest.mark.distributed
def test_launch_ends_every_process_when_a_rank_fails():
    import multiprocessing as mp
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="(?s)rank 0 failed.*fails on purpose"):
        launch(_fail_or_hang, 2, timeout=120)
    assert time.perf_counter() - t0 < 100
    assert not mp.active_children()
    with pytest.raises(ValueError, match="nprocs"):
        launch(_fail_or_hang, 0)


def test_launch_reports_an_argument_that_cannot_be_pickled():
    """The pickling error itself, not an AssertionError from joining unstarted processes."""
    import pickle
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError), match="pickle"):
        launch(_ddp_steps, 2, (lambda: 0, 1), timeout=30)


def _adam4bit_on_shard1(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from memlab.optim4bit import Adam4bit
    mesh = init_device_mesh("cpu", (world,))
    w = nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(1)]))
    try:
        Adam4bit([w], lr=1e-2)
    except TypeError as e:
        return str(e)
    return "no error"


@pytest.mark.distributed
def test_adam4bit_refuses_dtensors_sharded_along_another_dim_with_a_clear_error():
    """Sharded 4-bit states follow FSDP2's Shard(0) (tests/test_distributed_optim4bit.py); a
    parameter sharded along dim 1 is refused at construction, not in its first step."""
    for msg in launch(_adam4bit_on_shard1, 2, (), timeout=120):
        assert "Adam4bit" in msg and "DTensor" in msg and "Shard(0)" in msg, msg
