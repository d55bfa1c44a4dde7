"""The standard alternatives as techniques of their own (memlab.steps): mixed precision, gradient
accumulation, optimizer step in backward, activation offload. Each is a kind with a no-op default,
combines with the rest through the hooks of lab.train_step, and shows in Config validation,
estimate_config and `memlab compare`. Memory figures are pinned with MemoryMeter on Linear stacks
whose every byte is known."""

import math

import pytest
import torch
from torch import nn

from memlab import steps, techniques
from memlab.cli import main
from memlab.lab import Config, Experiment, estimate_config, train_step
from memlab.memory import MemoryMeter
from memlab.techniques import builtin

B, D, L = 64, 128, 4          # batch, width, layers of the Linear stacks
TINY = dict(steps=2, eval_every=2, measure_every=1, num_speakers=4, utts_per_speaker=4,
            eval_speakers=2, batch_size=4, seconds=0.5)
CUDA = torch.cuda.is_available()


def stack(dtype=torch.float32, bias=False, act=False, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(L):
        layers += [nn.Linear(D, D, bias=bias)] + ([nn.Tanh()] if act else [])
    return nn.Sequential(*layers).to(dtype)


def sum_loss(model, batch):
    return model(batch[0]).sum()


def meter_step(model, opt, batch, chosen, loss_fn=sum_loss, state=None):
    with MemoryMeter("cpu", model=model, optimizer=opt, inputs=batch) as meter:
        train_step(model, opt, batch, loss_fn, chosen, state)
    return meter


# ----------------------------------------------------------------------------- registration
def test_kinds_have_noop_defaults_and_old_configs_keep_working():
    kinds = techniques.kinds()
    assert kinds[:3] == ("memory", "optimizer", "loss")
    for kind, default in (("precision", "fp32"), ("accumulation", "none"),
                          ("optimizer-step", "after-backward"), ("offload", "none")):
        assert kind in kinds and techniques.default(kind) == default
        assert techniques.names(kind, "speaker")[0] == default == Config().choice(kind)
        assert techniques.get(kind, default).hooks == ()            # the no-op
    assert "bf16" in techniques.names("precision", "asr")
    assert {"accumulate2", "accumulate4"} <= set(techniques.names("accumulation"))
    assert ("fp16" in techniques.names("precision")) == CUDA
    assert ("host" in techniques.names("offload")) == CUDA


def test_cuda_only_techniques_register_only_with_cuda():
    try:
        assert builtin.register_cuda_only(available=True)
        assert "fp16" in techniques.names("precision") and "host" in techniques.names("offload")
        fp16 = techniques.get("precision", "fp16")
        assert set(fp16.hooks) == {"backward", "optimizer_step"} and fp16.options["needs_gradients"]
        assert techniques.get("offload", "host").step_context is steps.offload_context
        for kind, name in (("precision", "fp16"), ("offload", "host")):
            with pytest.raises(ValueError, match=f"{kind}='{name}' needs device='cuda', got "
                                                 f"device='cpu'"):
                Config.for_task("speaker", techniques={kind: name}).validate()
        assert not builtin.register_cuda_only(available=False)
        assert "fp16" not in techniques.names("precision")
        assert "host" not in techniques.names("offload")
        with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\)"):
            Config.for_task("speaker", techniques={"precision": "fp16"}).validate()
    finally:
        builtin.register_cuda_only()                # as this machine has it


def test_accumulation_takes_any_k_by_name():
    for name, k in (("accumulate3", 3), ("5", 5), ("accumulate4", 4)):
        t = Config.for_task("speaker", batch_size=8, techniques={"accumulation": name}
                            ).validate().chosen()["accumulation"]
        assert t.options["micro_batches"] == k and t.hooks == ("split_batch",)
    assert "accumulate3" not in techniques.names("accumulation")    # resolved, not listed
    for bad in ("accumulate0", "0", "x", "accumulate-2"):
        with pytest.raises(ValueError, match="accumulation must be one of"):
            Config.for_task("speaker", techniques={"accumulation": bad}).validate()
    with pytest.raises(ValueError, match="batch_size must be >= 8, got 4"):
        Config.for_task("speaker", batch_size=4, techniques={"accumulation": "8"}).validate()
    label = Config.for_task("speaker", techniques={"accumulation": "accumulate2"}).label
    assert label.endswith(" accumulate2")


