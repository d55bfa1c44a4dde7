"""Record and replay the RNG state a module call consumes: a recomputation in backward (the
reversible blocks, the sample-wise and pruned losses with ``reduction="none"``) must draw the
same dropout masks as the forward did, and must leave the caller's RNG where it was."""

from __future__ import annotations

import contextlib

import torch


def capture_rng(device: torch.device):
    """The CPU (and, for a CUDA device, that device's) RNG state a call on ``device`` may use."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replay_rng(state, device: torch.device):
    """Run the body from the recorded ``state`` (None: as is); the current state is restored
    afterwards."""
    if state is None:
        yield
        return
    cpu, cuda = state
    devices = [device] if cuda is not None else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
