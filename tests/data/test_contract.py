"""A data module of a user's own (a CSV of files: neither folders nor COCO) implementing the contract, end to end.

Optimized into chunks by ``lightning-frozenbn-optimize``, trained from those chunks by ``lightning-frozenbn fit``,
and predicted with through ``lightning-frozenbn predict``, where the class names come from the checkpoint's
record because the machine has no training CSV.
"""

import csv
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from torch.utils.data import DataLoader, Dataset

pytest.importorskip(
    "litdata", reason="the streaming extra is not installed: pip install 'lightning_frozenbn[streaming]'"
)

from lightning_frozenbn import DataError, LabelledDataModule  # noqa: E402
from lightning_frozenbn.cli import main  # noqa: E402
from lightning_frozenbn.data.chunks import main as optimize_main  # noqa: E402
from lightning_frozenbn.data.chunks import read_manifest  # noqa: E402
from lightning_frozenbn.data.contract import ChunkEntry  # noqa: E402
from lightning_frozenbn.data.decode import decode_file  # noqa: E402
from lightning_frozenbn.data.location import Location  # noqa: E402

CLASSES = ["round", "square"]


class _Rows(Dataset):
    def __init__(self, rows: list[tuple[str, int]], size: int) -> None:
        self.rows, self.size = rows, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        image = decode_file(self.rows[index][0]).float().div(255)
        image = torch.nn.functional.interpolate(image[None], size=(self.size, self.size), mode="bilinear")[0]
        return image, self.rows[index][1]


class CsvImages(LabelledDataModule):
    """Images listed in ``<root>/<split>.csv`` (``file,class`` rows, files anywhere), classes in a fixed order.

    What a user writes: the contract's label set and chunk entries, plain loaders, nothing of ours inherited.
    """

    def __init__(
        self, root: str, class_names: list[str] | None = None, predict_root: str | None = None, size: int = 32
    ) -> None:
        super().__init__()
        self.root, self.class_names, self.size = Path(root), class_names, size
        self.predict_root = None if predict_root is None else Path(predict_root)
        self._predict: list[str] = []

    def _rows(self, split: str) -> list[tuple[str, int]]:
        path = self.root / f"{split}.csv"
        if not path.is_file():
            raise DataError(f"{path} does not exist: list the {split} images in it.")
        with path.open() as f:
            return [(row["file"], self.classes.index(row["class"])) for row in csv.DictReader(f)]

    @property
    def classes(self) -> list[str]:
        if self.class_names is not None:
            return list(self.class_names)
        with (self.root / "train.csv").open() as f:  # DataError-free on purpose: a user's module raises OSError
            return sorted({row["class"] for row in csv.DictReader(f)}, key=CLASSES.index)

    @property
    def source(self) -> str:
        return str(self.root)

    def chunk_splits(self) -> list[str]:
        return ["train", "val"]

    def chunk_entries(self, split: str) -> list[ChunkEntry]:
        return [ChunkEntry(file, Path(file).name, label) for file, label in self._rows(split)]

    def prediction_names(self) -> list[str]:
        return [Path(f).name for f in self._predict]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Rows(self._rows("train"), self.size), batch_size=4, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Rows(self._rows("val"), self.size), batch_size=4)

    def predict_dataloader(self) -> DataLoader:
        self._predict = sorted(str(p) for p in self.predict_root.glob("*.png"))
        return DataLoader(_Rows([(f, -1) for f in self._predict], self.size), batch_size=4)


def _shapes(folder: Path, n: int, seed: int) -> list[tuple[str, str]]:
    """Grey squares and discs on noise, 48 px PNGs in one flat folder: the class is in the pixels only."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        name = CLASSES[i % 2]
        noise = (torch.rand(48, 48, 3, generator=g) * 60).to(torch.uint8).numpy()
        image = Image.fromarray(noise)
        draw = ImageDraw.Draw(image)
        box = [8, 8, 40, 40]
        (draw.ellipse if name == "round" else draw.rectangle)(box, fill=(220, 220, 220))
        path = folder / f"{seed}-{i:03d}.png"
        image.save(path)
        rows.append((str(path), name))
    return rows


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "class"])
        writer.writerows(rows)


@pytest.mark.slow
def test_a_users_own_data_module_is_optimized_streamed_trained_checkpointed_and_predicted_with(tmp_path, capsys):
    data = tmp_path / "csv"
    data.mkdir()
    _write_csv(data / "train.csv", _shapes(tmp_path / "pool", 24, seed=0))
    _write_csv(data / "val.csv", _shapes(tmp_path / "pool", 8, seed=1))
    config = tmp_path / "own.yaml"
    config.write_text(f"data:\n  class_path: test_contract.CsvImages\n  init_args:\n    root: {data}\n")

    # 1. the chunk writer reads the contract: label set, entries (each header checked), the task
    optimize_main(["--config", str(config), "--output_dir", str(tmp_path / "chunks"), "--num_workers", "1"])
    manifest = read_manifest(Location(str(tmp_path / "chunks")))
    assert manifest["task"] == "classification" and manifest["classes"] == CLASSES
    assert manifest["splits"] == {"train": 24, "val": 8}

    # 2. trained from those chunks by the streaming module, through the CLI
    run = tmp_path / "run"
    main([
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--config", str(ROOT / "configs" / "streaming.yaml"),
        "--data.init_args.root", str(tmp_path / "chunks"),
        "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "0",
        "--model.init_args.calibrate_bn", "0",
        "--trainer.default_root_dir", str(run),
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert checkpoint["class_names"] == CLASSES  # the record, from the manifest written from the user's module

    # 3. predicted with the user's module on a machine without the training CSV: names from the checkpoint
    (data / "train.csv").unlink()
    _shapes(tmp_path / "new", 5, seed=2)
    out = tmp_path / "predictions.csv"
    capsys.readouterr()
    main([
        "predict", "--config", str(config),
        "--data.init_args.predict_root", str(tmp_path / "new"),
        "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
        "--prediction_writer.output", str(out),
        "--trainer.default_root_dir", str(tmp_path / "predict"),
        "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [f"2-{i:03d}.png" for i in range(5)]  # the module's names, in order
    assert {r["predicted_class"] for r in rows} <= set(CLASSES) and all(0 < float(r["probability"]) <= 1 for r in rows)


def test_a_data_module_outside_the_contract_is_refused_by_the_chunk_writer_naming_the_contract(tmp_path):
    import lightning.pytorch as pl

    from lightning_frozenbn.data.chunks import optimize_data

    class Plain(pl.LightningDataModule):
        pass

    with pytest.raises(DataError, match=r"Plain cannot be optimized: expected a LabelledDataModule .*docs/data.md"):
        optimize_data(Plain(), str(tmp_path / "chunks"))
    assert not (tmp_path / "chunks").exists()  # nothing written


def test_the_contracts_defaults_say_what_is_missing_instead_of_guessing(tmp_path):
    class NamesOnly(LabelledDataModule):
        @property
        def classes(self):
            return ["a", "b"]

    data = NamesOnly()
    assert data.num_classes == 2 and data.category_ids is None and data.prediction_names() is None
    with pytest.raises(
        DataError, match=r"NamesOnly cannot be optimized into chunks: .*LabelledDataModule.chunk_splits"
    ):
        data.chunk_splits()
    with pytest.raises(TypeError, match="abstract"):
        LabelledDataModule()
