"""COCO-format data for the detector: label mapping, crowd and empty images, clipping, bad input, results files."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lightning_frozenbn import CocoDetectionDataModule, CocoResultsWriter, DataError


def write_coco(tmp_path, annotations=None, images=None, categories=None, name="train"):
    """A small COCO export: 3 images (one without boxes), non-contiguous category ids 3, 7, 11."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    images = (
        images
        if images is not None
        else [
            {"id": 10, "file_name": "a.png", "width": 48, "height": 40},
            {"id": 20, "file_name": "b.png", "width": 40, "height": 48},
            {"id": 30, "file_name": "empty.png", "width": 32, "height": 32},
        ]
    )
    for img in images:
        if not (folder / img["file_name"]).exists():
            Image.new("RGB", (img["width"], img["height"]), (40, 80, 120)).save(folder / img["file_name"])
    categories = (
        categories
        if categories is not None
        else [
            {"id": 11, "name": "kite"},
            {"id": 3, "name": "car"},
            {"id": 7, "name": "train"},
        ]
    )
    annotations = (
        annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 12], "iscrowd": 0, "identity": 5},
            {"id": 2, "image_id": 10, "category_id": 11, "bbox": [20, 10, 8, 8], "iscrowd": 1, "identity": 6},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [40, 30, 20, 20], "iscrowd": 0, "identity": 7},
            {"id": 4, "image_id": 20, "category_id": 3, "bbox": [0, 0, 40, 48], "iscrowd": 0},
        ]
    )
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return folder, path


def module(tmp_path, **kwargs):
    train = write_coco(tmp_path, name="train")
    val = write_coco(tmp_path, name="val")
    return CocoDetectionDataModule(*train, *val, num_workers=0, hflip=False, **kwargs)


def test_labels_names_crowd_empty_images_clipping_and_extra_keys(tmp_path, monkeypatch):
    dm = module(tmp_path, extra_keys=["identity"])
    import pycocotools.coco

    def read_again(*args, **kwargs):
        raise AssertionError("pycocotools read an annotation file the data module had parsed already")

    monkeypatch.setattr(pycocotools.coco.json, "load", read_again)  # each JSON is parsed once, by our checker
    assert dm.num_classes == 3 and dm.classes == ["car", "train", "kite"] and dm.category_ids == [3, 7, 11]
    with pytest.warns(UserWarning, match=r"1 box\(es\) .* clipped .*annotation ids 3"):
        dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    image, target = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 48)
    # the crowd box (id 2) is left out of training; the box sticking out (id 3) is clipped to 48x40
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 15], [40, 30, 48, 40]]))
    assert target["labels"].tolist() == [2, 1] and target["identity"].tolist() == [5, 7]
    assert int(target["image_id"]) == 10
    # evaluation keeps it, flagged for COCO's crowd rule
    _, target = val[0]
    assert target["labels"].tolist() == [2, 3, 1] and target["iscrowd"].tolist() == [0, 1, 0]
    # an image without annotations is background, not dropped
    image, target = train[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].dtype == torch.int64 and image.shape == (3, 32, 32)
    assert target["identity"].shape == (0,)
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and len(images) == 2 and isinstance(targets[0], dict)


def test_hflip_moves_the_boxes_with_the_pixels(tmp_path):
    train, val = write_coco(tmp_path, name="train"), write_coco(tmp_path, name="val")
    flipped = CocoDetectionDataModule(*train, *val, num_workers=0, hflip=True)
    flipped.setup("fit")
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        image, target = flipped.datasets["train"][1]  # 40 px wide, box [0, 0, 40, 48] spans it
        image, target = flipped.datasets["train"][0]
        seen.add(tuple(target["boxes"][0].tolist()))
    assert seen == {(2.0, 3.0, 12.0, 15.0), (36.0, 3.0, 46.0, 15.0)}  # x -> 48 - x