def test_two_techniques_replacing_one_hook_are_refused():
    techniques.register_kind("clip", default="none", noop="no clipping")
    techniques.register_kind("clip2", default="none", noop="no clipping")

    def clip(step):
        torch.nn.utils.clip_grad_norm_(step.model.parameters(), 1.0)
        step.optimizer.step()
    try:
        techniques.register("clip", "norm1", description="clip by global norm 1",
                            optimizer_step=clip, needs_gradients=True)
        techniques.register("clip2", "norm1", description="the same, twice", optimizer_step=clip)
        cfg = Config.for_task("speaker", **TINY, techniques={"clip": "norm1"}).validate()
        assert list(Experiment(cfg).run())[-1].final            # a step hook of a new kind
        with pytest.raises(ValueError, match=r"clip='norm1' and clip2='norm1' cannot be "
                                             r"combined: both replace the training step's "
                                             r"optimizer_step"):
            Config.for_task("speaker", techniques={"clip": "norm1", "clip2": "norm1"}).validate()
        with pytest.raises(ValueError, match=r"optimizer-step='in-backward' cannot be combined "
                                             r"with clip='norm1'"):
            Config.for_task("speaker", techniques={"clip": "norm1",
                                                   "optimizer-step": "in-backward"}).validate()
    finally:
        techniques.unregister_kind("clip")
        techniques.unregister_kind("clip2")


# ----------------------------------------------------------------------------- precision
def test_bf16_halves_the_activations_of_a_linear_stack():
    """fp32: the L layer outputs (B x D x 4 bytes) and the loss. bf16: the same outputs in
    B x D x 2 bytes, plus what autocast adds: a bf16 copy of the input and of each weight
    (2 bytes/parameter, counted as activations: allocated in forward)."""
    x = torch.randn(B, D)
    model = stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    act32 = meter_step(model, opt, (x,), []).category_peaks()["activations"]
    assert act32 == L * B * D * 4 + 4
    model = stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    chosen = [techniques.get("precision", "bf16")]
    meter = meter_step(model, opt, (x,), chosen)
    act16 = meter.category_peaks()["activations"]
    n_params = sum(p.numel() for p in model.parameters())
    autocast_copies = B * D * 2 + 2 * n_params
    assert act16 == L * B * D * 2 + 2 + autocast_copies
    assert act16 - autocast_copies - 2 == (act32 - 4) // 2           # exactly half
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_fp16_step_scales_unscales_steps_and_updates():
    """The fp16 hooks (registered where CUDA exists) on CPU autocast: the scaler lives in the
    run's state, the step uses unscaled gradients, an inf gradient skips the step and halves
    the scale; on fake tensors (estimate) the step runs without reading data."""
    from memlab.memory import estimate
    try:
        builtin.register_cuda_only(available=True)
        fp16 = techniques.get("precision", "fp16")
    finally:
        builtin.register_cuda_only()
    x = torch.randn(8, D)

    def mse(m, b):
        return m(b[0]).float().pow(2).mean()
    ref, model = stack(act=True), stack(act=True)
    ref_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model))
    state = {}
    train_step(ref, ref_opt, (x,), mse)
    train_step(model, opt, (x,), mse, [fp16], state)
    assert state["grad_scaler"].get_scale() == 65536.0
    for p, q in zip(ref.parameters(), model.parameters()):
        assert p.dtype == q.dtype == torch.float32
        assert (p - q).abs().max().item() < 1e-3                     # fp16 rounding only
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(model, opt, (x,), lambda m, b: mse(m, b) * float("inf"), [fp16], state)
    assert not math.isfinite(float(loss)) and state["grad_scaler"].get_scale() == 32768.0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))   # skipped

    def setup():
        m = nn.Sequential(*[nn.Linear(D, D) for _ in range(L)])    # no .to(): fake tensors
        return m, torch.optim.SGD(m.parameters(), lr=0.1), torch.randn(8, D)
    fake_state = {}
    est = estimate(lambda m, o, xb: train_step(m, o, (xb,), mse, [fp16], fake_state), setup,
                   steps=2)
    assert est.peak > 0 and "grad_scaler" in fake_state


@pytest.mark.parametrize("task", ["speaker", "asr"])
def test_bf16_trains_like_fp32(task):
    """Fast mode: the same losses within bf16 noise and a metric in range; the real runs (the
    README's figures) are made with `memlab compare --precision fp32,bf16`."""
    kw = dict(steps=4, eval_every=4, measure_every=4)
    runs = {p: list(Experiment(Config.for_task(task, techniques={"precision": p}, **kw)).run())
            for p in ("fp32", "bf16")}
    l32, l16 = [r.loss for r in runs["fp32"]], [r.loss for r in runs["bf16"]]
    assert all(math.isfinite(v) for v in l16)
    assert abs(l16[0] - l32[0]) <= 0.02 * abs(l32[0]) + 0.05          # the same first step
    assert abs(l16[-1] - l32[-1]) <= 0.1 * abs(l32[-1]) + 0.1
    metric = "eer" if task == "speaker" else "ter"
    assert 0.0 <= runs["bf16"][-1].metrics[metric] <= 1.5
    peak = {p: runs[p][-1].peak for p in runs}
    assert peak["bf16"] < peak["fp32"]                                   # fewer bytes


