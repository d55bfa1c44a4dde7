"""Benchmark: activation memory and step time of the four memory strategies vs depth.

What is measured
----------------
A small speaker ResNet (or DF-ResNet) whose third stage has ``depth`` blocks
(``num_blocks=(1, 1, depth, 1)``) is trained for one step (forward, ``emb.square().mean()``
as the loss, backward) with each memory strategy -- "vanilla", "checkpoint", "reversible",
"reversible-full" -- on the same random fbank batch, side by side in one process.

Workload (default): the widths of the paper's ResNet34 and of memlab's ``ResNet`` defaults --
first-stage width 32 (stages of 32/64/128/256 channels) on 80-dim fbank -- with a batch of 2
utterances of 100 frames, so that a run takes about 1-1.5 minutes on one CPU thread. Earlier
versions used width 16 on 40-dim fbank with batch 8: the same number of activation elements (so
the same memory figures) but half the channels everywhere, which made the couplings' F and G,
which see half the channels, unrepresentatively narrow -- 8 channels in the full-resolution
first stage, where oneDNN's CPU convolutions are least efficient. Measured on one thread, a
coupling there cost 1.6-1.9x a BasicBlock (1.5-1.65x at width 32), and in the third stage the
same couplings under plain autograd cost 1.11-1.17x the BasicBlocks at 64 channels against
1.07-1.08x at 128, while the reversible backward itself costs ~1.3-1.36x plain autograd through
the same couplings at both widths. Pass ``width=16, feat_dim=40, batch_size=8`` to get the
old workload back. Columns:

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
(one stored block input per block) once those inputs outweigh the working set of the first,
full-resolution stage (at the default sizes from depth ~16 on); reversible and reversible-full
stay flat. ``peak_bytes`` (activations + gradients in flight) of checkpoint and reversible are
close: both peak in backward at the first stage. Reversible costs one extra forward of the
reversible blocks (theory ~4/3 of the step time); checkpoint likewise. On a CPU the reversible
ratio to vanilla is that 4/3 times what the couplings themselves cost against BasicBlocks of
the same parameter count (half-width convolutions, three BatchNorms' worth of channels instead
of two): it grows with depth towards ~1.4-1.5 as the couplings take over the step.

Two companions (used by ``notebooks/01_reversible_networks.ipynb``):

* ``reconstruction_error``: how far ``ReversibleSequence.inverse(forward(x))`` lands from ``x``,
  and how far the reversible gradient lands from ordinary autograd's, against depth, in fp32
  and fp64 (rounding piles up through the chain of subtractions).
* ``full_size``: ``memlab.lab.estimate_config`` on fake tensors for paper-scale models
  (wespeaker ResNet34, DF-ResNet56 / 110 / 233 at batch 128 x 200 frames, 5,994 speakers,
  Adam) under each strategy: peak, breakdown and the phase of the peak, no memory needed.
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from memlab.models.resnet import MEMORY as RESNET_MEMORY

STRATEGIES = tuple(RESNET_MEMORY)     # what the speaker models implement (their own table)


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
        seed: int = 0, feat_dim: Optional[int] = None, device="cpu") -> List[dict]:
    """One row per (depth, strategy); see the module docstring for the columns.

    Args:
        fast: tiny sizes (seconds on a laptop CPU).
        depths: blocks in the third stage (default (4, 8, 16, 32); fast: (2, 8)).
        batch_size, frames, width, feat_dim: input batch (default 2; fast 2), frames per
            utterance (100; fast 32), first-stage width (32; fast 8), fbank bins (80; fast 40).
        model: "resnet" or "dfresnet".
        steps: timed steps per strategy (median reported).
        threads: ``torch.set_num_threads`` for the run (restored afterwards); on a loaded
            machine 1 thread gives the steadiest ratios.
        device: where the nets and the batch live ("cuda": the meter also reads the allocator;
            times are wall times after a synchronize, ``cpu_s`` is then host time).
    """
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    depths = tuple(depths) if depths is not None else ((2, 8) if fast else (4, 8, 16, 32))
    batch_size = batch_size or 2
    frames = frames or (32 if fast else 100)
    width = width or (8 if fast else 32)
    steps = steps or (2 if fast else 5)
    feat_dim = feat_dim or (40 if fast else 80)
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
            x = torch.randn(batch_size, frames, feat_dim).to(device)   # (B, T, F)
            nets = {s: _build(model, s, depth, width, feat_dim).to(device) for s in strategies}
            mem = {s: _measure_memory(nets[s], x) for s in strategies}
            wall: Dict[str, list] = {s: [] for s in strategies}
            cpu: Dict[str, list] = {s: [] for s in strategies}
            for s in strategies:                                       # warm-up
                _step(nets[s], x)
            for _ in range(steps):
                for s in strategies:                                   # round-robin
                    sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    _step(nets[s], x)
                    sync()
                    wall[s].append(time.perf_counter() - t0)
                    cpu[s].append(time.process_time() - c0)
            base = strategies[0] if "vanilla" not in strategies else "vanilla"
            for s in strategies:
                act, peak, how = mem[s]
                row = {
                    "model": model, "depth": depth, "strategy": s,
                    "params": sum(p.numel() for p in nets[s].parameters()),
                    "batch_size": batch_size, "frames": frames, "feat_dim": feat_dim, "width": width,
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


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def reconstruction_error(fast: bool = False, depths: Optional[Sequence[int]] = None,
                         dtypes: Sequence[str] = ("float32", "float64"),
                         channels: Optional[int] = None, batch_size: int = 2,
                         size: Optional[Sequence[int]] = None, seed: int = 0) -> List[dict]:
    """One row per (depth, dtype): the error of recomputing activations instead of storing them.

    A stage of ``depth`` ResNet couplings (``memlab.models.resnet.basic_coupling``, freshly
    initialised, BatchNorm in eval mode so that forward and inverse see the same function) maps
    ``x`` (B, channels, H, W) of unit variance to ``y``. Columns:

    * ``max_abs_error``: ``max |inverse(y) - x|``; ``rel_error``: ``||inverse(y) - x|| / ||x||``.
    * ``grad_rel_error``: ``||g_rev - g|| / ||g||`` over all parameter gradients of
      ``(y * w).sum()`` (fixed random ``w``): the reversible backward, which computes them from
      reconstructed activations, against ordinary autograd through the same layers.
    * ``output_max``: ``max |y|``; the error of each subtraction is proportional to the size of
      the numbers it subtracts, so it grows with depth as the activations do.
    """
    from memlab.models.resnet import basic_coupling
    from memlab.reversible import ReversibleSequence

    if depths is None:
        depths = (1, 4, 16) if fast else (1, 2, 4, 8, 16, 32, 64)
    depths = tuple(depths)
    channels = channels or (8 if fast else 16)
    H, W = tuple(size) if size is not None else ((8, 16) if fast else (20, 50))
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtypes must be drawn from {tuple(DTYPES)}, got {d!r}")
    if not depths or any(not isinstance(d, int) or d < 1 for d in depths):
        raise ValueError(f"depths must be ints >= 1, got {depths!r}")
    torch.manual_seed(seed)
    layers = [basic_coupling(channels, channels) for _ in range(max(depths))]
    x0 = torch.randn(batch_size, channels, H, W, dtype=torch.float64)      # (B, C, H, W)
    w0 = torch.randn(batch_size, channels, H, W, dtype=torch.float64)      # (B, C, H, W)
    rows: List[dict] = []
    for name in dtypes:
        dt = DTYPES[name]
        for depth in depths:
            seq = ReversibleSequence([m.to(dt) for m in layers[:depth]]).eval()
            x, w = x0.to(dt), w0.to(dt)
            with torch.no_grad():
                y = seq(x)                                                 # (B, C, H, W)
                x_rec = seq.inverse(y)                                     # (B, C, H, W)
            g_rev = _param_grads(seq, lambda: seq(x), w)                   # reversible backward
            g_ref = _param_grads(seq, lambda: seq._plain(x), w)            # ordinary autograd
            diff = (x_rec - x).double()
            rows.append({
                "depth": depth, "dtype": name, "channels": channels,
                "max_abs_error": float(diff.abs().max()),
                "rel_error": float(diff.norm() / x.double().norm()),
                "grad_rel_error": float((g_rev - g_ref).norm() / g_ref.norm()),
                "output_max": float(y.abs().max()),
            })
    return rows


def _param_grads(module, forward, w) -> torch.Tensor:
    """All parameter gradients of ``(forward() * w).sum()``, flattened into one fp64 vector."""
    module.zero_grad(set_to_none=True)
    (forward() * w).sum().backward()
    grads = torch.cat([p.grad.double().flatten() for p in module.parameters()])
    module.zero_grad(set_to_none=True)
    return grads


def full_size(fast: bool = False, models: Optional[Sequence[str]] = None,
              strategies: Sequence[str] = STRATEGIES, batch_size: Optional[int] = None,
              frames: int = 200, num_classes: int = 5994, width: int = 32,
              steps: int = 2) -> List[dict]:
    """Paper-scale what-if on fake tensors: one row per (model, strategy).

    ``models`` are names from ``PAPER_MODELS`` (default: ResNet34 and DF-ResNet56; fast: a
    tiny ResNet, since the cost of a fake step is per op, not per byte). Each row holds
    ``peak_bytes``, the breakdown at the peak (``parameters`` ... ``other``), ``peak_phase``,
    ``params`` and ``peak_ratio`` (relative to vanilla). ``steps=2`` counts Adam's state.
    """
    from memlab.lab import Config, build_model, estimate_config

    if models is None:
        models = ("tiny-ResNet",) if fast else ("ResNet34", "DF-ResNet56")
    batch_size = batch_size or (16 if fast else 128)
    for m in models:
        if m not in PAPER_MODELS:
            raise ValueError(f"models must be drawn from {tuple(PAPER_MODELS)}, got {m!r}")
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"strategies must be drawn from {STRATEGIES}, got {s!r}")
    rows: List[dict] = []
    for m in models:
        arch, blocks = PAPER_MODELS[m]
        w = 8 if m.startswith("tiny") else width
        first = len(rows)
        for s in strategies:
            cfg = Config(task="speaker", model=arch, blocks=blocks, width=w, embed_dim=256,
                         batch_size=batch_size, memory=s)
            est = estimate_config(cfg, frames=frames, num_classes=num_classes, steps=steps)
            backbone = build_model(cfg, num_classes=num_classes).backbone
            rows.append({"model": m, "strategy": s, "batch_size": batch_size,
                         "frames": frames, "width": w,
                         "params": sum(p.numel() for p in backbone.parameters()),
                         "peak_bytes": int(est.peak), "peak_phase": est.peak_phase,
                         **{k: int(v) for k, v in est.breakdown().items()},
                         "activation_peak_bytes": int(est.category_peaks()["activations"])})
        base = next((r for r in rows[first:] if r["strategy"] == "vanilla"), rows[first])
        for r in rows[first:]:
            r["peak_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    return rows


def _paper_models() -> Dict[str, tuple]:
    from memlab.models.dfresnet import DEPTHS as DF_DEPTHS
    out = {"tiny-ResNet": ("resnet", (1, 1, 2, 1)), "ResNet34": ("resnet", (3, 4, 6, 3))}
    out.update({name: ("dfresnet", blocks) for name, blocks in DF_DEPTHS.items()})
    return out


# name -> (Config.model, blocks per stage); width 32 as in wespeaker and Liu & Qian 2024
PAPER_MODELS = _paper_models()


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys
    for r in run(fast="--fast" in sys.argv, threads=1):
        print(json.dumps(r))