@pytest.mark.parametrize(
    "edit, match",
    [
        ("missing_json", r"train annotations .*nope\.json' do not exist.*COCO-format JSON"),
        ("malformed_json", r"are not valid JSON: .*line 1 column"),
        ("not_coco", r"not COCO detection annotations: no list 'annotations'"),
        ("missing_image", r"1 image\(s\) listed in .* are missing from .*: b\.png \(image id 20\)"),
        (
            "unknown_category",
            r"annotation id 4 of 'b\.png' .* category_id 99.*not among the categories \(\[3, 7, 11\]\)",
        ),
        ("zero_area", r"annotation id 4 of 'b\.png' .*zero or negative size: bbox \[5, 5, 0, 10\]"),
        ("outside", r"annotation id 4 of 'b\.png' .*entirely outside its 40x48 image"),
        ("empty", r"list no images: the split is empty"),
        ("unknown_image", r"annotation id 4 \(image id 99\) .*not listed in 'images'"),
    ],
)
def test_bad_annotations_are_named_with_the_fix(tmp_path, edit, match):
    folder, path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    if edit == "missing_json":
        path = tmp_path / "nope.json"
    elif edit == "malformed_json":
        path.write_text('{"images": [')
    elif edit == "not_coco":
        path.write_text(json.dumps({"images": data["images"]}))
    elif edit == "missing_image":
        (folder / "b.png").unlink()
    elif edit == "empty":
        path.write_text(json.dumps({**data, "images": [], "annotations": []}))
    else:
        ann = data["annotations"][3]
        ann.update(
            {
                "unknown_category": {"category_id": 99},
                "zero_area": {"bbox": [5, 5, 0, 10]},
                "outside": {"bbox": [50, 60, 10, 10]},
                "unknown_image": {"image_id": 99},
            }[edit]
        )
        path.write_text(json.dumps(data))
    before = path.read_bytes() if path.exists() else None
    val = write_coco(tmp_path, name="val")
    dm = CocoDetectionDataModule(folder, path, *val, num_workers=0)
    with pytest.raises(DataError, match=match):
        dm.setup("fit")
    assert (path.read_bytes() if path.exists() else None) == before  # nothing written over


def test_val_categories_must_match_training(tmp_path):
    train = write_coco(tmp_path, name="train")
    val = write_coco(
        tmp_path,
        name="val",
        categories=[{"id": 3, "name": "car"}, {"id": 7, "name": "bus"}, {"id": 11, "name": "kite"}],
    )
    with pytest.raises(DataError, match=r"val categories .* differ from the model.s categories"):
        CocoDetectionDataModule(*train, *val, num_workers=0).setup("fit")


