#!/usr/bin/env bash
# One short GPU check: the gpu-marked tests, then the benchmark at the H100 recipe sizes.
# Writes to ${OUT:-gpu_results}/ (tests.log, benchmark.log, benchmark.json). The default timeouts
# (150 s tests + 420 s benchmark) fit one 600 s device call; extra arguments go to the benchmark
# (e.g. --no-compile to skip the compiled section).
set -uo pipefail
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, torchvision, lightning; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightning', lightning.__version__)" | tee -a "$out/gpu.txt"
timeout "${TEST_TIMEOUT:-150}" python -m pytest tests/test_norm.py tests/test_module.py tests/test_benchmark.py -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/tests.log"
timeout "${BENCH_TIMEOUT:-420}" python scripts/benchmark.py --device cuda --output "$out/benchmark.json" "$@" 2>&1 \
  | grep -v -E "Warning|warn\(|^\s*$|litlogger|available:" | tee "$out/benchmark.log"
