"""Streaming from litdata chunks: the folder path's samples, per-epoch shuffles, exact mid-epoch resume, S3 and DDP."""

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "litdata", reason="the streaming extra is not installed: pip install 'lightning_frozenbn[streaming]'"
)

import sample_log  # noqa: E402
from helpers import ROOT, python  # noqa: E402
from test_chunks import jpeg_tree  # noqa: E402

from lightning_frozenbn import (  # noqa: E402
    DataError,
    DigitsDetectionDataModule,
    ImageFolderDataModule,
    StreamingCocoDataModule,
    StreamingImageDataModule,
)
from lightning_frozenbn.data.chunks import optimize_data  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def chunks(tmp_path_factory):
    """48 training and 12 validation JPEGs in 3 classes, as a folder and as chunks (small chunks: several)."""
    root = tmp_path_factory.mktemp("streaming")
    tree = jpeg_tree(root / "tree", n=16)
    for c in ("a", "b", "c"):  # val: 4 per class
        for i in range(4, 16):
            (tree / "val" / c / f"{i}.jpg").unlink()
    optimize_data(
        ImageFolderDataModule(tree, hflip=False, min_scale=0.5), str(root / "chunks"), num_workers=2, chunk_bytes="20KB"
    )
    return tree, root / "chunks"


def test_streamed_samples_are_the_folders_samples(chunks):
    tree, folder = chunks
    streamed = StreamingImageDataModule(str(folder), image_size=32, num_workers=0, augment=False)
    files = ImageFolderDataModule(tree, image_size=32, num_workers=0, augment=False)
    assert streamed.num_classes == 3 and streamed.classes == files.classes == ["a", "b", "c"]
    streamed.setup("fit")
    files.setup("fit")
    for split in ("train", "val"):
        items = {index: (x, y) for x, y, index in streamed.datasets[split]}
        assert sorted(items) == list(range(len(files.datasets[split])))
        for index, (x, y) in items.items():
            fx, fy = files.datasets[split][index]
            assert y == fy and torch.equal(x, fx), (split, index)


def test_augmentation_defaults_come_from_the_source_module(chunks):
    _, folder = chunks
    streamed = StreamingImageDataModule(str(folder), image_size=32)
    streamed.setup("fit")
    assert (streamed.min_scale, streamed.hflip) == (0.5, False)  # as written; not ImageFolderDataModule's 0.08/True
    given = StreamingImageDataModule(str(folder), image_size=32, min_scale=0.9, hflip=True)
    given.setup("fit")
    assert (given.min_scale, given.hflip) == (0.9, True)


def test_each_epoch_sees_every_sample_once_in_a_new_order(chunks):
    _, folder = chunks
    data = StreamingImageDataModule(str(folder), image_size=32, batch_size=4, num_workers=2)
    loader = data.train_dataloader()
    assert len(loader) == 12
    epochs = [[i for batch in loader for i in batch[2].tolist()] for _ in range(2)]
    for seen in epochs:
        assert sorted(seen) == list(range(48))
    assert epochs[0] != epochs[1]


def test_wrong_task_missing_split_and_predict_without_a_folder_are_clear_errors(chunks, tmp_path):
    _, folder = chunks
    with pytest.raises(DataError, match="holds classification chunks, not detection"):
        StreamingCocoDataModule(str(folder)).num_classes  # noqa: B018
    with pytest.raises(DataError, match=r"has no 'test' split \(it has \['train', 'val'\]\)"):
        StreamingImageDataModule(str(folder)).setup("test")
    with pytest.raises(DataError, match="predict reads a folder of images"):
        StreamingImageDataModule(str(folder)).setup("predict")
    with pytest.raises(DataError, match="not written by `lightning-frozenbn-optimize`"):
        StreamingImageDataModule(str(tmp_path)).num_classes  # noqa: B018


