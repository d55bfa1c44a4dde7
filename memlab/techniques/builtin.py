"""Built-in kinds and techniques: every technique memlab ships, registered once.

Factories import their technique lazily so that listing the names stays cheap and so that a
technique module never has to import the lab. Model arguments are names the models resolve in
their own ``{name: builder}`` tables (``memlab.models.resnet.MEMORY`` ...).
"""

from __future__ import annotations

from memlab.techniques.base import register, register_kind, unregister

register_kind("memory", default="vanilla", description="activation strategies")
register_kind("optimizer", default="adam", description="optimizers")
register_kind("loss", default="batched", description="transducer losses (asr)")


# --- activations (speaker models: memlab.models.ResNet / DFResNet take memory=<name>) ---------
def _memory(name: str, description: str, tasks=("speaker",)):
    register("memory", name, description=description, tasks=tasks,
             model_args={"speaker": {"memory": name}})


_memory("vanilla", "ordinary autograd: every block keeps its activations", ("speaker", "asr"))
_memory("checkpoint", "torch.utils.checkpoint per block: recompute in backward")
_memory("reversible", "partially reversible: reversible blocks, ordinary downsampling "
        "(Liu & Qian 2024)")
_memory("reversible-full", "fully reversible: reversible blocks and invertible downsampling")

# --- transducer loss (memlab.models.Transducer takes loss=<name>) ------------------------------
for _name, _description in (
        ("batched", "the RNN-T loss on the whole B x T x (U+1) x V tensor at once "
                    "(memlab.transducer.rnnt_loss_batched)"),
        ("samplewise", "loss and joiner gradient one sample (or small group) at a time "
                       "(Braun et al. 2022)"),
        ("pruned", "pruned RNN-T: a simple additive joint bounds the lattice, the joiner runs "
                   "on prune_range symbols per frame (Kuang et al. 2022)"),
        ("samplewise-pruned", "the pruned band computed one sample (or small group) at a "
                              "time: neither 4-D tensor exists for the whole batch")):
    register("loss", _name, description=_description, tasks=("asr",),
             model_args={"asr": {"loss": _name}})


# --- optimizers: factory(model, lr, weight_decay=0.0, **kw) -> torch.optim.Optimizer -----------
# default_lr: when Config.lr is None; task_lr: a task's own default (Config.for_task), e.g. the
# Adam family's 6e-3 for the transducer (chosen by a small sweep, see the ASR notes)
def optimizer(name: str, *, description: str, tasks=None, **options):
    """Decorator registering ``factory`` as optimizer ``name``."""
    def deco(factory):
        register("optimizer", name, description=description, tasks=tasks, factory=factory,
                 **options)
        return factory
    return deco


_ADAM_LRS = dict(default_lr=2e-3, task_lr={"asr": 6e-3})


@optimizer("sgd", description="torch.optim.SGD, momentum 0.9 (fp32 state: 4 B/param)",
           default_lr=0.1)
def _sgd(model, lr, weight_decay=0.0, **kw):
    import torch
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=kw.pop("momentum", 0.9),
                           weight_decay=weight_decay, **kw)


@optimizer("adam", description="torch.optim.Adam (fp32 state: 8 B/param)", **_ADAM_LRS)
def _adam(model, lr, weight_decay=0.0, **kw):
    import torch
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


@optimizer("adamw", description="torch.optim.AdamW (fp32 state: 8 B/param)", **_ADAM_LRS)
def _adamw(model, lr, weight_decay=0.0, **kw):
    import torch
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


@optimizer("sgd8bit", description="SGD momentum in dynamic 8-bit blocks (~1 B/param)",
           default_lr=0.1)
def _sgd8bit(model, lr, weight_decay=0.0, **kw):
    from memlab.optim import SGD8bit
    return SGD8bit(model.parameters(), lr=lr, momentum=kw.pop("momentum", 0.9),
                   weight_decay=weight_decay, **kw)


@optimizer("adam8bit", description="Adam with dynamic 8-bit block-wise states (~2 B/param)",
           **_ADAM_LRS)
