"""The one GPU check: everything that needs CUDA, in one command, under 8 minutes on one GPU.

``memlab bench gpu`` (or ``tools/gpu_check.sh``, which also runs the ``gpu``-marked tests and
writes ``gpu_check.json``) runs, each as one row with its own ``status`` and ``seconds``:

* ``meter``: ``MemoryMeter`` on a CUDA training step against ``torch.cuda.max_memory_allocated``
  (``value`` = meter peak / allocator peak; the allocator rounds blocks up to 512 B, so a little
  above 1 is expected and far from 1 is a bug);
* ``adam8bit-step`` / ``sgd8bit-step``: the CUDA 8-bit step (torch.compile of the pure step
  function) against torch's fused fp32 step on the same 4.18 M (and 33 M) parameters, timed
  alternately after warm-up (compilation excluded, reported as ``compile_s``);
* ``reversible``: ``memlab bench reversible`` on CUDA (activation peak per strategy, depth 4/32);
* ``transducer``: ``memlab bench transducer`` on CUDA (batched vs sample-wise peak and time);
* ``paper-transducer``: the sample-wise loss at the paper's batch 1024 x 40 s
  (``bench.transducer.run_paper``): peak from ``torch.cuda.max_memory_allocated``.

Without CUDA every row is ``status="skipped: no CUDA"`` unless ``dry=True``, which runs the same
code on the CPU at tiny sizes (what the test suite does, so the check cannot rot unseen).
A row that raises is reported with ``status="error: ..."``; the others still run.
"""

from __future__ import annotations

import statistics
import time
import traceback
from typing import Callable, List, Optional

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def meter_check(device: torch.device, small: bool) -> dict:
    from memlab.memory import MemoryMeter
    width = 64 if small else 2048
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).to(device)
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(32 if small else 512, width, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with MemoryMeter(device, model=model, optimizer=opt, inputs=[x]) as m:
        model(x).square().mean().backward()
        opt.step()
    row = dict(check="meter", meter_peak=m.peak, device_peak=m.device_peak)
    if m.device_peak:
        row["value"] = round(m.peak / m.device_peak, 4)
    return row


def _param_set(n_elems: int, device: torch.device) -> List[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    side = 1024
    rows = max(1, n_elems // side // 8)
    ps = [nn.Parameter((torch.randn(rows, side, generator=g) * 0.05).to(device))
          for _ in range(8)]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(device)
    return ps


def step_check(kind: str, device: torch.device, numel: int, repeats: int) -> dict:
    from memlab.optim import Adam8bit, SGD8bit
    ours_make: Callable = (lambda ps: Adam8bit(ps, lr=1e-3)) if kind == "adam" else \
        (lambda ps: SGD8bit(ps, lr=0.01, momentum=0.9))
    ref_make: Callable = (lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)) if kind == "adam" \
        else (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, fused=True))
    opts = {"memlab": ours_make(_param_set(numel, device)),
            "torch-fused": ref_make(_param_set(numel, device))}
    t0 = time.perf_counter()
    opts["memlab"].step()                      # first step: state creation + compilation
    _sync(device)
    compile_s = time.perf_counter() - t0
    opts["torch-fused"].step()
    times = {n: [] for n in opts}
    for _ in range(repeats):
        for n, o in opts.items():
            _sync(device)
            t = time.perf_counter()
            o.step()
            _sync(device)
            times[n].append(time.perf_counter() - t)
    a, b = statistics.median(times["memlab"]), statistics.median(times["torch-fused"])
    return dict(check=f"{kind}8bit-step", numel=numel, ms=round(a * 1e3, 3),
                reference_ms=round(b * 1e3, 3), value=round(a / b, 3), compile_s=round(compile_s, 1),
                ms_range=[round(min(times["memlab"]) * 1e3, 3), round(max(times["memlab"]) * 1e3, 3)])


def reversible_check(device: torch.device, small: bool) -> dict:
    from memlab.bench import reversible
    rows = reversible.run(fast=small, depths=(2, 4) if small else (4, 32),
                          steps=1 if small else 3, device=device)
    return dict(check="reversible", rows=rows)


def transducer_check(device: torch.device, small: bool) -> dict:
    from memlab.bench import transducer
    rows = transducer.run(fast=small, device=device)
    return dict(check="transducer", rows=rows)


def paper_check(device: torch.device, small: bool) -> dict:
    from memlab.bench import transducer
    kw = dict(batch_size=4, seconds=2.0, vocab_size=32) if small else {}
    return dict(check="paper-transducer", rows=transducer.run_paper(device, **kw))


def run(fast: bool = False, dry: bool = False, device: Optional[str] = None) -> List[dict]:
    """Every CUDA check (see the module docstring); ``dry``: the same code on CPU, tiny."""
    cuda = torch.cuda.is_available()
    dev = torch.device(device or ("cuda" if cuda else "cpu"))
    small = fast or dry or dev.type != "cuda"
    checks = [("meter", lambda: meter_check(dev, small)),
              ("adam8bit-step", lambda: step_check("adam", dev, 2 ** 16 if small else 4_180_000,
                                                   2 if small else 20)),
              ("sgd8bit-step", lambda: step_check("sgd", dev, 2 ** 16 if small else 4_180_000,
                                                  2 if small else 20))]
    if not small:
        checks += [("adam8bit-step-33M", lambda: step_check("adam", dev, 33_000_000, 10))]
    checks += [("reversible", lambda: reversible_check(dev, small)),
               ("transducer", lambda: transducer_check(dev, small)),
               ("paper-transducer", lambda: paper_check(dev, small))]
    rows = []
    for name, fn in checks:
        if dev.type != "cuda" and not dry:
            rows.append(dict(check=name, status="skipped: no CUDA"))
            continue
        t0 = time.perf_counter()
        try:
            row = fn()
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            row = dict(check=name, status=f"error: {type(e).__name__}: {str(e)[:300]}",
                       traceback=traceback.format_exc(limit=5))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        rows.append(row)
    return rows
