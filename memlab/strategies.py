"""Built-in strategies: every technique memlab ships, registered once.

Factories import their technique lazily so that listing the names stays cheap and so that a
technique module never has to import the lab.
"""

from __future__ import annotations

import torch

from memlab.registry import register_loss, register_memory, register_optimizer

# --- activations (speaker models: memlab.models.ResNet / DFResNet take memory=<name>) ---------
register_memory("vanilla", description="ordinary autograd: every block keeps its activations",
                tasks=("speaker", "asr"))
register_memory("checkpoint", description="torch.utils.checkpoint per block: recompute in backward")
register_memory("reversible", description="partially reversible: reversible blocks, ordinary "
                "downsampling (Liu & Qian 2024)")
register_memory("reversible-full", description="fully reversible: reversible blocks and "
                "invertible downsampling")

# --- transducer loss (memlab.models.Transducer takes loss=<name>) ------------------------------
register_loss("batched", description="torchaudio rnnt_loss on the whole B x T x (U+1) x V tensor")
register_loss("samplewise", description="loss and joiner gradient one sample (or small group) at "
              "a time (Braun et al. 2022)")


# --- optimizers: factory(model, lr, weight_decay=0.0, **kw) -> torch.optim.Optimizer -----------
@register_optimizer("sgd", description="torch.optim.SGD, momentum 0.9 (fp32 state: 4 B/param)",
                    default_lr=0.1)
def _sgd(model, lr, weight_decay=0.0, **kw):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=kw.pop("momentum", 0.9),
                           weight_decay=weight_decay, **kw)


@register_optimizer("adam", description="torch.optim.Adam (fp32 state: 8 B/param)", default_lr=2e-3)
def _adam(model, lr, weight_decay=0.0, **kw):
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


@register_optimizer("adamw", description="torch.optim.AdamW (fp32 state: 8 B/param)",
                    default_lr=2e-3)
def _adamw(model, lr, weight_decay=0.0, **kw):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


@register_optimizer("sgd8bit", description="SGD momentum in dynamic 8-bit blocks (~1 B/param)",
                    default_lr=0.1)
def _sgd8bit(model, lr, weight_decay=0.0, **kw):
    from memlab.optim import SGD8bit
    return SGD8bit(model.parameters(), lr=lr, momentum=kw.pop("momentum", 0.9),
                   weight_decay=weight_decay, **kw)


@register_optimizer("adam8bit", description="Adam with dynamic 8-bit block-wise states (~2 B/param)",
                    default_lr=2e-3)
def _adam8bit(model, lr, weight_decay=0.0, **kw):
    from memlab.optim import Adam8bit
    return Adam8bit(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


@register_optimizer("adamw8bit", description="AdamW with dynamic 8-bit block-wise states",
                    default_lr=2e-3)
def _adamw8bit(model, lr, weight_decay=0.0, **kw):
    from memlab.optim import AdamW8bit
    return AdamW8bit(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


@register_optimizer("lowrank-adam", description="Adam on rank-r gradient factors of weight "
                    "matrices (Gooneratne et al. 2020)", default_lr=2e-3)
def _lowrank_adam(model, lr, weight_decay=0.0, **kw):
    from memlab.optim import LowRankAdam
    return LowRankAdam(model, lr=lr, weight_decay=weight_decay, **kw)