# ----------------------------------------------------------------------------- accumulation
def test_accumulate4_keeps_a_quarter_of_the_activations():
    x = torch.randn(B, D)
    peaks = {}
    for name in ("none", "accumulate4"):
        model = stack()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        meter = meter_step(model, opt, (x,), [techniques.get("accumulation", name)])
        peaks[name] = meter.category_peaks()["activations"]
    assert peaks["none"] == L * B * D * 4 + 4
    assert peaks["accumulate4"] == pytest.approx(peaks["none"] / 4, rel=0.01)


@pytest.mark.parametrize("batch, k", [(12, 4), (10, 4), (7, 3)])
def test_summed_gradient_equals_the_full_batch_gradient(batch, k):
    """fp64, no BatchNorm: the micro-batch losses scaled by their share sum to the mean loss,
    so the accumulated gradient is the full batch's (uneven splits too)."""
    x, y = torch.randn(batch, D, dtype=torch.float64), torch.randn(batch, D, dtype=torch.float64)

    def mse(model, b):
        return ((model(b[0]) - b[1]) ** 2).mean()
    grads, losses = {}, {}
    for name in ("none", f"accumulate{k}"):
        model = stack(torch.float64, bias=True, act=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)        # keeps the gradients
        losses[name] = float(train_step(model, opt, (x, y), mse,
                                        [techniques.get("accumulation", name)]))
        grads[name] = [p.grad.clone() for p in model.parameters()]
    assert losses["none"] == pytest.approx(losses[f"accumulate{k}"], abs=1e-12)
    for g, h in zip(grads["none"], grads[f"accumulate{k}"]):
        assert (g - h).abs().max().item() <= 1e-12


def test_accumulation_in_a_run_counts_optimizer_steps():
    cfg = Config.for_task("speaker", **dict(TINY, steps=3), techniques={"accumulation": "2"})
    exp = Experiment(cfg)
    records = list(exp.run())
    assert [r.step for r in records] == [1, 2, 3]
    assert exp.optimizer.state[next(exp.model.parameters())]["step"] == 3


# ----------------------------------------------------------------------------- step in backward
def _adam(module):
    return torch.optim.Adam(module.parameters(), lr=1e-2)


@pytest.mark.parametrize("factory", ["adam", "adam8bit", "sgd8bit"])
def test_in_backward_steps_like_a_normal_step(factory):
    """The parameters after three steps equal a normal step's (fp64 Adam; the 8-bit optimizers
    quantize each tensor on its own, so per-parameter optimizers give the same bits too)."""
    make = {"adam": _adam, "adam8bit": lambda m: techniques.get("optimizer", "adam8bit").factory(
        m, lr=1e-2), "sgd8bit": lambda m: techniques.get("optimizer", "sgd8bit").factory(
        m, lr=1e-2)}[factory]
    dtype = torch.float64 if factory == "adam" else torch.float32
    x = torch.randn(8, D, dtype=dtype)
    out = {}
    for inb in (False, True):
        model = stack(dtype, bias=True, act=True)
        opt = steps.InBackwardOptimizer(model, make) if inb else make(model)
        for _ in range(3):
            train_step(model, opt, (x,), lambda m, b: m(b[0]).pow(2).mean())
        out[inb] = [p.detach().clone() for p in model.parameters()]
        if inb:
            assert all(p.grad is None for p in model.parameters())    # freed in backward
    for a, b in zip(out[False], out[True]):
        assert (a - b).abs().max().item() <= (1e-12 if factory == "adam" else 0.0)


def test_in_backward_never_holds_all_gradients():
    """Adam on a Linear stack: at the peak the gradients category holds the largest parameter's
    gradient and the activation gradient in flight (B x D), never all parameter gradients."""
    Bs = 8
    x = torch.randn(Bs, D, dtype=torch.float64)
    loss_fn = lambda m, b: torch.tanh(m(b[0])).pow(2).mean()          # noqa: E731
    for inb in (False, True):
        model = stack(torch.float64, bias=True)
        opt = steps.InBackwardOptimizer(model, _adam) if inb else _adam(model)
        for _ in range(2):                                              # steady state: step 2
            meter = meter_step(model, opt, (x,), [], loss_fn)
        grad_bytes = [p.numel() * 8 for p in model.parameters()]
        if inb:
            assert meter.breakdown()["gradients"] <= max(grad_bytes) + Bs * D * 8
            assert meter.category_peaks()["gradients"] < sum(grad_bytes) / 3
        else:
            assert meter.breakdown()["gradients"] >= sum(grad_bytes)