class _GroundTruthAsDetections(__import__("lightning").pytorch.LightningModule):
    """Predicts the ground truth: the results file must then score mAP 1.0 with pycocotools."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def predict_step(self, batch, batch_idx):
        images, targets = batch
        return [
            {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "scores": torch.full((len(t["labels"]),), 0.9),
                "image_id": int(t["image_id"]),
            }
            for t in targets
        ]


def test_results_file_maps_back_to_coco_ids_and_xywh(tmp_path):
    from helpers import quiet_trainer

    train = write_coco(tmp_path, name="train")
    # only non-crowd boxes inside the image: their detections must match exactly
    anns = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 12], "iscrowd": 0, "area": 120},
        {"id": 3, "image_id": 10, "category_id": 11, "bbox": [20, 10, 20, 20], "iscrowd": 0, "area": 400},
        {"id": 4, "image_id": 20, "category_id": 3, "bbox": [1, 2, 30, 40], "iscrowd": 0, "area": 1200},
    ]
    val = write_coco(tmp_path, name="val", annotations=anns)
    dm = CocoDetectionDataModule(*train, *val, num_workers=0)
    out = tmp_path / "det.json"
    trainer = quiet_trainer(tmp_path, callbacks=[CocoResultsWriter(out)])
    trainer.predict(_GroundTruthAsDetections(), datamodule=dm, return_predictions=False)
    results = json.loads(out.read_text())
    assert {(r["image_id"], r["category_id"]) for r in results} == {(10, 7), (10, 11), (20, 3)}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(val[1]))
        evaluator = COCOeval(gt, gt.loadRes(str(out)), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_predict_root_needs_no_annotations_when_the_categories_are_given(tmp_path):
    new = tmp_path / "new"
    (new / "b").mkdir(parents=True)
    (new / ".ipynb_checkpoints").mkdir()
    for path in (new / "z.png", new / "b" / "a.jpg", new / ".ipynb_checkpoints" / "z.png"):
        Image.new("RGB", (40, 30), (10, 20, 30)).save(path)
    (new / "notes.txt").write_text("not an image")
    categories = [{"id": 7, "name": "train"}, {"id": 3, "name": "car"}]  # as the CLI gives them from a checkpoint
    dm = CocoDetectionDataModule(predict_root=new, categories=categories, num_workers=0)
    dm.setup("predict")
    assert dm.num_classes == 2 and dm.category_ids == [3, 7] and dm.classes == ["car", "train"]
    images, targets = next(iter(dm.predict_dataloader()))
    assert dm.datasets["predict"].files == [str(new / "b" / "a.jpg"), str(new / "z.png")]  # sorted, no hidden
    assert images[0].dtype == torch.uint8 and images[0].shape == (3, 30, 40) and targets == [{}, {}]
    with pytest.raises(DataError, match="categories are unknown.*--ckpt_path"):
        CocoDetectionDataModule(predict_root=new, num_workers=0).setup("predict")
    with pytest.raises(DataError, match=r"categories=\[\{'id': 'x'\}\] is invalid"):
        CocoDetectionDataModule(predict_root=new, categories=[{"id": "x"}])
    with pytest.raises(DataError, match="does not exist"):
        CocoDetectionDataModule(predict_root=tmp_path / "nope", categories=categories).setup("predict")
    with pytest.raises(DataError, match="No train split: set `data.init_args.train_images`"):
        CocoDetectionDataModule(predict_root=new, categories=categories).setup("fit")
    # a checkpoint's label set is checked against training annotations too (a resume on other data)
    train = write_coco(tmp_path, name="train")
    with pytest.raises(DataError, match=r"train categories .* differ from the model.s categories"):
        CocoDetectionDataModule(*train, categories=categories, num_workers=0).setup("fit")


# ---- COCO files as labelling tools write them -----------------------------------------------------------
def test_missing_iscrowd_and_area_are_read_as_pycocotools_reads_them(tmp_path):
    anns = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 12]},  # no iscrowd, no area
        {"id": 2, "image_id": 10, "category_id": 11, "bbox": [20, 10, 8, 8], "iscrowd": 1, "area": 50.0},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [30, 20, 6, 6]},
        {"id": 4, "image_id": 20, "category_id": 3, "bbox": [0, 0, 40, 48]},
    ]
    train, val = write_coco(tmp_path, anns, name="train"), write_coco(tmp_path, anns, name="val")
    dm = CocoDetectionDataModule(*train, *val, num_workers=0, hflip=False)
    dm.setup("fit")
    _, target = dm.datasets["train"][0]  # the crowd box (id 2, in the middle) is left out, not a neighbour
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 15], [30, 20, 36, 26]]))
    _, target = dm.datasets["val"][0]  # each flag and area stays with its own box
    assert target["iscrowd"].tolist() == [0, 1, 0] and target["area"].tolist() == [120.0, 50.0, 36.0]
    assert dm.datasets["val"][1][1]["iscrowd"].tolist() == [0]


class _Detects(__import__("lightning_frozenbn").FrozenBNDetector):
    """The detector's validation path with given detections in place of its network's."""

    detections: dict = {}

    def forward(self, images, targets=None):
        return [self.detections[i] for i in range(len(images))]


def test_map_by_object_size_uses_the_files_area_as_cocoeval_does(tmp_path):
    import numpy as np

    images = [{"id": 10, "file_name": "a.png", "width": 160, "height": 160}]
    images.append({"id": 20, "file_name": "b.png", "width": 160, "height": 160})
    # polygon areas (what the file says) put these objects in other size classes than their boxes would
    anns = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [10, 10, 40, 40], "area": 900.0, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [55, 55, 100, 100], "area": 6000.0, "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 110, 30, 30], "area": 700.0, "iscrowd": 0},
        {"id": 4, "image_id": 20, "category_id": 11, "bbox": [20, 20, 50, 50], "area": 2000.0, "iscrowd": 0},
        {"id": 5, "image_id": 20, "category_id": 3, "bbox": [80, 80, 70, 70], "area": 800.0, "iscrowd": 0},
    ]
    train, val = write_coco(tmp_path, anns, images, name="train"), write_coco(tmp_path, anns, images, name="val")
    dm = CocoDetectionDataModule(*train, *val, num_workers=0, batch_size=2)
    dm.setup("fit")
    g = torch.Generator().manual_seed(0)
    batch = next(iter(dm.val_dataloader()))
    detections = {}
    for i, t in enumerate(batch[1]):  # each true box jittered, plus a false positive, random scores
        boxes = torch.cat(
            [t["boxes"] + torch.randn(t["boxes"].shape, generator=g) * 6, torch.tensor([[5.0, 5, 60, 60]])]
        )
        labels = torch.cat([t["labels"], torch.tensor([1])])
        detections[i] = {"boxes": boxes, "labels": labels, "scores": torch.rand(len(labels), generator=g)}
    _Detects.detections = detections
    model = _Detects(num_classes=3, arch="resnet18")
    model.validation_step(batch, 0)
    ours = model.val_map.compute()
    results = [
        {
            "image_id": int(t["image_id"]),
            "category_id": dm.category_ids[int(label) - 1],
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "score": float(score),
        }
        for i, t in enumerate(batch[1])
        for (x0, y0, x1, y1), label, score in zip(
            detections[i]["boxes"], detections[i]["labels"], detections[i]["scores"]
        )
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(val[1]))
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    theirs = dict(zip(["map", "map_50", "map_75", "map_small", "map_medium", "map_large"], evaluator.stats[:6]))
    assert len({round(v, 3) for v in theirs.values()}) > 3  # a non-trivial case
    for key, value in theirs.items():
        assert float(ours[key]) == pytest.approx(value if value >= 0 else -1, abs=1e-6), (key, float(ours[key]), value)
    assert np.isfinite(evaluator.stats[3])


def test_string_image_ids_are_mapped_to_integers_and_the_originals_kept(tmp_path):
    images = [
        {"id": "IMG_0001", "file_name": "a.png", "width": 48, "height": 40},
        {"id": "IMG_0002", "file_name": "b.png", "width": 40, "height": 48},
    ]
    anns = [
        {"id": 1, "image_id": "IMG_0002", "category_id": 3, "bbox": [1, 2, 10, 10]},
        {"id": 2, "image_id": "IMG_0001", "category_id": 7, "bbox": [2, 3, 10, 12]},
    ]
    train, val = write_coco(tmp_path, anns, images, name="train"), write_coco(tmp_path, anns, images, name="val")
    dm = CocoDetectionDataModule(*train, *val, num_workers=0, hflip=False)
    dm.setup("fit")
    _, target = dm.datasets["val"][1]
    assert int(target["image_id"]) == 2 and target["labels"].tolist() == [1]  # IMG_0002: its own box
    assert dm._annotations["val"]["images"][1]["original_id"] == "IMG_0002"
    images, targets = next(iter(dm.train_dataloader()))  # batches collate (was: "too many dimensions 'str'")
    assert sorted(int(t["image_id"]) for t in targets) == [1, 2]


@pytest.mark.parametrize(
    "edit, match",
    [
        ("no_file_name", r"image id 20 in .*train\.json' has no 'file_name'"),
        ("a_list", r"not COCO detection annotations: the file holds a JSON list \(3 entries\)"),
        ("size_on_disk", r"'b\.png' is 40x48 on disk, but .* says 20x24.*EXIF"),
    ],
)
def test_malformed_exports_get_one_line_naming_the_problem(tmp_path, edit, match):
    folder, path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    if edit == "no_file_name":
        del data["images"][1]["file_name"]
    elif edit == "a_list":
        data = data["annotations"][:3]
    else:  # the JSON's size is half the real one: box 4 (the whole 40x48 image) lies "outside" the JSON's
        data["images"][1].update(width=20, height=24)
        data["annotations"][3]["bbox"] = [22, 26, 10, 10]
    path.write_text(json.dumps(data))
    dm = CocoDetectionDataModule(folder, path, *write_coco(tmp_path, name="val"), num_workers=0)
    with pytest.raises(DataError, match=match):
        dm.setup("fit")


def test_an_image_whose_size_or_bytes_are_wrong_is_named_when_read(tmp_path):
    folder, path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    data["images"][1].update(width=48, height=40)  # b.png is 40x48: boxes still inside the listed size
    path.write_text(json.dumps(data))
    dm = CocoDetectionDataModule(folder, path, *write_coco(tmp_path, name="val"), num_workers=0)
    dm.setup("fit")
    with pytest.raises(DataError, match=r"b\.png' is 40x48 on disk, but its annotations say 48x40 \(image id 20\)"):
        dm.datasets["train"][1]
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"Cannot read image '.*a\.png' \(image id 10\).*Delete or replace"):
        dm.datasets["train"][0]