def test_detection_chunks_give_the_folder_modules_targets(tmp_path):
    source = DigitsDetectionDataModule(
        root=tmp_path / "canvases", canvas_size=64, digit_size=(16, 24), num_train=20, num_val=10, num_workers=0
    )
    optimize_data(source, str(tmp_path / "chunks"), num_workers=1)
    streamed = StreamingCocoDataModule(str(tmp_path / "chunks"), num_workers=0)
    assert streamed.categories == source.categories and streamed.num_classes == 10
    streamed.setup("fit")
    source.setup("fit")
    assert streamed.hflip is False  # the digits module's "a mirrored 2 is not a 2", from the manifest
    for split in ("train", "val"):
        folder_split = source.datasets[split]
        items = {int(t["image_id"]): (x, t) for x, t in streamed.datasets[split]}
        assert len(items) == len(folder_split)
        for i in range(len(folder_split)):
            fx, ft = folder_split[i]
            x, t = items[int(ft["image_id"])]
            assert torch.equal(x, fx)
            assert t.keys() == ft.keys() and all(torch.equal(t[k], ft[k]) for k in ft), (split, i)


# ---- a real run: kill -9 mid-epoch, resume from last.ckpt --------------------------------------------
def fit_args(tmp_path, root, log, *extra, delay=0.0):
    overlay = tmp_path / "log.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: sample_log.SampleLog\n"
        f"      init_args: {{path: {log}, delay: {delay}}}\n"
    )
    return [
        python(), "-m", "lightning_frozenbn", "fit",
        "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--config", str(ROOT / "configs" / "streaming.yaml"),
        "--config", str(overlay),
        "--data.init_args.root", str(root),
        "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "2",
        "--model.init_args.calibrate_bn", "0",
        "--checkpoint.every_n_train_steps", "3",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.max_epochs", "2",
        *extra,
    ]  # fmt: skip


