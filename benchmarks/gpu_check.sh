#!/usr/bin/env bash
# The GPU checks of issue 15 in one go (about 5 of the 8 minutes it may take on one H200; docs/gpu.md):
#   1. the tests marked `gpu` (tests/test_devices.py), on CUDA;
#   2. benchmarks/bench_gpu.py at the full Pangu-Weather configuration: forward and training-step time
#      per sample and peak memory (fp32/bf16, with/without activation checkpointing) and a K = 8
#      posterior ensemble step (one batched pass vs K serial passes), as a table.
# From the repository root on a machine whose python3 has a CUDA torch:
#     bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
# Packages the machine lacks come from .whl/ when present (benchmarks/gpu_wheels.sh packs them; carry
# .whl along), installed into a scratch directory, never into the machine's environment.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
site=/tmp/bdlens-gpu-site
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
  cp -r .whl/site/. "$site/"
  export PYTHONPATH="$site"
fi
# CUBLAS_WORKSPACE_CONFIG: deterministic cuBLAS, for the exact-resume test on the GPU.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
start=$SECONDS
timeout 200 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_devices.py 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
echo "gpu tests: exit $tests after $((SECONDS - start)) s"
start=$SECONDS
timeout 280 "$py" benchmarks/bench_gpu.py --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.txt"
bench=${PIPESTATUS[0]}
echo "bench_gpu: exit $bench after $((SECONDS - start)) s"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
