"""The offline digits sets: written once, atomically, never over a user's files; real, tight, seeded."""

import contextlib
import io
from pathlib import Path

import pytest
import torch
from helpers import make_tree
from pycocotools.coco import COCO

from lightning_frozenbn import DataError, DigitsDataModule, DigitsDetectionDataModule


def test_digits_are_written_once_as_a_stratified_png_tree(tmp_path):
    dm = DigitsDataModule(root=tmp_path / "digits", num_workers=0)
    dm.prepare_data()
    files = sorted((tmp_path / "digits").rglob("*.png"))
    assert len(files) == 1797
    train = list((tmp_path / "digits" / "train").rglob("*.png"))
    val = list((tmp_path / "digits" / "val").rglob("*.png"))
    assert abs(len(val) / 1797 - 0.2) < 0.01 and len(train) + len(val) == 1797
    assert dm.classes == [str(d) for d in range(10)] and dm.num_classes == 10
    stamp = files[0].stat().st_mtime_ns
    DigitsDataModule(root=tmp_path / "digits").prepare_data()
    assert files[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and y.dtype == torch.int64


def test_an_incomplete_tree_of_a_killed_writer_is_replaced(tmp_path):
    root = tmp_path / "digits"
    (root / "train" / "3").mkdir(parents=True)
    (root / "train" / "3" / "half.png").write_bytes(b"\x89PNG half")  # killed mid-write: no .complete marker
    DigitsDataModule(root=root).prepare_data()
    assert (root / ".complete").is_file() and len(list(root.rglob("*.png"))) == 1797
    assert not (root / "train" / "3" / "half.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # the leftover moved aside and deleted


@pytest.mark.parametrize("when", ["while-writing", "right-after-our-check", "at-the-rename"])
def test_digits_written_concurrently_keep_the_first_complete_tree(tmp_path, monkeypatch, when):
    """Two nodes on a shared filesystem: the one that finishes second must not delete the first's tree."""
    import os

    import lightning_frozenbn.data.digits as data

    root, raced = tmp_path / "digits", []

    def other_node_finishes(original):
        def wrapper(*args, **kwargs):
            if not raced:
                raced.append(True)
                DigitsDataModule(root=root).prepare_data()  # completes while we are still busy
                (root / "in-use-by-the-other-node").write_text("reading")
            return original(*args, **kwargs)

        return wrapper

    if when == "while-writing":
        monkeypatch.setattr(data.Image, "fromarray", other_node_finishes(data.Image.fromarray))
    elif when == "right-after-our-check":  # our look at root/.complete said "not yet"; then it was published
        is_file = Path.is_file

        def stale_answer(path):
            if path == root / ".complete" and not raced and any(tmp_path.glob(".digits-*")):
                other_node_finishes(lambda: None)()
                return False
            return is_file(path)

        monkeypatch.setattr(Path, "is_file", stale_answer)
    else:
        monkeypatch.setattr(data.os, "replace", other_node_finishes(os.replace))
    DigitsDataModule(root=root).prepare_data()
    assert raced and (root / "in-use-by-the-other-node").is_file() and (root / ".complete").is_file()
    assert len(list(root.rglob("*.png"))) == 1797
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".digits-")]  # no leftover copy


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_digits_root_that_holds_something_else_is_refused_and_kept(tmp_path, kind):
    root = tmp_path / "mine"
    if kind == "file":
        root.write_text("my notes")
    else:
        make_tree(root, classes=("cat", "dog"))  # the user's own image folders, given as root by mistake
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match=rf"Cannot write the sklearn load_digits set to '.*mine': it is a {kind}"):
        DigitsDataModule(root=root).prepare_data()
    after = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    assert after == before  # nothing renamed aside, nothing deleted, no temporary copy left


def test_digits_detection_set_is_real_tight_seeded_and_split_by_source(tmp_path):
    dm = DigitsDetectionDataModule(root=tmp_path / "d", canvas_size=64, digit_size=(16, 24), num_train=12, num_val=6)
    dm.prepare_data()
    again = DigitsDetectionDataModule(root=tmp_path / "e", canvas_size=64, digit_size=(16, 24), num_train=12, num_val=6)
    again.prepare_data()
    assert (tmp_path / "d" / "train.json").read_text() == (tmp_path / "e" / "train.json").read_text()
    with contextlib.redirect_stdout(io.StringIO()):
        train, val = COCO(str(tmp_path / "d" / "train.json")), COCO(str(tmp_path / "d" / "val.json"))
    assert len(train.getImgIds()) == 12 and len(val.getImgIds()) == 6 and len(train.getCatIds()) == 10
    identities = [{a["identity"] for a in c.dataset["annotations"]} for c in (train, val)]
    assert identities[0] and identities[1] and not identities[0] & identities[1]  # no val digit is trained on
    dm.setup("fit")
    for index in range(12):
        image, target = dm.datasets["train"][index]
        ink = image[0] > 32
        assert 1 <= len(target["boxes"]) <= 3
        inside = torch.zeros_like(ink)
        for x0, y0, x1, y1 in target["boxes"].int().tolist():
            inside[y0:y1, x0:x1] = True
            # tight: ink touches every edge of the box
            assert (
                ink[y0, x0:x1].any() and ink[y1 - 1, x0:x1].any() and ink[y0:y1, x0].any() and ink[y0:y1, x1 - 1].any()
            )
        assert not (ink & ~inside).any()  # no ink outside the boxes
