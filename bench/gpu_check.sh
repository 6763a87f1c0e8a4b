#!/usr/bin/env bash
# Every GPU check of the project in one command, for a machine with one NVIDIA GPU (H100/H200 class):
# `bench/gpu.py` first (the results to commit), then `pytest -m gpu` in the time that is left, then copies of the
# logs and results.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]        (default: bench/results/gpu-check)
#
# Environment:
#   PYTHON           the Python that has torch with CUDA (default: python3)
#   GPU_SITE         a folder of extra packages put first on PYTHONPATH, e.g. one `bash dev.sh gpu-site DIR`
#                    made for a machine without network access (default: .gpu-site when it exists)
#   TOTAL_S          wall-clock seconds for everything (default 580)
#   TESTS_S          seconds kept for `pytest -m gpu` (default 150; interrupted tests still print their summary);
#                    the benchmark's budget is TOTAL_S - TESTS_S - 20
#
# RESULTS_DIR receives env.txt, gpu-bench.log, gpu-results.md, gpu.json and pytest-gpu.log. The benchmark also
# writes docs/gpu-results.md and bench/results/gpu.json in the checkout, to be committed.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-bench/results/gpu-check}
PYTHON=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-580}
TESTS_S=${TESTS_S:-150}
SITE=${GPU_SITE:-}
if [ -z "$SITE" ] && [ -d .gpu-site ]; then SITE=.gpu-site; fi
# the checkout itself (it need not be installed), then the extra packages
export PYTHONPATH="$PWD${SITE:+:$(cd "$SITE" && pwd)}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# torch.compile's and Triton's caches in a folder of the run, not the system temp folder or $HOME
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.gpu-check-cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.gpu-check-cache/triton}
start=$(date +%s)

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "bench/gpu_check.sh needs a CUDA GPU that $PYTHON's torch can see; this machine has none" >&2
  exit 2
fi
mkdir -p "$RESULTS"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv 2>&1 || true
  "$PYTHON" - <<'EOF'
import importlib.metadata as m, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0))
for name in ("transformers", "accelerate", "bitsandbytes", "torchao", "triton", "nvidia-ml-py"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
EOF
} > "$RESULTS/env.txt" 2>&1
cat "$RESULTS/env.txt"

budget=$(( TOTAL_S - TESTS_S - 20 - ($(date +%s) - start) ))
echo "== bench/gpu.py (budget ${budget} s)"
if [ "$budget" -lt 60 ]; then
  echo "no time left for bench/gpu.py (raise TOTAL_S or lower TESTS_S)" | tee "$RESULTS/gpu-bench.log"
  bench_rc=3
else
  "$PYTHON" bench/gpu.py --budget-s "$budget" 2>&1 | tee "$RESULTS/gpu-bench.log"
  bench_rc=${PIPESTATUS[0]}
fi
cp -f docs/gpu-results.md "$RESULTS/gpu-results.md" 2>/dev/null || true
cp -f bench/results/gpu.json "$RESULTS/gpu.json" 2>/dev/null || true

left=$(( TOTAL_S - ($(date +%s) - start) - 10 ))
if [ "$left" -gt "$TESTS_S" ]; then left=$TESTS_S; fi
echo "== pytest -m gpu (at most ${left} s)"
if [ "$left" -lt 30 ]; then
  echo "no time left for pytest -m gpu (raise TOTAL_S)" | tee "$RESULTS/pytest-gpu.log"
  tests_rc=3
else
  timeout -s INT -k 20 "$left" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -o addopts="--durations=15" \
    -rfEs tests 2>&1 | tee "$RESULTS/pytest-gpu.log"
  tests_rc=${PIPESTATUS[0]}
fi
echo "bench/gpu.py: exit $bench_rc; pytest -m gpu: exit $tests_rc; $(( $(date +%s) - start )) s in all"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
