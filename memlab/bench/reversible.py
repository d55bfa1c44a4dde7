"""Benchmark: activation memory and step time of the four memory strategies vs depth.

What is measured
----------------
A small speaker ResNet (or DF-ResNet) whose third stage has ``depth`` blocks
(``num_blocks=(1, 1, depth, 1)``) is trained for one step (forward, ``emb.square().mean()``
as the loss, backward) with each memory strategy -- "vanilla", "checkpoint", "reversible",
"reversible-full" -- on the same random fbank batch, side by side in one process:

* ``activation_bytes``: the peak of the *activations* category of ``memlab.memory.MemoryMeter``
  over the step (tensors saved for backward, live forward intermediates and the recomputation
  in backward). Without a working meter, the bytes of the unique storages saved for backward
  (``torch.autograd.graph.saved_tensors_hooks``) are reported instead (``meter`` column).
* ``peak_bytes``: the meter's total peak above the baseline (activations + gradients in flight
  + parameter gradients).
* ``step_s``: median wall time of ``steps`` training steps after one warm-up step; the
  strategies are timed round-robin so that load on the machine affects them alike.
  ``cpu_s``: the same in process CPU time (more stable on a shared machine).
* ``activation_ratio`` / ``time_ratio``: relative to vanilla at the same depth (time ratio
  from ``cpu_s``).

Expected: vanilla activations grow linearly with depth; checkpoint grows with a smaller slope
(one stored block input per block); reversible and reversible-full stay flat. Reversible costs
one extra forward of the reversible blocks (theory ~4/3 of the step time); checkpoint likewise.
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

STRATEGIES = ("vanilla", "checkpoint", "reversible", "reversible-full")


def _build(model: str, memory: str, depth: int, width: int, feat_dim: int):
    if model == "resnet":
        from memlab.models.resnet import ResNet
        return ResNet(num_blocks=(1, 1, depth, 1), width=width, feat_dim=feat_dim,
                      embed_dim=64, memory=memory)
    if model == "dfresnet":
        from memlab.models.dfresnet import DFResNet
        return DFResNet(depths=(1, 1, depth, 1), width=width, feat_dim=feat_dim,
                        embed_dim=64, memory=memory)
    raise ValueError(f"model must be 'resnet' or 'dfresnet', got {model!r}")


def _step(net, x) -> None:
    net.zero_grad(set_to_none=True)
    net(x).square().mean().backward()


def _saved_bytes(net, x) -> int:
    """Fallback meter: bytes of unique storages saved for backward during forward."""
    seen: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    net.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net(x).square().mean()
    loss.backward()
    return sum(seen.values())


def _measure_memory(net, x):
    try:
        from memlab.memory import MemoryMeter
    except Exception:  # pragma: no cover - the meter is part of memlab; fallback for safety
        return _saved_bytes(net, x), None, "saved-tensors"
    net.zero_grad(set_to_none=True)
    with MemoryMeter(x.device, model=net, inputs=[x]) as m:
        net(x).square().mean().backward()
    return m.category_peaks()["activations"], m.peak - m.baseline, "MemoryMeter"


def run(fast: bool = False, depths: Optional[Sequence[int]] = None,
        batch_size: Optional[int] = None, model: str = "resnet", frames: Optional[int] = None,
        width: Optional[int] = None, steps: Optional[int] = None,
        strategies: Sequence[str] = STRATEGIES, threads: Optional[int] = None,
        seed: int = 0) -> List[dict]:
    """One row per (depth, strategy); see the module docstring for the columns.

    Args:
        fast: tiny sizes (seconds on a laptop CPU).
        depths: blocks in the third stage (default (4, 8, 16, 32); fast: (2, 8)).
        batch_size, frames, width: input batch, frames per utterance, first-stage width.
        model: "resnet" or "dfresnet".
        steps: timed steps per strategy (median reported).
        threads: ``torch.set_num_threads`` for the run (restored afterwards); on a loaded
            machine 1 thread gives the steadiest ratios.
    """
    depths = tuple(depths) if depths is not None else ((2, 8) if fast else (4, 8, 16, 32))
    batch_size = batch_size or (2 if fast else 8)
    frames = frames or (32 if fast else 100)
    width = width or (8 if fast else 16)
    steps = steps or (2 if fast else 5)
    feat_dim = 40
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"strategies must be drawn from {STRATEGIES}, got {s!r}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    rows: List[dict] = []
    try:
        for depth in depths:
            torch.manual_seed(seed)
            x = torch.randn(batch_size, frames, feat_dim)              # (B, T, F)
            nets = {s: _build(model, s, depth, width, feat_dim) for s in strategies}
            mem = {s: _measure_memory(nets[s], x) for s in strategies}
            wall: Dict[str, list] = {s: [] for s in strategies}
            cpu: Dict[str, list] = {s: [] for s in strategies}
            for s in strategies:                                       # warm-up
                _step(nets[s], x)
            for _ in range(steps):
                for s in strategies:                                   # round-robin
                    t0, c0 = time.perf_counter(), time.process_time()
                    _step(nets[s], x)
                    wall[s].append(time.perf_counter() - t0)
                    cpu[s].append(time.process_time() - c0)
            base = strategies[0] if "vanilla" not in strategies else "vanilla"
            for s in strategies:
                act, peak, how = mem[s]
                row = {
                    "model": model, "depth": depth, "strategy": s,
                    "params": sum(p.numel() for p in nets[s].parameters()),
                    "batch_size": batch_size, "frames": frames, "width": width,
                    "activation_bytes": int(act),
                    "peak_bytes": int(peak) if peak is not None else None,
                    "step_s": statistics.median(wall[s]), "cpu_s": statistics.median(cpu[s]),
                    "meter": how, "threads": torch.get_num_threads(),
                }
                rows.append(row)
            b_act, b_cpu = mem[base][0], statistics.median(cpu[base])
            for row in rows[-len(strategies):]:
                row["activation_ratio"] = row["activation_bytes"] / b_act if b_act else None
                row["time_ratio"] = row["cpu_s"] / b_cpu if b_cpu else None
    finally:
        torch.set_num_threads(old_threads)
    return rows


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys
    for r in run(fast="--fast" in sys.argv, threads=1):
        print(json.dumps(r))
