"""Writing splits into litdata chunks: bytes untouched, manifest last, interrupted runs resumed, other folders refused."""

import json

import pytest
import torch
from helpers import python

pytest.importorskip(
    "litdata", reason="the streaming extra is not installed: pip install 'lightning_frozenbn[streaming]'"
)

from lightning_frozenbn import DataError, ImageFolderDataModule  # noqa: E402
from lightning_frozenbn.data.chunks import MANIFEST, PENDING, main, optimize_data, read_manifest  # noqa: E402
from lightning_frozenbn.data.location import Location  # noqa: E402


def jpeg_tree(root, splits=("train", "val"), classes=("a", "b", "c"), n=8, size=40, seed=0):
    """Class folders of noisy JPEGs (real compressed files, each different)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split in splits:
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (torch.rand(size, size + 8, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=85)
    return root


def stored_items(folder):
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(folder))
    return [dataset[i] for i in range(len(dataset))]


def test_optimize_keeps_the_files_bytes_and_writes_the_manifest_last(tmp_path):
    data = ImageFolderDataModule(jpeg_tree(tmp_path / "tree"), hflip=False, min_scale=0.5)
    manifest = optimize_data(data, str(tmp_path / "chunks"), num_workers=1)
    assert manifest["task"] == "classification" and manifest["classes"] == ["a", "b", "c"]
    assert manifest["splits"] == {"train": 24, "val": 24}
    assert manifest["augment"] == {"min_scale": 0.5, "hflip": False}
    assert json.loads((tmp_path / "chunks" / MANIFEST).read_text()) == manifest
    assert not (tmp_path / "chunks" / PENDING).exists()
    for split in ("train", "val"):
        samples = ImageFolderDataModule(tmp_path / "tree").open_split(split, train=False).samples
        items = stored_items(tmp_path / "chunks" / split)
        assert sorted(item["index"] for item in items) == list(range(len(samples)))
        for item in items:
            path, label = samples[item["index"]]
            assert item["image"] == open(path, "rb").read()  # not re-encoded
            assert item["label"] == label and path.endswith(item["name"])
    # the training split is written in a seeded random order: chunks of one class would give one-class batches
    order = [item["label"] for item in stored_items(tmp_path / "chunks" / "train")]
    assert order != sorted(order)
    val_order = [item["index"] for item in stored_items(tmp_path / "chunks" / "val")]
    assert val_order == sorted(val_order)


def test_rerun_is_a_no_op_and_other_folders_are_refused_untouched(tmp_path, capsys):
    tree = jpeg_tree(tmp_path / "tree", n=2)
    out = tmp_path / "chunks"
    optimize_data(ImageFolderDataModule(tree), str(out), num_workers=1)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    optimize_data(ImageFolderDataModule(tree), str(out), num_workers=1)
    assert "already complete" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    other = jpeg_tree(tmp_path / "other", classes=("x", "y"), n=2)
    with pytest.raises(DataError, match="already holds another chunked dataset"):
        optimize_data(ImageFolderDataModule(other), str(out), num_workers=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"exists and holds other files \(notes.txt\)"):
        optimize_data(ImageFolderDataModule(tree), str(foreign), num_workers=1)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_an_interrupted_write_is_refused_by_readers_and_resumed_by_a_rerun(tmp_path):
    tree = jpeg_tree(tmp_path / "tree", n=2)
    out = tmp_path / "chunks"
    optimize_data(ImageFolderDataModule(tree), str(out), num_workers=1)
    complete = json.loads((out / MANIFEST).read_text())
    # as a kill after the train split: the manifest not yet written, the pending record there
    (out / MANIFEST).unlink()
    (out / PENDING).write_text(json.dumps(complete))
    for folder in (out / "val",):
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    with pytest.raises(DataError, match="its writing was interrupted"):
        read_manifest(Location(str(out)))
    train_before = {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    assert optimize_data(ImageFolderDataModule(tree), str(out), num_workers=1) == complete
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()} == train_before  # not rewritten
    assert len(stored_items(out / "val")) == 6 and read_manifest(Location(str(out))) == complete


def test_a_folder_of_another_version_or_not_ours_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not written by `lightning-frozenbn-optimize`"):
        read_manifest(Location(str(tmp_path)))
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "lightning_frozenbn.data.chunks", "version": 99}))
    with pytest.raises(DataError, match="version 99; this package reads 'lightning_frozenbn.chunks' version 1"):
        read_manifest(Location(str(tmp_path)))


def test_the_command_takes_a_fit_config_and_reports_bad_input_in_one_line(tmp_path, capsys):
    tree = jpeg_tree(tmp_path / "tree", n=2)
    config = tmp_path / "fit.yaml"
    config.write_text(
        "seed_everything: 0\ntrainer: {max_epochs: 1}\nmodel: {init_args: {arch: resnet18}}\n"
        f"data:\n  class_path: lightning_frozenbn.ImageFolderDataModule\n  init_args: {{root: {tree}}}\n"
    )
    main(["--config", str(config), "--output_dir", str(tmp_path / "chunks"), "--num_workers", "1"])
    assert "classification, {'train': 6, 'val': 6}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--output_dir", str(tmp_path / "tree"), "--num_workers", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output_dir") and "holds other files (train, val)" in err[0]


PACED_WRITE = """
import os, sys, time
print(os.getpid(), flush=True)  # the writer's process, which its lock names
sys.path.insert(0, {tests!r})
import lightning_frozenbn.data.chunks as chunks
from lightning_frozenbn import ImageFolderDataModule

