"""Estimates of deep nets from shallower ones: the planner estimates a deep stage (or encoder)
at a few depths on fake tensors and extrapolates each category linearly to the full depth
(public through ``memlab.planner``; see its module docstring for when that is exact)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence


EXTRAPOLATE_FROM = 10     # a stage (speaker) / encoder (asr) this deep is measured shallower
DEPTHS = (2, 3)           # its sizes estimated, then extrapolated (from block 2 on all are alike)
PROXY_DEPTHS = (1, 2)     # the same for predictions, on the proxy (other stages at one block)
MARGIN = 0.15             # combinations predicted under budget x (1 + MARGIN) are estimated
CONFIRM_TOLERANCE = 0.005  # a full estimate this much above the extrapolated one: not linear


@dataclass(frozen=True)
class Axis:
    """What the planner extrapolates along: one speaker stage's blocks, or the encoder layers."""
    label: str                    # "stage 3 blocks" / "encoder layers"
    full: int                     # its size in the configuration
    stage: Optional[int] = None   # index into Config.blocks; None: Config.depth

    def size(self, cfg, n: int) -> int:
        """Blocks (layers) in all of cfg with the axis at ``n``: what an estimate's time scales
        with."""
        if self.stage is None:
            return n
        blocks = list(cfg.blocks if cfg.blocks is not None else (cfg.depth,) * 4)
        return sum(blocks) - blocks[self.stage] + n

    def at(self, cfg, n: int, proxy: bool = False):
        """cfg with the axis at ``n`` (``proxy``: every other stage at one block)."""
        if self.stage is None:
            return cfg.replace(depth=n)
        blocks = list(cfg.blocks if cfg.blocks is not None else (cfg.depth,) * 4)
        if proxy:
            blocks = [1] * len(blocks)
        blocks[self.stage] = n
        return cfg.replace(blocks=tuple(blocks))


def depth_axis(cfg, threshold: int = EXTRAPOLATE_FROM) -> Optional[Axis]:
    """The deepest stage of a staged model (the speaker nets), or the layers (the ASR encoder),
    when at least ``threshold`` deep."""
    from memlab import tasks
    if tasks.get(cfg.task).staged:
        blocks = tuple(cfg.blocks) if cfg.blocks is not None else (cfg.depth,) * 4
        i = max(range(len(blocks)), key=lambda j: blocks[j])
        return Axis(f"stage {i + 1} blocks", blocks[i], i) if blocks[i] >= threshold else None
    if cfg.depth >= threshold:
        return Axis("encoder layers", cfg.depth)
    return None


@dataclass
class Figure:
    """A step's peak at full size: estimated (``source="full"``) or extrapolated."""
    peak: int
    parts: Dict[str, int]                 # breakdown at the peak
    phase: Optional[str]
    source: str                           # "full" | e.g. "2,3->63"
    linear: bool = True                   # extrapolated: the depths agree on the peak's phase

    def breakdown(self) -> Dict[str, int]:
        return dict(self.parts)


def _extrapolate(estimates, depths: Sequence[int], full: int) -> Figure:
    """Each category at the peak (and the peak) linear in depth, from the last two depths."""
    (d1, e1), (d2, e2) = list(zip(depths, estimates))[-2:]
    b1, b2 = e1.breakdown(), e2.breakdown()

    def line(v1, v2):
        return int(round(v2 + (full - d2) * (v2 - v1) / (d2 - d1)))
    parts = {c: line(b1.get(c, 0), b2[c]) for c in b2}
    linear = len({e.peak_phase for e in estimates}) == 1
    return Figure(sum(parts.values()), parts, e2.peak_phase,
                  f"{','.join(map(str, depths))}->{full}", linear)


def extrapolated_estimate(cfg, *, depths: Sequence[int] = DEPTHS, axis: Optional[Axis] = None,
                          batch_size: Optional[int] = None, frames: Optional[int] = None,
                          num_classes: Optional[int] = None, proxy: bool = False,
                          progress=None) -> Figure:
    """``estimate_config`` of ``cfg`` at ``depths`` of its deepest stage (``depth_axis``), the
    peak and each category at the peak extrapolated linearly to the full depth.

    Exact where the step's peak moment stays where it is as blocks are added (each identical
    block adds the same bytes); a peak that moves to another moment as depth grows (checkpointing
    at depth: the block inputs outgrow the first stage's recompute) makes this a lower bound,
    so the planner confirms its top answers with a full estimate."""
    from memlab.lab import estimate_config
    depths = tuple(depths)
    if len(depths) < 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                              for d in depths) or list(depths) != sorted(set(depths)):
        raise ValueError(f"depths must be >= 2 increasing ints >= 1, got {depths!r}")
    axis = axis or depth_axis(cfg, threshold=depths[-1] + 1)
    if axis is None:
        raise ValueError(f"cfg: no stage deeper than depths {depths} to extrapolate along")
    out = []
    for d in depths:
        if progress is not None:
            progress(f"at {d} {axis.label}{' (proxy)' if proxy else ''}")
        out.append(estimate_config(axis.at(cfg, d, proxy).validate(), batch_size=batch_size,
                                   frames=frames, num_classes=num_classes, steps=2))
    return _extrapolate(out, depths, axis.full)
