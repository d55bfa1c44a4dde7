"""Side-by-side benchmarks: one module per technique, each with ``run(fast=False) -> list[dict]``."""

BENCHMARKS = ("reversible", "optim", "transducer", "lowrank", "peers", "gpu")
