import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_script_runs_every_section_and_writes_json(tmp_path):
    """A smoke run at toy sizes: the script must not rot. Timings are not asserted (noisy machine)."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark.py"),
            "--arch",
            "resnet18",
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "1",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {r["variant"] for r in data["steps"]} == {
        "ours (folded)",
        "torchvision FrozenBN",
        "detectron2 FrozenBN",
        "mmdet norm_eval",
        "BatchNorm2d train",
    }
    saved = {(r["variant"], r["precision"]): r for r in data["saved"]}
    assert saved[("ours (folded)", "bf16")]["output_dtype"] == "torch.bfloat16"
    assert saved[("ours (folded)", "bf16")]["saved_mib"] < saved[("torchvision FrozenBN", "bf16")]["saved_mib"]
    assert data["lightning"]["ratio"] > 0 and data["lightning"]["check_finite_ratio"] > 0
    assert data["guard"]["guard_hook_s_per_epoch"] >= 0
    assert data["data"]["pipeline_img_per_s"] > 0
    # The profile covers the same network on both sides (resnet18: 20 convolutions per forward) and
    # shows folding's point: fewer elementwise multiply/add launches than detectron2's BN.
    ops = {r["op"]: r for r in data["profile"]["ops"]}
    assert ops["aten::convolution"]["ours_calls"] == ops["aten::convolution"]["peer_calls"] == 20
    elementwise = [ops.get(op, {"ours_calls": 0, "peer_calls": 0}) for op in ("aten::mul", "aten::add")]
    assert sum(r["ours_calls"] for r in elementwise) < sum(r["peer_calls"] for r in elementwise)
    assert data["profile"]["ours_total_ms"] > 0 and data["profile"]["peer_total_ms"] > 0
