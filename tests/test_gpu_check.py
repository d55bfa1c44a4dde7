"""The one GPU check (memlab.bench.gpu, tools/gpu_check.sh): its code runs on the CPU in dry mode
so it cannot rot on machines without a GPU; on CUDA every check must pass."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memlab.bench import gpu


def test_dry_run_on_cpu_runs_every_check(one_thread):
    rows = gpu.run(dry=True, device="cpu")
    assert [r["check"] for r in rows] == ["meter", "adam8bit-step", "sgd8bit-step", "reversible",
                                          "transducer", "paper-transducer"]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    by = {r["check"]: r for r in rows}
    assert by["adam8bit-step"]["ms"] > 0 and by["adam8bit-step"]["reference_ms"] > 0
    assert by["reversible"]["rows"] and by["transducer"]["rows"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_cuda_every_check_says_skipped():
    rows = gpu.run()
    assert rows and all(r["status"] == "skipped: no CUDA" for r in rows)


def test_script_writes_one_json(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(Path(__file__).parent.parent / "tools" / "gpu_check.sh"),
                          str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["checks"] and "wrote" in res.stdout


@pytest.mark.gpu
def test_gpu_check_on_cuda():
    rows = gpu.run(fast=True)
    assert all(r["status"] == "ok" for r in rows), [(r["check"], r["status"]) for r in rows]
    meter = next(r for r in rows if r["check"] == "meter")
    assert 0.95 <= meter["value"] <= 1.1     # meter vs torch.cuda.max_memory_allocated