def _adam8bit(model, lr, weight_decay=0.0, **kw):
    from memlab.optim import Adam8bit
    return Adam8bit(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


@optimizer("adamw8bit", description="AdamW with dynamic 8-bit block-wise states", **_ADAM_LRS)
def _adamw8bit(model, lr, weight_decay=0.0, **kw):
    from memlab.optim import AdamW8bit
    return AdamW8bit(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


@optimizer("adam4bit", description="Adam with 4-bit states: signed DE first moment, zero-free "
           "linear second moment, rank-1 scales (Li et al. 2023; ~1.04 B/param), dithered "
           "rounding", **_ADAM_LRS)
def _adam4bit(model, lr, weight_decay=0.0, **kw):
    from memlab.optim4bit import Adam4bit
    return Adam4bit(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


@optimizer("adam4bit-nearest", description="Adam4bit rounding its moments to the nearest of "
           "the 16 values, as the paper (they stall: the loss trails fp32 Adam's)", **_ADAM_LRS)
def _adam4bit_nearest(model, lr, weight_decay=0.0, **kw):
    from memlab.optim4bit import Adam4bit
    return Adam4bit(model.parameters(), lr=lr, weight_decay=weight_decay, rounding="nearest",
                    **kw)


@optimizer("adamw4bit", description="AdamW with 4-bit states (Li et al. 2023)", **_ADAM_LRS)
def _adamw4bit(model, lr, weight_decay=0.0, **kw):
    from memlab.optim4bit import AdamW4bit
    return AdamW4bit(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


@optimizer("lowrank-adam", description="Adam on rank-r gradient factors of weight matrices "
           "(Gooneratne et al. 2020)", per_parameter=False, **_ADAM_LRS)
def _lowrank_adam(model, lr, weight_decay=0.0, **kw):
    from memlab.optim import LowRankAdam
    return LowRankAdam(model, lr=lr, weight_decay=weight_decay, **kw)


# --- step-level techniques (memlab.steps): hooks into memlab.lab.train_step -------------------
# Every kind below has a no-op default, so configurations written before it keep working.
from memlab import steps as _steps  # noqa: E402  (imports torch, not the lab)

register_kind("precision", default="fp32", description="numeric precision of forward + loss",
              noop="fp32 everywhere")
register("precision", "bf16", description="torch.autocast to bfloat16 around forward + loss; "
         "fp32 master weights", forward_context=_steps.autocast(_steps.DTYPES["bf16"]))

register_kind("accumulation", default="none", description="gradient accumulation (or "
              "accumulateK / K for any K)", noop="one forward + backward per optimizer step",
              resolve=_steps.resolve_accumulation)
for _k in (2, 4):
    register("accumulation", f"accumulate{_k}", **_steps.accumulation(_k))

register_kind("optimizer-step", default="after-backward", description="when the optimizer "
              "steps", noop="after backward, with every gradient")
register("optimizer-step", "in-backward", description="each parameter stepped and its gradient "
         "freed as soon as it is complete (post-accumulate-grad hooks)",
         build_optimizer=_steps.build_in_backward, check=_steps.in_backward_check)

register_kind("offload", default="none", description="where tensors saved for backward live",
              noop="on the device")


def register_cuda_only(available=None) -> bool:
    """Register the techniques that exist only where CUDA does (precision fp16 with a gradient
    scaler, offload to host); unregister them elsewhere. Returns whether CUDA is available."""
    import torch
    available = torch.cuda.is_available() if available is None else available
    if not available:
        unregister("precision", "fp16")
        unregister("offload", "host")
        return False
    register("precision", "fp16", description="torch.autocast to float16 + GradScaler (scale "
             "the loss, unscale, step, update); CUDA only", needs_gradients=True,
             forward_context=_steps.autocast(_steps.DTYPES["fp16"]),
             backward=_steps.scaled_backward, optimizer_step=_steps.scaled_optimizer_step,
             check=_steps.needs_cuda("precision", "fp16"))
    register("offload", "host", description="torch.autograd.graph.save_on_cpu(pin_memory=True): "
             "saved activations in pinned host memory; CUDA only",
             step_context=_steps.offload_context, check=_steps.needs_cuda("offload", "host"))
    return True


register_cuda_only()
