"""The step-time ratios the planner ranks by: each measured side by side against its kind's
default, with the command and the machine it came from (public through ``memlab.planner``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from memlab import techniques as tech


@dataclass(frozen=True)
class Measured:
    """A step-time ratio measured side by side against the kind's default."""
    ratio: float                  # time / default's time
    scope: str                    # "step": the whole training step; "optimizer step"; "loss"
    where: str                    # workload
    command: str                  # how to measure it again
    machine: str = "2-core shared CPU, no GPU, 1 thread (OMP_NUM_THREADS=1)"
    spread: str = ""              # range seen over repeats


_XEON = "2-core Intel Xeon with AVX-512, no GPU, 1 thread (OMP_NUM_THREADS=1)"
_DEEP = "the deep-speaker scenario's live step (DF-ResNet 1-1-24-1, batch 8 x 1 s)"
_COMPARE = ("OMP_NUM_THREADS=1: memlab.alternatives.compare('deep-speaker', [choice], repeats=6, "
            "full_size=False), two runs")

# (kind, name) -> {model or "*": Measured}; from README's results (the benches' own figures)
MEASURED: Dict[Tuple[str, str], Dict[str, Measured]] = {
    ("memory", "checkpoint"): {
        "resnet": Measured(1.39, "step", "ResNet, stage 3 of depth 32, width 32, batch 2 x 100",
                           "OMP_NUM_THREADS=1 memlab bench reversible", spread="1.29-1.49"),
        "dfresnet": Measured(1.29, "step", "DF-ResNet, stage 3 of depth 16",
                             "bench.reversible.run(model='dfresnet')", spread="1.29-1.43")},
    ("memory", "reversible"): {
        "resnet": Measured(1.44, "step", "ResNet, stage 3 of depth 32, width 32, batch 2 x 100",
                           "OMP_NUM_THREADS=1 memlab bench reversible", spread="1.30-1.50"),
        "dfresnet": Measured(1.62, "step", "DF-ResNet, stage 3 of depth 16",
                             "bench.reversible.run(model='dfresnet')", spread="1.62-1.80")},
    ("memory", "reversible-full"): {
        "resnet": Measured(1.47, "step", "ResNet, stage 3 of depth 32, width 32, batch 2 x 100",
                           "OMP_NUM_THREADS=1 memlab bench reversible", spread="1.32-1.55"),
        "dfresnet": Measured(1.58, "step", _DEEP, _COMPARE, _XEON, spread="1.53-1.62")},
    ("optimizer", "adam8bit"): {
        "*": Measured(1.33, "optimizer step", "4.18 M params in 34 tensors vs torch fused fp32 "
                      "Adam (a DF-ResNet233's 708 tensors: 1.85)",
                      "memlab.bench.optim.step_times(repeats=9, threads=1)", _XEON,
                      spread="1.21-1.85")},
    ("optimizer", "adamw8bit"): {
        "*": Measured(1.33, "optimizer step", "as adam8bit (the same kernel)",
                      "memlab.bench.optim.step_times(repeats=9, threads=1)", _XEON,
                      spread="1.21-1.85")},
    ("optimizer", "sgd8bit"): {
        "*": Measured(1.25, "optimizer step", "4.18 M params in 34 tensors vs torch fused fp32 "
                      "SGD (a DF-ResNet233's 708 tensors: 1.86)",
                      "memlab.bench.optim.step_times(repeats=9, threads=1)", _XEON,
                      spread="1.08-1.86")},
    ("loss", "samplewise"): {
        "*": Measured(0.77, "loss", "B=32, T=200, U=40, V=512 loss step vs batched",
                      "OMP_NUM_THREADS=1 memlab bench transducer", spread="0.77-0.93 "
                      "(1-2 threads; 1.3-1.56 on a busy machine)")},
}
# the optimizer step is a small part of a training step: its factor is shown, not multiplied in


def step_factor(choices: Mapping[str, str], model: Optional[str] = None
                ) -> Tuple[float, List[str], List[str]]:
    """(whole-step factor, notes, unmeasured): the product of the measured whole-step ratios
    of ``choices`` (kind -> name); notes name each ratio and its scope; unmeasured lists the
    non-default choices without a measurement."""
    factor, notes, missing = 1.0, [], []
    for kind, name in choices.items():
        if name == tech.default(kind):
            continue
        table = MEASURED.get((kind, name)) or {}
        m, other = table.get(model or "", table.get("*")), ""
        if m is None and table:             # measured on another model only: say which
            other, m = next(iter(table.items()))
        if m is None:
            missing.append(f"{kind}={name}")
            continue
        if m.scope == "step":
            factor *= m.ratio
        notes.append(f"{name} {m.ratio:.2f}x {m.scope}" + (f" (on {other})" if other else ""))
    return factor, notes, missing
