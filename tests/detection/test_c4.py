"""FrozenBNDetector: torchvision's Faster R-CNN pipeline exactly, fold exact, the guard sees it, research overrides."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, python, quiet_trainer, randomize_bn, tiny_detection_args
from pycocotools.coco import COCO
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from lightning_frozenbn import FrozenBNDetector, FrozenModuleGuard, find_frozen_modules, fold_frozen_batchnorm
from lightning_frozenbn.cli import DetectionCLI
from lightning_frozenbn.data.coco import collate_detection

SMALL = dict(
    arch="resnet18",
    min_size=64,
    max_size=96,
    anchor_sizes=[16, 32],
    aspect_ratios=[1.0, 2.0],
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=20,
    box_batch_size_per_image=16,
    roi_output_size=6,
)


def scenes(n: int = 2, size: int = 64, seed: int = 0):
    """Random images with 0, 3 or 6 random boxes (one image without any): many regions near the boxes."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, size, size + 8 * i), generator=g, dtype=torch.uint8) for i in range(n)]
    targets = []
    for i in range(n):
        k = (0, 3, 6)[i % 3]
        xy = torch.rand(k, 2, generator=g) * (size / 2)
        wh = torch.rand(k, 2, generator=g) * (size / 3) + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 4, (k,), generator=g)})
    return images, targets


def by_hand(det: FrozenBNDetector) -> FasterRCNN:
    """torchvision's FasterRCNN from copies of the same parts, with the same settings."""
    hp = det.hparams
    return FasterRCNN(
        copy.deepcopy(det.backbone),
        num_classes=None,
        min_size=hp.min_size,
        max_size=hp.max_size,
        image_mean=list(hp.image_mean),
        image_std=list(hp.image_std),
        rpn_anchor_generator=AnchorGenerator((tuple(hp.anchor_sizes),), (tuple(hp.aspect_ratios),)),
        rpn_head=copy.deepcopy(det.rpn.head),
        rpn_pre_nms_top_n_train=hp.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=hp.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=hp.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=hp.rpn_post_nms_top_n_test,
        box_roi_pool=MultiScaleRoIAlign(["0"], hp.roi_output_size, hp.roi_sampling_ratio),
        box_head=copy.deepcopy(det.head),
        box_predictor=copy.deepcopy(det.roi_heads.box_predictor),
        box_batch_size_per_image=hp.box_batch_size_per_image,
    )


def _float_images(images):
    return [img.double() / 255 for img in images]


def test_fold_false_is_torchvision_faster_rcnn_float64():
    det = randomize_bn(FrozenBNDetector(3, fold=False, freeze_at=1, **SMALL)).double()
    ref = by_hand(det).double()
    images, targets = scenes(3)
    targets64 = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets]
    det.train(), ref.train()
    torch.manual_seed(1)
    ours = det(_float_images(images), copy.deepcopy(targets64))
    torch.manual_seed(1)
    theirs = ref(_float_images(images), copy.deepcopy(targets64))
    assert set(ours) == set(theirs) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-12, atol=1e-12, msg=key)
    assert all(v > 0 for v in ours.values())  # every loss is exercised, none trivially zero
    det.eval(), ref.eval()
    with torch.no_grad():
        mine, tv = det(_float_images(images)), ref(_float_images(images))
    for a, b in zip(mine, tv):
        assert len(a["boxes"]) > 0
        for key in ("boxes", "labels", "scores"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10)
    # uint8 input is read as x / 255, as the data module sends it
    with torch.no_grad():
        from_uint8 = det([img for img in images])
    torch.testing.assert_close(from_uint8[0]["boxes"], mine[0]["boxes"])


