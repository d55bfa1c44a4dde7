#!/usr/bin/env bash
# The one GPU check (under 8 minutes on one GPU): the gpu-marked tests, then every CUDA
# measurement of `memlab bench gpu`, into one JSON. Run it first on a machine with a GPU:
#   pip install --no-deps -e . && tools/gpu_check.sh [out.json]
# Without CUDA it says so and exits 0 after running the checks' code on the CPU (--dry).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
export MEMLAB_PROGRESS=0
python - "$out" <<'PY'
import json, subprocess, sys, time
import torch
out = sys.argv[1]
result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
          "torch": torch.__version__}
t0 = time.time()
if torch.cuda.is_available():
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                            "no:cacheprovider"], capture_output=True, text=True, timeout=240)
    result["gpu_tests"] = {"rc": tests.returncode,
                           "summary": (tests.stdout.strip().splitlines() or [""])[-1],
                           "seconds": round(time.time() - t0, 1)}
from memlab.bench import gpu
result["checks"] = gpu.run(dry=not torch.cuda.is_available())
result["seconds"] = round(time.time() - t0, 1)
with open(out, "w") as f:
    json.dump(result, f, indent=2, default=str)
for row in result["checks"]:
    print(f"{row['check']:<20} {row['status']:<10} {row.get('value', '')} ({row['seconds']} s)")
if "gpu_tests" in result:
    print("gpu tests:", result["gpu_tests"]["summary"])
print(f"wrote {out} ({result['seconds']} s on {result['device']})")
bad = [r for r in result["checks"] if r["status"].startswith("error")]
sys.exit(1 if bad or result.get("gpu_tests", {}).get("rc", 0) not in (0, 5) else 0)
PY
