"""FrozenBNFPNDetector: torchvision's fasterrcnn_resnet50_fpn checkpoints load exactly (keys, eps), and it fine-tunes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ROOT
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn import FrozenBNFPNDetector, WeightsMismatchError
from lightning_frozenbn.detection import torchvision_weights

SIZES = dict(min_size=128, max_size=192)  # small resized images: the parity runs in float64 on the CPU


def torchvision_coco_v1_layout(trainable_layers: int = 3, seed: int = 0) -> FasterRCNN:
    """torchvision's fasterrcnn_resnet50_fpn as its COCO_V1 weights build it, random and non-trivial.

    ``fasterrcnn_resnet50_fpn(weights=COCO_V1)`` = resnet50 with FrozenBatchNorm2d, ``_resnet_fpn_extractor``
    with 3 trainable layers, ``FasterRCNN(num_classes=91)``, then every FrozenBatchNorm2d's eps set to 0.0
    (``overwrite_eps``). Here the same from torchvision's public builders, with random BN statistics whose
    variances reach 1e-6 (so eps 1e-5 instead of 0.0 would show) and sharper class scores.
    """
    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=trainable_layers
    )
    model = FasterRCNN(backbone, num_classes=91, box_score_thresh=0.0, **SIZES)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(10 ** (torch.rand(c, generator=g) * 6 - 6))  # 1e-6 .. 1
                m.weight.copy_((torch.rand(c, generator=g) + 0.5) * m.running_var.sqrt())  # keeps activations sane
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.eps = 0.0  # torchvision's overwrite_eps(model, 0.0) for COCO_V1
        model.roi_heads.box_predictor.cls_score.weight.mul_(20)
    return model


def images(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.rand(3, 96, 128, generator=g, dtype=torch.float64),
        torch.rand(3, 150, 110, generator=g, dtype=torch.float64),
    ]


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    model = torchvision_coco_v1_layout()
    path = tmp_path_factory.mktemp("tv") / "fasterrcnn_resnet50_fpn_coco_layout.pth"
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        expected = model.double().eval()(images())
    return path, expected, model


@pytest.mark.parametrize("fold", [False, True], ids=["fold-off", "fold-on"])
def test_a_torchvision_fpn_checkpoint_gives_torchvision_s_detections(torchvision_file, fold):
    path, expected, _ = torchvision_file
    ours = FrozenBNFPNDetector(num_classes=90, weights=str(path), fold=fold, box_score_thresh=0.0, **SIZES)
    assert ours.hparams.bn_eps == 0.0
    with torch.no_grad():
        got = ours.double().eval()(images())
    for theirs, mine in zip(expected, got):
        assert len(theirs["boxes"]) == len(mine["boxes"]) > 50  # non-trivial detections on each image
        torch.testing.assert_close(mine["boxes"], theirs["boxes"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mine["scores"], theirs["scores"], rtol=1e-6, atol=1e-9)
        assert torch.equal(mine["labels"], theirs["labels"])


def test_freeze_at_trains_what_trainable_backbone_layers_trains(torchvision_file):
    path, _, _ = torchvision_file
    for freeze_at in (0, 2, 3, 5):
        theirs = torchvision_coco_v1_layout(trainable_layers=5 - freeze_at)
        ours = FrozenBNFPNDetector(num_classes=90, weights=str(path), freeze_at=freeze_at, fold=False, **SIZES)
        trained = {k for k, p in theirs.named_parameters() if p.requires_grad}
        mapped = set(torchvision_weights.to_our_keys(dict.fromkeys(trained)))
        assert mapped == {k for k, p in ours.named_parameters() if p.requires_grad}, freeze_at


def test_another_class_count_replaces_only_the_box_predictor_saying_so(torchvision_file, caplog):
    import logging

    path, _, model = torchvision_file
    with caplog.at_level(logging.INFO):
        ours = FrozenBNFPNDetector(num_classes=3, weights=str(path), fold=False, **SIZES)
    assert "its box predictor is left out and a new one trains" in caplog.text
    assert ours.roi_heads.box_predictor.cls_score.out_features == 4
    theirs = torchvision_weights.to_our_keys(model.state_dict())
    mine = ours.state_dict()
    kept = [k for k in theirs if not k.startswith("roi_heads.box_predictor.")]
    assert kept and all(torch.equal(mine[k], theirs[k]) for k in kept)


def test_a_file_of_another_layout_names_its_keys(tmp_path):
    bad = torchvision_coco_v1_layout().state_dict()
    bad["backbone.fpn.extra.weight"] = torch.zeros(1)
    del bad["rpn.head.cls_logits.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError, match=r"missing: rpn.head.cls_logits.bias.*unexpected: fpn.extra.weight"):
        FrozenBNFPNDetector(num_classes=90, weights=str(tmp_path / "bad.pth"), **SIZES)
    with pytest.raises(ValueError, match=r"only torchvision's FasterRCNN_ResNet50_FPN_Weights"):
        FrozenBNFPNDetector(num_classes=90, weights="FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1", **SIZES)


def test_the_eps_a_checkpoint_was_loaded_with_survives_save_and_load(torchvision_file, tmp_path):
    from helpers import quiet_trainer

    path, expected, _ = torchvision_file
    ours = FrozenBNFPNDetector(num_classes=90, weights=str(path), box_score_thresh=0.0, **SIZES)
    trainer = quiet_trainer(tmp_path)
    trainer.strategy.connect(ours)
    trainer.save_checkpoint(tmp_path / "fpn.ckpt")
    again = FrozenBNFPNDetector.load_from_checkpoint(tmp_path / "fpn.ckpt", map_location="cpu")
    assert again.hparams.weights is None and again.hparams.bn_eps == 0.0
    assert {m.eps for m in again.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}
    with torch.no_grad():
        got = again.double().eval()(images())
    torch.testing.assert_close(got[0]["scores"], expected[0]["scores"], rtol=1e-6, atol=1e-9)


def _three_class_coco(root, split, n, seed):
    """Squares, discs-as-diamonds and bars on noise (3 categories, ids 1, 2, 5), 64 px, a COCO JSON."""
    from PIL import Image, ImageDraw

    folder = root / split
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "diamond"},
                                                          {"id": 5, "name": "bar"}]}  # fmt: skip
    for i in range(n):
        image = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 50).to(torch.uint8).numpy())
        draw = ImageDraw.Draw(image)
        cat = (1, 2, 5)[i % 3]
        x, y = (int(v) for v in torch.randint(4, 30, (2,), generator=g))
        box = [x, y, 24, 24] if cat != 5 else [x, y, 30, 10]
        if cat == 1:
            draw.rectangle([x, y, x + 24, y + 24], fill=(230, 230, 230))
        elif cat == 2:
            draw.polygon([(x + 12, y), (x + 24, y + 12), (x + 12, y + 24), (x, y + 12)], fill=(230, 230, 230))
        else:
            draw.rectangle([x, y, x + 30, y + 10], fill=(230, 230, 230))
        image.save(folder / f"{i}.png")
        coco["images"].append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64})
        coco["annotations"].append(
            {"id": i + 1, "image_id": i + 1, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        )
    (root / f"{split}.json").write_text(json.dumps(coco))
    return folder, root / f"{split}.json"


@pytest.mark.slow
def test_a_fine_tune_from_a_torchvision_file_with_three_classes_trains_from_the_cli_and_writes_coco_results(
    torchvision_file, tmp_path
):
    from pycocotools.coco import COCO

    from lightning_frozenbn.cli import detect_main

    path, _, _ = torchvision_file
    train, train_json = _three_class_coco(tmp_path, "train", 6, seed=0)
    val, val_json = _three_class_coco(tmp_path, "val", 3, seed=1)
    common = [
        "--config", str(ROOT / "configs" / "detection_fpn.yaml"),
        "--model.init_args.weights", str(path),
        "--model.init_args.min_size", "64", "--model.init_args.max_size", "96",
        "--model.init_args.box_batch_size_per_image", "16",
        "--data.init_args.train_images", str(train), "--data.init_args.train_annotations", str(train_json),
        "--data.init_args.val_images", str(val), "--data.init_args.val_annotations", str(val_json),
        "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    detect_main(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True, mmap=True)
    assert saved["category_ids"] == [1, 2, 5] and saved["hyper_parameters"]["bn_eps"] == 0.0
    assert saved["state_dict"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    out = tmp_path / "detections.json"
    detect_main(["predict", *common, "--ckpt_path", str(ckpt), "--prediction_writer.output", str(out),
                 "--model.init_args.box_score_thresh", "0.0"])  # fmt: skip
    results = json.loads(out.read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2, 5}
    gt = COCO(str(val_json))
    assert len(gt.loadRes(str(out)).getAnnIds()) == len(results)  # pycocotools reads the results file