def test_fold_true_gives_the_same_losses_and_gradients_float64():
    plain = randomize_bn(FrozenBNDetector(3, fold=False, freeze_at=2, **SMALL)).double()
    folded = copy.deepcopy(plain)
    fold_frozen_batchnorm(folded.backbone), fold_frozen_batchnorm(folded.head)
    assert any("Folded" in type(m).__name__ for m in folded.head.modules()), "the per-region layer4 must be folded"
    images, targets = scenes(3, seed=2)
    targets = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets]
    results = []
    for model in (plain, folded):
        model.train()
        torch.manual_seed(3)
        losses = model(_float_images(images), copy.deepcopy(targets))
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (l0, g0), (l1, g1) = results
    for key in l0:
        torch.testing.assert_close(l0[key], l1[key], rtol=1e-9, atol=1e-10)
    assert set(g0) == set(g1) and any(n.startswith("head.layer4") for n in g0)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-7, atol=1e-9, msg=name)


def test_head_pool_max_max_pools_the_regions():
    det = FrozenBNDetector(2, head_pool="max", **SMALL).eval()
    regions = torch.randn(5, 256, 6, 6)
    torch.testing.assert_close(
        det.forward_box_features(regions), det.head.layer4(regions).amax(dim=(2, 3)), rtol=1e-6, atol=1e-6
    )


def readme_reid_detector():
    """The research example of docs/detection.md, executed as written there."""
    text = (ROOT / "docs" / "detection.md").read_text()
    start = text.index("class ReIDDetector(FrozenBNDetector):")
    block = text[text.rindex("```python", 0, start) + len("```python") : text.index("```", start)]
    namespace: dict = {}
    exec(compile(block, "docs/detection.md", "exec"), namespace)
    return namespace["ReIDDetector"]


def test_reid_subclass_trains_its_embedding_and_the_guard_watches_the_frozen_parts(tmp_path):
    images, targets = scenes(4, seed=4)
    for i, t in enumerate(targets):
        t["identity"] = torch.arange(len(t["boxes"])) + i
    batch = [(img, t) for img, t in zip(images, targets)]
    loader = torch.utils.data.DataLoader(batch, batch_size=2, collate_fn=collate_detection)
    model = readme_reid_detector()(3, num_identities=8, **SMALL)
    lut0 = model.lut.detach().clone()
    logged = {}

    class Record(__import__("lightning").pytorch.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    guard = FrozenModuleGuard()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[guard, Record()], limit_val_batches=0)
    trainer.fit(model, loader)
    assert {"train/loss_reid", "train/loss_classifier", "train/loss_objectness", "train/loss"} <= set(logged)
    assert not torch.equal(model.lut.detach(), lut0)  # the re-id loss reached its parameters
    frozen = find_frozen_modules(model)
    assert any(n.startswith("head.layer4") for n in frozen) and any(n.startswith("backbone.layer1") for n in frozen)
    assert guard._epochs_verified == 1  # it compared every frozen tensor at the epoch's end


def test_map_counts_each_image_once_when_ddp_padding_repeats_it():
    """DistributedSampler pads evaluation with repeats of the first images; the detector's mAP drops them."""
    from torchmetrics.detection import MeanAveragePrecision

    from lightning_frozenbn.metrics import OncePerImageMAP as _OncePerImageMAP

    def image(i, boxes, scores):
        gt = {"boxes": torch.tensor([[10.0, 10, 30, 30]]), "labels": torch.tensor([1]), "image_id": torch.tensor(i)}
        return {
            "boxes": torch.tensor(boxes),
            "scores": torch.tensor(scores),
            "labels": torch.ones(len(scores), dtype=torch.long),
        }, gt

    images = [
        image(1, [[10.0, 10, 30, 30]], [0.6]),  # found, low score
        image(2, [[50.0, 50, 60, 60], [10, 10, 30, 30]], [0.9, 0.7]),  # a confident false positive, then found
        image(3, [[40.0, 40, 45, 45]], [0.8]),  # missed
    ]
    padded = images + images[:1]  # what rank 1 gets when 4 slots hold 3 images
    results = {}
    for name, metric_class, data in [
        ("ours", _OncePerImageMAP, padded),
        ("plain", MeanAveragePrecision, padded),
        ("truth", MeanAveragePrecision, images),
    ]:
        metric = metric_class(box_format="xyxy", iou_type="bbox")
        for pred, gt in data:
            metric.update([pred], [{k: v for k, v in gt.items() if name == "ours" or k != "image_id"}])
        results[name] = float(metric.compute()["map_50"])
    assert results["ours"] == results["truth"] != results["plain"], results
    metric = _OncePerImageMAP(box_format="xyxy", iou_type="bbox")
    for pred, gt in padded:
        metric.update([pred], [gt])
    assert int(metric.compute()["images"]) == 3