def env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def run(args, timeout=300):
    """A console command in its own process (with the tests' sample log importable), its output captured."""
    return subprocess.run(args, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_sees_every_sample_of_the_epoch_once(chunks, tmp_path):
    _, folder = chunks
    log = tmp_path / "seen"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    calibrate = (
        "--model.init_args.calibrate_bn",
        "2",
    )  # as the quickstart does (20 there): it must not move the stream
    proc = subprocess.Popen(
        fit_args(tmp_path, folder, log, *calibrate, delay=0.25),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            rows = sample_log.read(log)
            if last.exists() and rows and rows[-1]["step"] >= 5:  # a mid-epoch checkpoint, then two more steps
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    saved = torch.load(last, weights_only=False)["global_step"]
    first = sample_log.read(log)
    assert 3 <= saved < 12 and first[-1]["step"] > saved, (saved, first[-1])  # killed mid-epoch 0, steps lost
    os.replace(f"{log}.rank0", tmp_path / "first.rank0")

    resumed = run(fit_args(tmp_path, folder, log, *calibrate, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    second = sample_log.read(log)
    assert second[0]["step"] == saved + 1  # training resumed at the step after the checkpoint
    rows = [r for r in first if r["step"] <= saved] + second  # the steps the two runs kept
    for epoch in (0, 1):
        seen = [i for r in rows if r["epoch"] == epoch for i in r["index"]]
        assert sorted(seen) == list(range(48)), f"epoch {epoch}: {sorted(Counter(seen).items())}"
    order = {e: [i for r in rows if r["epoch"] == e for i in r["index"]] for e in (0, 1)}
    assert order[0] != order[1]
    out = resumed.stdout + resumed.stderr
    assert "85 frozen tensors bit-identical at epoch 1" in out and "at the end of fit" in out


@pytest.mark.slow
def test_stopped_by_max_steps_off_a_checkpoint_step_with_calibrate_bn_resumes_exactly(chunks, tmp_path):
    """max_steps 4 with checkpoints every 3 steps, calibrate_bn on: the resume continues at step 5 in epoch 0
    (the epoch-end save recorded the cut epoch as finished before), every sample once per epoch over the two
    runs, and both epochs' validation rows in metrics.csv."""
    _, folder = chunks
    log = tmp_path / "seen"
    calibrate = ("--model.init_args.calibrate_bn", "2")
    first = run(fit_args(tmp_path, folder, log, *calibrate, "--trainer.max_steps", "4"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "calibrate_bn: re-estimated" in first.stdout + first.stderr
    assert [r["step"] for r in sample_log.read(log)] == [1, 2, 3, 4]
    resumed = run(fit_args(tmp_path, folder, log, *calibrate, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = sample_log.read(log)
    assert [(r["step"], r["epoch"]) for r in rows] == [(s, (s - 1) // 12) for s in range(1, 25)]  # 48 / 4 a step
    for epoch in (0, 1):
        seen = [i for r in rows if r["epoch"] == epoch for i in r["index"]]
        assert sorted(seen) == list(range(48)), f"epoch {epoch}: {sorted(Counter(seen).items())}"
    csv_rows = [line.split(",") for p in (tmp_path / "run").rglob("metrics.csv") for line in p.read_text().splitlines()]
    header = csv_rows[0]
    validated = {int(r[header.index("epoch")]) for r in csv_rows[1:] if r[header.index("val/acc")]}
    assert validated == {0, 1}
    # the streaming config checkpoints every 3 steps: a best file holds a validated model (an epoch end), the
    # model its name's score was measured on
    best = list((tmp_path / "run" / "checkpoints").glob("best*.ckpt"))
    assert best and all(torch.load(p, weights_only=False)["global_step"] % 12 == 0 for p in best), best


# ---- an S3-compatible store on 127.0.0.1, two processes -----------------------------------------------
@pytest.fixture
def s3(monkeypatch):
    pytest.importorskip("moto", reason="moto (the test S3 server) is in the dev extra")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket="frozenbn")
    yield settings
    server.stop()


@pytest.mark.slow
def test_s3_store_two_process_ddp_stopped_mid_epoch_and_resumed_sees_each_sample_once_per_epoch(chunks, tmp_path, s3):
    tree, _ = chunks
    optimize_data(
        ImageFolderDataModule(tree, hflip=False, min_scale=0.5),
        "s3://frozenbn/sets/abc",
        num_workers=2,
        chunk_bytes="20KB",
    )
    log = tmp_path / "seen"
    args = fit_args(tmp_path, "s3://frozenbn/sets/abc", log, "--config", str(ROOT / "configs" / "ddp.yaml"))
    args += ["--trainer.devices", "2", "--data.init_args.cache_dir", str(tmp_path / "cache")]
    # stopped by max_steps after step 4 of 6 in epoch 0, off the checkpoint steps (every 3), then resumed from
    # last.ckpt: each rank loads the position rank 0 saved at step 4 and continues its own shard
    first = run([*args, "--trainer.max_steps", "4"], timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [len(sample_log.read(log, rank)) for rank in (0, 1)] == [4, 4]
    resumed = run([*args, "--ckpt_path", "last"], timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ranks = [sample_log.read(log, rank) for rank in (0, 1)]
    assert all([r["step"] for r in rows] == list(range(1, 13)) for rows in ranks)  # 48 / (2 x 4) = 6 steps an epoch
    for epoch in (0, 1):
        per_rank = [[i for r in rows if r["epoch"] == epoch for i in r["index"]] for rows in ranks]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(48))
    assert any((tmp_path / "cache").rglob("*.bin"))  # chunks came through the local cache


def test_a_missing_bucket_is_one_line_and_writes_nothing(tmp_path, s3):
    tree = jpeg_tree(tmp_path / "tree", n=2)
    with pytest.raises(
        DataError, match=r"Bucket 'nobucket' of 's3://nobucket/x' is missing or unreachable at http://127"
    ):
        optimize_data(ImageFolderDataModule(tree), "s3://nobucket/x", num_workers=1)
    with pytest.raises(DataError, match="Bucket 'nobucket'"):
        StreamingImageDataModule("s3://nobucket/x").num_classes  # noqa: B018
    import boto3

    assert "nobucket" not in [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]


def test_an_image_listed_at_another_size_is_refused_as_by_the_folder_module(tmp_path):
    """An export listing an EXIF-rotated photo at its rotated size: optimize refuses it, nothing is written."""
    import json as _json

    from PIL import Image

    from lightning_frozenbn import CocoDetectionDataModule

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        Image.new("RGB", (60, 40)).save(tmp_path / split / "a.jpg")
        coco = {
            "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 60}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0}
            ],
            "categories": [{"id": 1, "name": "thing"}],
        }
        (tmp_path / f"{split}.json").write_text(_json.dumps(coco))
    data = CocoDetectionDataModule(
        tmp_path / "train", tmp_path / "train.json", tmp_path / "val", tmp_path / "val.json", num_workers=0
    )
    with pytest.raises(DataError, match=r"a\.jpg' is 60x40 on disk, but its annotations say 40x60 \(image id 1\)"):
        optimize_data(data, str(tmp_path / "chunks"), num_workers=1)
    assert not (tmp_path / "chunks").exists()
