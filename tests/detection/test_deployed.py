"""The detectors exported: the same detections as eager at image sizes the export never saw, frozen BN folded."""

from __future__ import annotations

import collections
import json
import shutil

import pytest
import torch
from helpers import randomize_bn, tiny_detection_args

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install 'lightning_frozenbn[export]'")
pytest.importorskip("onnxruntime")

from lightning_frozenbn import FrozenBNDetector, FrozenBNFPNDetector  # noqa: E402
from lightning_frozenbn.cli import detect_main  # noqa: E402
from lightning_frozenbn.detection.deployed import DeployedDetector, match_detections  # noqa: E402
from lightning_frozenbn.export import (  # noqa: E402
    ExportError,
    ExportMismatch,
    check_detector_onnx,
    deployable,
    export_detector_onnx,
    read_metadata,
)

SMALL = {
    "arch": "resnet18",
    "weights": None,
    "min_size": 64,
    "max_size": 128,
    "rpn_pre_nms_top_n_test": 60,
    "rpn_post_nms_top_n_test": 20,
    "box_score_thresh": 0.0,
}


def _detector(cls, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(cls(num_classes=3, **SMALL), seed=seed).eval()


def _scaled_by_frozen_bn(path) -> int:
    """Mul nodes reading a Conv's output: the separate scale an unfolded frozen BN leaves after its conv."""
    graph = onnx.load(str(path)).graph
    conv_outputs = {out for node in graph.node if node.op_type == "Conv" for out in node.output}
    return sum(node.op_type == "Mul" and bool(conv_outputs & set(node.input)) for node in graph.node)


@pytest.mark.parametrize("cls", [FrozenBNDetector, FrozenBNFPNDetector], ids=["c4", "fpn"])
def test_the_onnx_detector_finds_what_eager_finds_at_image_sizes_it_was_not_traced_at(tmp_path, cls):
    model = _detector(cls)
    path = export_detector_onnx(DeployedDetector(deployable(model)), torch.rand(3, 70, 90), tmp_path / "d.onnx", {})
    g = torch.Generator().manual_seed(1)
    images = [
        torch.rand(3, 70, 90, generator=g),
        torch.rand(3, 50, 120, generator=g),
        torch.rand(3, 96, 64, generator=g),
    ]
    diffs = check_detector_onnx(path, model, images, score_thresh=0.0)  # every detection the model outputs
    assert max(diffs) < 1e-3
    with torch.no_grad():
        assert all(len(d["scores"]) > 5 for d in model(images))  # so the comparison compared something
    ops = collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert "BatchNormalization" not in ops and _scaled_by_frozen_bn(path) == 0, ops
    # resnet18's 20 convolutions (layer4 as C4's box head or in the FPN trunk) and the RPN head's 3: once on
    # C4; on FPN's 5 maps (unrolled in the graph) with FPN's 4 inner and 4 output convolutions
    assert ops["Conv"] == (23 if cls is FrozenBNDetector else 20 + 8 + 3 * 5)


def test_an_unfolded_frozen_bn_would_be_seen_in_the_graph(tmp_path):
    """The structural count above can fail: the same detector exported without the fold has the scales."""
    model = _detector(FrozenBNDetector)
    unfolded = DeployedDetector(model)  # not through deployable: FrozenBatchNorm2d stays x * scale + shift
    path = export_detector_onnx(unfolded, torch.rand(3, 64, 64), tmp_path / "u.onnx", {})
    assert _scaled_by_frozen_bn(path) > 0


def test_the_check_catches_an_exported_detector_that_computes_something_else(tmp_path):
    model, other = _detector(FrozenBNDetector, seed=0), _detector(FrozenBNDetector, seed=0)
    with torch.no_grad():
        other.backbone.bn1.running_var.mul_(1.01)  # one statistic 1% off, as a bad fold would leave it
    path = export_detector_onnx(DeployedDetector(deployable(other)), torch.rand(3, 64, 64), tmp_path / "d.onnx", {})
    with pytest.raises(ExportMismatch, match=r"ONNX detections on a \(3, 64, 80\) image differ from the eager model"):
        check_detector_onnx(path, model, [torch.rand(3, 64, 80)], score_thresh=0.0)


def test_an_opset_the_detector_cannot_be_exported_at_is_one_line_and_writes_nothing(tmp_path):
    deploy = DeployedDetector(deployable(_detector(FrozenBNDetector)))
    with pytest.raises(ExportError, match=r"failed at opset 9: .* Detectors export at --opset 11 to 20 \(default 17\)"):
        export_detector_onnx(deploy, torch.rand(3, 64, 64), tmp_path / "d.onnx", {}, opset=9)
    assert not list(tmp_path.iterdir())


def _dets(boxes, labels, scores):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels),
        "scores": torch.tensor(scores),
    }