# ---- the `lightning-frozenbn-detect` command, real processes ---------------------------------------------
DETECT = Path(sys.executable).parent / "lightning-frozenbn-detect"


def detect(*args, cwd, timeout=300, wait=True):
    command = [python(), str(DETECT), *args]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_detect_ddp_two_processes_fit_then_predict_one_coco_results_file(tmp_path):
    # score threshold 0: a 1-epoch model from random init scores every region below torchvision's 0.05
    ddp = [
        "--config",
        str(ROOT / "configs" / "ddp.yaml"),
        "--trainer.devices=2",
        "--model.init_args.box_score_thresh=0.0",
        "--data.init_args.num_val=5",  # odd: the sampler pads rank 1 with a repeat of the first image
    ]
    fit = detect("fit", *tiny_detection_args(tmp_path, "run", *ddp, "--trainer.max_epochs=1"), cwd=tmp_path)
    out = fit.stdout + fit.stderr
    assert fit.returncode == 0, out[-3000:]
    assert "bit-identical at epoch 0 on all 2 ranks" in out
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    metrics = next((tmp_path / "run").rglob("metrics.csv")).read_text()
    assert "val/map_50" in metrics and "train/loss_objectness" in metrics and "val/map_small" in metrics
    # the 2-rank validation mAP is the mAP of the same checkpoint on the 5 images in one process
    ddp_map = [r for r in csv.DictReader(io.StringIO(metrics)) if r.get("val/map")][-1]
    single = DetectionCLI(args=tiny_detection_args(tmp_path, "single", *ddp[3:]), run=False)
    one = single.trainer.validate(single.model, datamodule=single.datamodule, ckpt_path=str(last), verbose=False)[0]
    assert float(ddp_map["val/images"]) == one["val/images"] == 5  # the repeat rank 1 evaluated is not counted
    for key in ("val/map", "val/map_50", "val/mar_100"):
        assert float(ddp_map[key]) == pytest.approx(one[key], abs=1e-6), (key, ddp_map[key], one[key])
    results = tmp_path / "detections.json"
    args = tiny_detection_args(tmp_path, "run", *ddp)
    pred = detect("predict", *args, "--ckpt_path", str(last), "--prediction_writer.output", str(results), cwd=tmp_path)
    assert pred.returncode == 0, (pred.stdout + pred.stderr)[-3000:]
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(tmp_path / "dd" / "val.json"))
        loaded = truth.loadRes(str(results))  # COCO's own tools accept the file
    assert loaded.getImgIds()
    rows = json.loads(results.read_text())
    assert {r["image_id"] for r in rows} <= set(truth.getImgIds()) and {r["category_id"] for r in rows} <= set(
        range(1, 11)
    )
    per_image = {}
    for r in rows:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= 100  # the 4 images split over 2 ranks, none written twice
    # new images on 2 ranks: one file, every image once, in path order (5 files: rank 1 gets a repeat)
    new = tmp_path / "new"
    new.mkdir()
    for png in sorted((tmp_path / "dd" / "val").glob("*.png")):
        shutil.copy(png, new / png.name)
    unlabelled = [
        "--data.class_path=lightning_frozenbn.CocoDetectionDataModule",
        f"--data.init_args.predict_root={new}",
        "--data.init_args.num_workers=0",
        "--config",
        str(ROOT / "configs" / "ddp.yaml"),
        "--trainer.devices=2",
        f"--trainer.default_root_dir={tmp_path / 'new_run'}",
        "--trainer.enable_progress_bar=false",
    ]
    output = tmp_path / "new.json"
    pred = detect(
        "predict", *unlabelled, "--ckpt_path", str(last), f"--prediction_writer.output={output}", cwd=tmp_path
    )
    assert pred.returncode == 0, (pred.stdout + pred.stderr)[-3000:]
    new_rows = json.loads(output.read_text())
    assert list(dict.fromkeys(r["file"] for r in new_rows)) == [str(p) for p in sorted(new.glob("*.png"))]
    assert len(new_rows) == len(rows)  # the same detections as on the annotated split, named by file now


