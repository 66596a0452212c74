#!/usr/bin/env bash
# One short GPU check: the gpu-marked tests (fused epilogue, DALI, nvJPEG, ...), then the benchmark at the
# H100 recipe sizes: eager steps with the fused epilogue on and off, compiled steps, DALI vs the uint8 path vs
# nvJPEG at 1/8/14 workers and Trainer.fit on JPEGs vs in-memory tensors, the deferred NaN check, detection (C4)
# and the R50-FPN step vs torchvision's fasterrcnn_resnet50_fpn as its COCO weights build it (section fpn).
# Writes to ${OUT:-gpu_results}/ (gpu.txt, tests.log, benchmark.log, benchmark.json). The default
# timeouts (100 s tests + 460 s benchmark) fit one 600 s device call; extra arguments go to the
# benchmark, e.g. --sections steps,data,lightning --compile-variants "ours (folded),detectron2 FrozenBN".
set -uo pipefail
out="${OUT:-gpu_results}"
mkdir -p "$out"
py="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
nproc | sed 's/^/cpu cores: /' | tee -a "$out/gpu.txt"
"$py" -c "import torch, torchvision, lightning; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightning', lightning.__version__)" | tee -a "$out/gpu.txt"
timeout "${TEST_TIMEOUT:-100}" "$py" -m pytest tests/data/test_folder.py tests/test_norm.py tests/test_fold.py tests/test_epilogue.py tests/data/test_dali.py tests/test_benchmark.py tests/test_module.py \
  -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/tests.log"
timeout "${BENCH_TIMEOUT:-460}" "$py" scripts/benchmark.py --device cuda --output "$out/benchmark.json" "$@" 2>&1 \
  | grep --line-buffered -v -E "Warning|warn\(|^\s*$|litlogger|available:|LeafSpec|stopped: .max_steps" | tee "$out/benchmark.log"