def test_in_backward_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match=r"optimizer-step='in-backward' cannot be combined with "
                                         r"optimizer='lowrank-adam'"):
        Config.for_task("speaker", optimizer="lowrank-adam",
                        techniques={"optimizer-step": "in-backward"}).validate()
    with pytest.raises(ValueError, match=r"optimizer-step='in-backward' cannot be combined with "
                                         r"accumulation='accumulate2'"):
        Config.for_task("speaker", techniques={"optimizer-step": "in-backward",
                                               "accumulation": "accumulate2"}).validate()
    Config.for_task("speaker", techniques={"optimizer-step": "in-backward",
                                           "accumulation": "1", "precision": "bf16"}).validate()


def test_in_backward_run_is_scheduled_and_metered():
    cfg = Config.for_task("speaker", **dict(TINY, steps=3), optimizer="adam8bit",
                          techniques={"optimizer-step": "in-backward"})
    exp = Experiment(cfg)
    records = list(exp.run())
    opt = exp.optimizer
    assert isinstance(opt, steps.InBackwardOptimizer) and len(opt.optimizers) == len(
        list(exp.model.parameters()))
    lrs = {o.param_groups[0]["lr"] for o in opt.optimizers.values()}
    assert len(lrs) == 1 and lrs.pop() == pytest.approx(exp.scheduler.get_last_lr()[0])
    assert records[0].lr != records[-1].lr                             # the schedule moved
    assert all(r.breakdown["optimizer"] > 0 for r in records[1:] if r.metered)
    state = opt.state_dict()
    opt.load_state_dict(state)
    with pytest.raises(ValueError, match="per_parameter"):
        opt.load_state_dict({"per_parameter": []})
    opt.remove()


# ----------------------------------------------------------------------------- everywhere
@pytest.mark.parametrize("choice", [{"precision": "bf16"}, {"accumulation": "accumulate4"},
                                    {"optimizer-step": "in-backward"},
                                    {"precision": "bf16", "accumulation": "2"}])
def test_each_appears_in_estimate_config(choice):
    base = estimate_config(Config.for_task("speaker", batch_size=8), steps=2)
    est = estimate_config(Config.for_task("speaker", batch_size=8, techniques=choice), steps=2)
    assert est.peak > 0 and est.host_peak is None
    if "precision" in choice or "accumulation" in choice:
        assert est.breakdown()["activations"] < base.breakdown()["activations"]
    else:
        assert est.breakdown()["gradients"] < base.breakdown()["gradients"]


def test_each_appears_in_compare(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    for option in ("--precision", "--accumulation", "--optimizer-step", "--offload", "bf16",
                   "accumulate4", "in-backward"):
        assert option in out
    for args in (["--precision", "bf16"], ["--accumulation", "accumulate4"],
                 ["--optimizer-step", "in-backward"], ["--accumulation", "3"]):
        assert main(["compare", "--task", "speaker", *args, "--steps", "3", "--batch-size", "4",
                     "--json"]) == 0
    capsys.readouterr()
    assert main(["compare", "--task", "speaker", "--optimizer", "lowrank-adam",
                 "--optimizer-step", "in-backward", "--steps", "2"]) == 2
    assert "cannot be combined with optimizer='lowrank-adam'" in capsys.readouterr().err


def test_cpu_meter_has_no_host_figure():
    with MemoryMeter("cpu") as meter:
        torch.ones(10)
    assert meter.host_peak is None and meter.host_allocated == 0


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_offload_moves_saved_activations_to_the_host():
    dev = torch.device("cuda")
    x = torch.randn(B, D, device=dev)
    off = techniques.get("offload", "host")
    res = {}
    for chosen in ([], [off]):
        model = stack().to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with MemoryMeter(dev, model=model, optimizer=opt, inputs=(x,)) as meter:
            train_step(model, opt, (x,), sum_loss, chosen)
        res[bool(chosen)] = meter
    on, moved = res[False], res[True]
    saved = (L - 1) * B * D * 4 + B * D * 4           # inputs of the L layers (x included)
    assert moved.host_peak >= saved - B * D * 4 and on.host_peak < B * D * 4
    assert moved.breakdown()["activations"] < on.breakdown()["activations"]
    cfg = Config.for_task("speaker", device="cuda", **TINY, techniques={"offload": "host"})
    records = list(Experiment(cfg).run())
    assert records[0].host_peak > 0
    assert estimate_config(cfg).host_peak > 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_fp16_scales_steps_and_updates():
    cfg = Config.for_task("speaker", device="cuda", **dict(TINY, steps=4),
                          techniques={"precision": "fp16"})
    exp = Experiment(cfg)
    records = list(exp.run())
    assert all(math.isfinite(r.loss) for r in records)
    assert all(p.dtype == torch.float32 for p in exp.model.parameters())
    est = estimate_config(cfg)
    assert est.peak > 0
    asr = Config.for_task("asr", device="cuda", steps=2, techniques={"precision": "fp16"},
                          loss="samplewise")
    assert math.isfinite(list(Experiment(asr).run())[-1].loss)
