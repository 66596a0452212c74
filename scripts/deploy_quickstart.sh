#!/usr/bin/env bash
# Both quickstarts trained, exported from the command line (checked on the spot), predicted with from the
# checkpoint and from the ONNX file, and the two prediction files compared (COCO mAP of both for the detector).
# Run from the folder the quickstarts write into (data/, runs/, exported/); offline, CPU, about 8 minutes on 2 cores.
#   bash scripts/deploy_quickstart.sh            # the result: scripts/benchmark_results/deploy-quickstart-*.md
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
C="$HERE/configs"
PY="${PYTHON:-python}"
t() { local s; s=$(date +%s.%N); "$@"; echo "[$(echo "$(date +%s.%N) - $s" | bc) s] ${*#"$HERE/"}"; }
quiet=(--trainer.enable_progress_bar false)
t lightning-frozenbn fit --config "$C/quickstart.yaml" "${quiet[@]}"
t lightning-frozenbn-detect fit --config "$C/detection_quickstart.yaml" "${quiet[@]}"
cls=(--config "$C/quickstart.yaml" "${quiet[@]}")
det=(--config "$C/detection_quickstart.yaml" "${quiet[@]}")
t lightning-frozenbn export "${cls[@]}" --ckpt_path runs/quickstart/checkpoints/last.ckpt --output exported/classifier
t lightning-frozenbn predict "${cls[@]}" --ckpt_path runs/quickstart/checkpoints/last.ckpt --prediction_writer.output eager.csv
t lightning-frozenbn predict "${cls[@]}" --exported exported/classifier/model.onnx --prediction_writer.output onnx.csv
t lightning-frozenbn-detect export "${det[@]}" --ckpt_path runs/detection_quickstart/checkpoints/last.ckpt --output exported/detector
t lightning-frozenbn-detect predict "${det[@]}" --ckpt_path runs/detection_quickstart/checkpoints/last.ckpt --prediction_writer.output eager.json
t lightning-frozenbn-detect predict "${det[@]}" --exported exported/detector/model.onnx --prediction_writer.output onnx.json
"$PY" "$HERE/scripts/compare_predictions.py" eager.csv onnx.csv
"$PY" "$HERE/scripts/compare_predictions.py" eager.json onnx.json --truth data/digits_detection/val.json
