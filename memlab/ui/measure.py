"""Headless measurement for scripts and tutorials: the memory of one training step, and sweeps.

    from memlab.lab import Config
    from memlab.ui.measure import measure_step, sweep
    meter = measure_step(Config(width=8, batch_size=16))     # MemoryMeter of the steady state
    rows = sweep(Config(width=8), "batch_size", [4, 8, 16])  # one row per value, by category

The step is the lab's own (``memlab.lab.training_step``: the task's loss, every technique's
step context), on a batch of the task's ``random_batch`` (noise of the right shapes: memory does
not care what the numbers are). Imports neither ipywidgets nor plotly, so measuring from a
script stays light; the figures of these rows are in ``memlab.ui.figures``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from memlab import tasks
from memlab.lab import Config, build_model, build_optimizer, estimate_config, training_step
from memlab.memory import MemoryMeter


def measure_step(config: Config, frames: Optional[int] = None, steps: int = 2,
                 num_classes: Optional[int] = None) -> MemoryMeter:
    """Train ``steps`` steps of ``config``'s model on random input; meter the last one.

    Returns the ``MemoryMeter`` (``peak``, ``breakdown()``, ``timeline``...). With ``steps=2``
    the optimizer state already exists when the metered step starts: the steady state of
    training. ``frames`` defaults to ``config.seconds * 100`` (10 ms frames).
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a memlab.lab.Config, got {type(config).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    cfg = config.validate()
    T = frames or int(round(cfg.seconds * 100))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes=num_classes).to(cfg.device)
    opt = build_optimizer(cfg, model)
    batch = tasks.get(cfg.task).random_batch(cfg, cfg.batch_size, T, num_classes,
                                             device=cfg.device)
    step = training_step(cfg)
    for _ in range(steps - 1):
        step(model, opt, batch)
    with MemoryMeter(cfg.device, model=model, optimizer=opt, inputs=batch,
                     budget=cfg.budget) as meter:
        step(model, opt, batch)
    return meter


def sweep(config: Config, name: str, values, *, frames: Optional[int] = None,
          fake: bool = False, num_classes: Optional[int] = None) -> List[Dict[str, Any]]:
    """Memory of one training step while one Config field takes each of ``values``.

    ``fake=False`` measures real tensors with ``measure_step`` (steady state, step 2);
    ``fake=True`` uses ``memlab.lab.estimate_config`` (fake tensors: any size, no memory).
    One row per value: ``{name: value, "label", "peak", <category>: bytes...}``.
    """
    if name not in Config.__dataclass_fields__:
        raise ValueError(f"name must be a Config field, got {name!r}")
    rows = []
    for v in values:
        cfg = config.replace(**{name: v})
        if fake:
            est = estimate_config(cfg, frames=frames, steps=2, num_classes=num_classes)
            peak, bd = est.peak, est.breakdown()
        else:
            m = measure_step(cfg, frames=frames, num_classes=num_classes)
            peak, bd = m.peak, m.breakdown()
        label = "x".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
        rows.append({name: v, "label": label, "peak": peak, **bd})
    return rows