@pytest.mark.slow
def test_detect_kill_9_then_resume_last_keeps_frozen_tensors_and_the_guard_count(tmp_path):
    args = tiny_detection_args(tmp_path, "run", "--trainer.max_epochs=3", "--model.init_args.calibrate_bn=0")
    proc = detect("fit", *args, cwd=tmp_path, wait=False)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 240
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert last.exists(), "no checkpoint before the process ended"
        time.sleep(1.0)  # into epoch 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    killed_at = torch.load(last, weights_only=True)["epoch"]
    assert killed_at < 2, "the run finished before it was killed"
    first = torch.load(last, weights_only=True)["state_dict"]
    resumed = detect("fit", *args, "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {last} (saved at epoch {killed_at}" in resumed.stdout + resumed.stderr
    final = torch.load(last, weights_only=True)
    assert final["epoch"] == 2
    frozen = [
        k for k in first if k.startswith(("backbone.conv1", "backbone.layer1")) or "running_" in k or "_scale" in k
    ]
    assert len(frozen) > 20
    for key in frozen:  # frozen tensors went through kill and resume bit for bit
        assert torch.equal(first[key], final["state_dict"][key]), key
    guard = next(v for k, v in final["callbacks"].items() if k.startswith("FrozenModuleGuard"))
    assert guard["epochs_verified"] == 3


def test_a_checkpoint_of_the_other_kind_is_refused_with_the_fix(tmp_path, capsys, monkeypatch):
    from lightning_frozenbn import FrozenBNClassifier
    from lightning_frozenbn.checkpoint import CheckpointError
    from lightning_frozenbn.cli import detect_main

    trainer = quiet_trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    model = FrozenBNClassifier(num_classes=10, arch="resnet18")
    trainer.fit(model, torch.utils.data.DataLoader([(torch.randn(3, 32, 32), 1)] * 2, batch_size=2))
    ckpt = tmp_path / "classifier.ckpt"
    trainer.save_checkpoint(ckpt)  # a plain Trainer's: no class path recorded, told by its layers
    # the detect command (what the user types), in this process
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        detect_main(["validate", *tiny_detection_args(tmp_path), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "checkpoint of FrozenBNClassifier, not of FrozenBNDetector" in err and "`lightning-frozenbn` for it" in err
    assert "model.init_args.weights" in err and "Traceback" not in err
    # the module's own hook says the same to a plain Trainer, and the classifier refuses a detector's
    with pytest.raises(CheckpointError, match="checkpoint of FrozenBNClassifier, not of FrozenBNDetector"):
        FrozenBNDetector.load_from_checkpoint(ckpt, num_classes=10, **SMALL)
    det = FrozenBNDetector(10, weights=str(ckpt), **SMALL)  # as weights it starts a detector: backbone+head load
    torch.testing.assert_close(det.backbone.layer2[0].conv1.weight, model.backbone.layer2[0].conv1.weight)
    import lightning

    saved = {"state_dict": det.state_dict(), "hyper_parameters": {"num_classes": 10}}
    torch.save({**saved, "pytorch-lightning_version": lightning.__version__}, tmp_path / "det.ckpt")
    with pytest.raises(
        CheckpointError, match="checkpoint of FrozenBNDetector, not of FrozenBNClassifier.*`lightning-frozenbn-detect`"
    ):
        FrozenBNClassifier.load_from_checkpoint(tmp_path / "det.ckpt")


def test_run_settings_given_to_a_checkpoint_command_beat_the_checkpoints(tiny_fit):
    """LightningCLI rebuilds the model from the checkpoint's hyperparameters; a test-time threshold the
    command gives is used instead, a setting it does not give comes from the checkpoint, and what the
    model is built of (the RoIAlign size) always comes from the checkpoint."""
    folder, ckpt = tiny_fit
    args = ["--ckpt_path", str(ckpt), "--model.init_args.box_score_thresh=0.6", "--trainer.limit_val_batches=1"]
    cli = DetectionCLI(
        args=["validate", *tiny_detection_args(folder, "validate"), *args]
    )  # the config says roi_output_size 4
    model = cli.model
    assert model.roi_heads.score_thresh == 0.6 and model.hparams.box_score_thresh == 0.6  # the command's
    assert model.roi_heads.nms_thresh == 0.3  # the checkpoint's: the command did not set it
    assert model.hparams.roi_output_size == 6  # the checkpoint's architecture


def test_predict_on_new_images_names_each_file_with_the_checkpoints_categories(tiny_fit, capsys):
    """No annotation file at predict time: the categories come from the checkpoint, rows name the files (in
    path order, hidden files skipped), and each file's detections are what the model finds on that file."""
    from lightning_frozenbn.data.decode import decode_file

    folder, ckpt = tiny_fit
    new = folder / "new_images"
    (new / "b").mkdir(parents=True)
    (new / ".ipynb_checkpoints").mkdir()
    val = sorted((folder / "dd" / "val").glob("*.png"))
    shutil.copy(val[0], new / "z.png")
    shutil.copy(val[1], new / "b" / "a.png")
    shutil.copy(val[2], new / "b" / "c.png")
    shutil.copy(val[3], new / ".ipynb_checkpoints" / "z.png")
    output = folder / "new.json"
    args = [
        "predict",
        "--data.class_path=lightning_frozenbn.CocoDetectionDataModule",
        f"--data.init_args.predict_root={new}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        f"--trainer.default_root_dir={folder / 'predict'}",
        "--trainer.enable_progress_bar=false",
        f"--prediction_writer.output={output}",
        f"--ckpt_path={ckpt}",
    ]
    capsys.readouterr()
    DetectionCLI(args=[*args, "--model.init_args.box_score_thresh=1.0"])  # nothing scores above 1
    assert (
        json.loads(output.read_text()) == []
        and "No region scored above box_score_thresh=1.0" in capsys.readouterr().out
    )
    DetectionCLI(args=[*args, "--model.init_args.box_score_thresh=0.0"])  # a 1-epoch model scores below 0.05
    rows = json.loads(output.read_text())
    files = [str(new / "b" / "a.png"), str(new / "b" / "c.png"), str(new / "z.png")]
    assert list(dict.fromkeys(r["file"] for r in rows)) == files
    assert all(r["category"] == str(r["category_id"] - 1) for r in rows)  # the digits set: "0".."9" are ids 1..10
    model = FrozenBNDetector.load_from_checkpoint(ckpt, box_score_thresh=0.0).eval()
    with torch.no_grad():
        expected = [
            d for batch in (files[:2], files[2:]) for d in model([decode_file(f) for f in batch])
        ]  # its batches
    for file, det in zip(files, expected):
        got = [r for r in rows if r["file"] == file]
        assert len(got) == len(det["scores"]) > 0
        for row, box, score, label in zip(got, det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            x0, y0, x1, y1 = box
            assert row["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)
            assert row["score"] == pytest.approx(score, abs=1e-5) and row["category_id"] == label  # ids 1..10


def test_an_image_too_thin_for_max_size_is_detected_on_not_an_error():
    """5000x10 at max_size 256: torchvision's resize would make it 0 px high and fail the whole batch."""
    det = FrozenBNDetector(num_classes=3, arch="resnet18", min_size=64, max_size=256, box_score_thresh=0.0).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 10, 5000), generator=g, dtype=torch.uint8), scenes(1)[0][0]]
    with torch.no_grad():
        thin, normal = det(images)
    assert len(thin["boxes"]) and (thin["boxes"][:, [1, 3]] <= 10).all() and (thin["boxes"][:, [0, 2]] <= 5000).all()
    assert len(thin["scores"]) == len(thin["labels"]) == len(thin["boxes"])
    assert len(normal["boxes"]) and (normal["boxes"] <= 64).all()  # the batch's other image still detected on


def test_the_readme_reid_example_trains_on_the_digits_canvases_and_names_a_too_small_table(tmp_path):
    """The quickstart's data: identities are source digits (up to 1796), so the table needs 1797 rows."""
    from lightning_frozenbn import DigitsDetectionDataModule

    dm = DigitsDetectionDataModule(
        tmp_path / "dd", canvas_size=64, digit_size=(16, 24), num_train=8, num_val=2, batch_size=4, num_workers=0
    )
    dm.extra_keys = ["identity"]
    cls = readme_reid_detector()
    small = {**SMALL, "anchor_sizes": [16, 24], "box_score_thresh": 0.0}
    model = cls(10, num_identities=1797, **small)
    lut0 = model.lut.detach().clone()
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, datamodule=dm)
    assert not torch.equal(model.lut.detach(), lut0)
    with pytest.raises(ValueError, match=r"identity \d+ >= num_identities=8: set model.init_args.num_identities"):
        quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(cls(10, num_identities=8, **small), datamodule=dm)


def test_a_resumed_detector_fit_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    """Region sampling draws from torch's generator: without per-step seeds the resumed run's draws (and
    from then on its losses and weights) differ from the uninterrupted run's."""
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_frozenbn import DigitsDetectionDataModule

    class StopAfterFirstEpoch(__import__("lightning").pytorch.Callback):  # the same run, killed after epoch 0
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    def run(name, epochs, ckpt_path=None, stop=False):
        seed_everything(0)
        dm = DigitsDetectionDataModule(
            tmp_path / "dd", canvas_size=64, digit_size=(16, 24), num_train=8, num_val=2, batch_size=4, num_workers=0
        )
        model = FrozenBNDetector(10, **{**SMALL, "calibrate_bn": 1, "anchor_sizes": [16, 24]})
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        callbacks = [ckpt, StopAfterFirstEpoch()] if stop else [ckpt]
        trainer = quiet_trainer(tmp_path, max_epochs=epochs, callbacks=callbacks, enable_checkpointing=True)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.state_dict()

    whole = run("whole", 3)
    run("first", 3, stop=True)
    resumed = run("resumed", 3, ckpt_path=tmp_path / "first" / "last.ckpt")
    changed = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not changed, changed[:5]


def test_a_subclass_replaces_one_part_without_copying_the_constructor(tmp_path):
    from torchvision.ops import MultiScaleRoIAlign

    class MaxPooledRegions(FrozenBNDetector):
        def build_roi_pool(self):
            return MultiScaleRoIAlign(["0"], 3, sampling_ratio=1)  # a coarser pooler, nothing else changed

        def build_rpn(self):
            rpn = super().build_rpn()
            rpn.nms_thresh = 0.6
            return rpn

    det = MaxPooledRegions(3, **SMALL)
    assert det.roi_heads.box_roi_pool.output_size == (3, 3) and det.rpn.nms_thresh == 0.6
    assert det.roi_heads.box_predictor.cls_score.out_features == 4  # the other parts as the base builds them
    plain = FrozenBNDetector(3, **SMALL)
    assert det.state_dict().keys() == plain.state_dict().keys()  # same checkpoint layout
    images, targets = scenes(2)
    losses = det.train()(images, targets)
    assert torch.isfinite(torch.stack(list(losses.values()))).all()