item = chunks._classification_item
chunks._classification_item = lambda entry: time.sleep(0.01) or item(entry)  # paced, so that it can be killed
chunks.optimize_data(ImageFolderDataModule({tree!r}), {out!r}, num_workers=1, chunk_bytes="8KB")
"""


@pytest.mark.parametrize("rerun_workers", [1, 2], ids=["same-settings-resumes", "other-settings-restarts"])
def test_a_write_killed_mid_split_is_completed_by_a_rerun_with_every_sample_once(tmp_path, rerun_workers, capsys):
    import signal
    import subprocess
    import time
    from pathlib import Path

    tree, out = jpeg_tree(tmp_path / "tree", n=40), tmp_path / "chunks"
    script = PACED_WRITE.format(tests=str(Path(__file__).parent), tree=str(tree), out=str(out))
    proc = subprocess.Popen([python(), "-c", script], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list((out / "train").glob("*.bin"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]  # killed mid-split, not finished
    assert (out / PENDING).exists() and not (out / MANIFEST).exists()
    first_chunk = (out / "train" / "chunk-0-0.bin").stat().st_mtime_ns
    manifest = optimize_data(ImageFolderDataModule(tree), str(out), num_workers=rerun_workers, chunk_bytes="8KB")
    assert manifest["splits"] == {"train": 120, "val": 120} and read_manifest(Location(str(out))) == manifest
    for split in ("train", "val"):
        assert sorted(item["index"] for item in stored_items(out / split)) == list(range(120))
    err = capsys.readouterr().err
    if rerun_workers == 1:  # resumed from litdata's checkpoints: the chunks written before the kill are kept
        assert "writing it again" not in err and (out / "train" / "chunk-0-0.bin").stat().st_mtime_ns == first_chunk
    else:
        assert "the interrupted write used other settings; writing it again" in err


def test_source_files_changed_after_the_write_are_refused_not_taken_for_complete(tmp_path):
    from PIL import Image

    tree, out = jpeg_tree(tmp_path / "tree", n=2), tmp_path / "chunks"
    optimize_data(ImageFolderDataModule(tree), str(out), num_workers=1)
    Image.new("RGB", (40, 48), (1, 2, 3)).save(tree / "val" / "b" / "1.jpg")  # same name, class and count
    with pytest.raises(DataError, match=r"its source files changed since they were written \(splits val:"):
        optimize_data(ImageFolderDataModule(tree), str(out), num_workers=1)


def test_a_text_file_named_jpg_is_refused_before_anything_is_written(tmp_path):
    tree, out = jpeg_tree(tmp_path / "tree", n=2), tmp_path / "chunks"
    (tree / "train" / "b" / "notes.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"Cannot read image '.*train/b/notes.jpg'.*nothing was written"):
        optimize_data(ImageFolderDataModule(tree), str(out), num_workers=1)
    assert not out.exists() or not [p for p in out.iterdir()]


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_chunk_is_one_line_naming_it_when_the_split_is_opened(tmp_path, damage):
    from lightning_frozenbn import StreamingImageDataModule

    out = tmp_path / "chunks"
    optimize_data(ImageFolderDataModule(jpeg_tree(tmp_path / "tree", n=2)), str(out), num_workers=1)
    chunk = sorted((out / "val").glob("*.bin"))[0]
    if damage == "deleted":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    what = "is missing" if damage == "deleted" else r"holds \d+ bytes where the index says \d+"
    with pytest.raises(DataError, match=rf"Chunk '.*val/{chunk.name}' {what}: the chunk folder is damaged"):
        StreamingImageDataModule(str(out), num_workers=0).setup("validate")


def test_a_second_writer_on_the_same_folder_is_refused_while_the_first_writes(tmp_path):
    import subprocess
    import time
    from pathlib import Path

    tree, out = jpeg_tree(tmp_path / "tree", n=20), tmp_path / "chunks"
    script = PACED_WRITE.format(tests=str(Path(__file__).parent), tree=str(tree), out=str(out))
    first = subprocess.Popen([python(), "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        writer = int(first.stdout.readline())
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not list((out / "train").glob("*.bin")):
            time.sleep(0.02)
        assert first.poll() is None, "the first writer finished before the second started"
        with pytest.raises(DataError, match=rf"is being written by another lightning-frozenbn-optimize \(pid {writer}"):
            optimize_data(ImageFolderDataModule(tree), str(out), num_workers=1, chunk_bytes="8KB")
        _, stderr = first.communicate(timeout=120)
        assert first.returncode == 0, stderr.decode()[-2000:]
    finally:
        first.kill()
    assert read_manifest(Location(str(out)))["splits"] == {"train": 60, "val": 60}  # nothing mixed in