def test_detections_match_above_the_threshold_in_any_order_and_differences_are_named():
    eager = _dets([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 3, 3]], [1, 2, 1], [0.9, 0.8, 0.01])
    same = _dets([[5, 5, 20, 20], [0, 0, 10, 10.001]], [2, 1], [0.8, 0.9])  # other order, nothing below 0.05
    assert match_detections(same, eager, 0.05, 1e-3, 1e-5) == pytest.approx((0.001, 0.0), abs=1e-6)
    moved = _dets([[5, 5, 20, 20], [0, 0, 10, 11]], [2, 1], [0.8, 0.9])
    assert "boxes differ by up to 1" in match_detections(moved, eager, 0.05, 1e-3, 1e-5)
    relabelled = _dets([[5, 5, 20, 20], [0, 0, 10, 10]], [2, 2], [0.8, 0.9])
    assert "labels [2, 2] differ from the eager model's [1, 2]" in match_detections(relabelled, eager, 0.05, 1e-3, 1e-5)
    missing = _dets([[0, 0, 10, 10]], [1], [0.9])
    assert "1 detections scoring >= 0.05, the eager model has 2" in match_detections(missing, eager, 0.05, 1e-3, 1e-5)
    # a score on the threshold, within the tolerance, may fall on either side of it: left out of both
    fence = _dets([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 3, 3]], [1, 2, 1], [0.9, 0.8, 0.05])
    assert match_detections(same, fence, 0.05, 1e-3, 1e-5) == pytest.approx((0.001, 0.0), abs=1e-6)


@pytest.mark.slow
def test_a_detector_exported_by_the_command_predicts_the_eager_coco_results_and_map(tiny_fit, capsys):
    """`lightning-frozenbn-detect export` then `predict --exported`: the same COCO results file as the eager
    predict from the checkpoint, row for row within the file's rounding (so the same COCO mAP: a 1-epoch
    model's is 0 here, so the mAP itself is compared on the quickstart's model, docs/deployment.md)."""
    folder, ckpt = tiny_fit
    low = "--model.init_args.box_score_thresh=0.0"  # a 1-epoch model scores below 0.05: keep every detection
    detect_main(
        ["export", *tiny_detection_args(folder, "x"), "--ckpt_path", str(ckpt), "--output", str(folder / "x"), low]
    )
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"{folder / 'x' / 'model.onnx'}: onnx, every frozen BN folded; same detections as eager on")
    assert "(3, 64, 64) and (3, 64, 64) and (3, 64, 96)" in line  # two validation canvases, one 1.5x as wide
    metadata = read_metadata(folder / "x" / "model.onnx")
    assert metadata["task"] == "detection" and metadata["category_ids"] == list(range(1, 11))
    eager, exported = folder / "eager.json", folder / "exported.json"
    detect_main(
        [
            "predict",
            *tiny_detection_args(folder, "pe"),
            "--ckpt_path",
            str(ckpt),
            low,
            f"--prediction_writer.output={eager}",
        ]
    )
    detect_main(["predict", *tiny_detection_args(folder, "px"), "--exported", str(folder / "x" / "model.onnx"),
                 f"--prediction_writer.output={exported}"])  # fmt: skip
    key = lambda r: (r["image_id"], r["category_id"], -r["score"])  # noqa: E731
    rows, onnx_rows = sorted(json.loads(eager.read_text()), key=key), sorted(json.loads(exported.read_text()), key=key)
    assert len(rows) == len(onnx_rows) > 100 and {r["image_id"] for r in rows} == {1, 2, 3, 4}
    for row, got in zip(rows, onnx_rows):
        assert (got["image_id"], got["category_id"]) == (row["image_id"], row["category_id"])
        assert got["bbox"] == pytest.approx(row["bbox"], abs=0.011) and got["score"] == pytest.approx(
            row["score"], abs=2e-5
        )


@pytest.mark.slow
def test_predict_on_new_images_from_the_exported_file_names_its_categories(tiny_fit, tmp_path):
    """No annotation file, no checkpoint: the category names and ids come from the file's metadata."""
    folder, ckpt = tiny_fit
    onnx_file = tmp_path / "x" / "model.onnx"
    detect_main(["export", *tiny_detection_args(folder, "x2"), "--ckpt_path", str(ckpt), "--output", str(tmp_path / "x"),
                 "--model.init_args.box_score_thresh=0.0", "--check=false"])  # fmt: skip
    new = tmp_path / "new"
    new.mkdir()
    for i, png in enumerate(sorted((folder / "dd" / "val").glob("*.png"))[:2]):
        shutil.copy(png, new / f"{i}.png")
    output = tmp_path / "new.json"
    detect_main([
        "predict", "--data.class_path=lightning_frozenbn.CocoDetectionDataModule", f"--data.init_args.predict_root={new}",
        "--data.init_args.num_workers=0", f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.enable_progress_bar=false", f"--prediction_writer.output={output}", f"--exported={onnx_file}",
    ])  # fmt: skip
    rows = json.loads(output.read_text())
    assert {r["file"] for r in rows} == {str(new / "0.png"), str(new / "1.png")}
    assert all(r["category"] == str(r["category_id"] - 1) for r in rows)  # the digits: "0".."9" are ids 1..10
