import pytest
import torch
from PIL import Image

from lightning_frozenbn import DataError, DigitsDataModule, ImageFolderDataModule


def make_tree(root, splits=("train", "val"), classes=("cat", "dog"), n=3, size=40):
    for split in splits:
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (size, size), (i * 40, 100, 200)).save(folder / f"{i}.png")
    return root


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


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    root = make_tree(tmp_path)
    Image.new("L", (40, 40), 128).save(root / "train" / "cat" / "gray.png")
    Image.new("RGBA", (40, 40), (1, 2, 3, 4)).save(root / "train" / "dog" / "rgba.png")
    dm = ImageFolderDataModule(root, image_size=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    for i in range(len(dm.datasets["train"])):
        assert dm.datasets["train"][i][0].shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda r: r / "nowhere", "Data root '.*nowhere' does not exist"),
        (lambda r: (__import__("shutil").rmtree(r / "val"), r)[1], "Split folder '.*val' is missing"),
        (lambda r: ([__import__("shutil").rmtree(d) for d in (r / "train").iterdir()], r)[1], "has no class folders"),
        (
            lambda r: ([f.unlink() for f in (r / "train" / "dog").iterdir()], r)[1],
            "Class folder '.*dog' holds no images",
        ),
        (lambda r: (__import__("shutil").rmtree(r / "val" / "dog"), r)[1], r"only in train: \['dog'\]"),
    ],
    ids=["missing-root", "missing-split", "no-classes", "empty-class", "class-missing-in-val"],
)
def test_layout_errors_are_clear(tmp_path, damage, match):
    root = damage(make_tree(tmp_path / "data"))
    dm = ImageFolderDataModule(root, image_size=32, num_workers=0)
    with pytest.raises(DataError, match=match):
        dm.setup("fit")


def test_an_undecodable_image_is_named(tmp_path):
    root = make_tree(tmp_path)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG but not really")
    dm = ImageFolderDataModule(root, image_size=32, batch_size=64, num_workers=0)
    dm.setup("fit")
    with pytest.raises(DataError, match=r"Cannot decode image '.*broken.png'"):
        next(iter(dm.train_dataloader()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size=0 is invalid"),
        ({"batch_size": 0}, "batch_size=0 is invalid"),
        ({"min_scale": 1.5}, "min_scale=1.5 is invalid"),
    ],
)
def test_bad_data_arguments(tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        ImageFolderDataModule(tmp_path, **kwargs)
