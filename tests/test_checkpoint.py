import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import python, write_evil_pickle

from lightning_frozenbn import AtomicCheckpointIO, CheckpointError

WRITER = """
import sys, torch
from lightning_frozenbn import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"generation": torch.tensor(1), "blob": torch.zeros(1)}, path)
print("first", flush=True)
big = torch.randn(96 * 2**20)  # 384 MB: long enough to be killed mid-write
while True:
    print("writing", flush=True)
    io.save_checkpoint({"generation": torch.tensor(2), "blob": big}, path)
"""


def test_a_kill_during_a_large_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([python(), "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first"
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.2)  # inside torch.save of the 384 MB checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    state = AtomicCheckpointIO().load_checkpoint(path)
    assert int(state["generation"]) in (1, 2)  # complete, whichever generation the rename reached
    if int(state["generation"]) == 2:
        assert state["blob"].numel() == 96 * 2**20
    # the kill landed inside a write: its partial temp file is there, the real path was never touched
    assert list(tmp_path.glob(".last.ckpt.tmp-*"))


def test_truncated_checkpoint_names_the_file_and_an_earlier_one(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"a": torch.ones(1000)}, tmp_path / "epoch0.ckpt")
    io.save_checkpoint({"a": torch.ones(1000)}, tmp_path / "last.ckpt")
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"Cannot read checkpoint '.*last.ckpt'.*truncated or corrupt.*--ckpt_path .*epoch0.ckpt"
    ):
        io.load_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        io.load_checkpoint(tmp_path / "nope.ckpt")


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    write_evil_pickle(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="Refused to load checkpoint"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_weights_only_false_is_refused_not_ignored(tmp_path):
    """Lightning passes `--weights_only false` to the checkpoint IO: it must not be dropped silently."""
    marker = tmp_path / "pwned"
    write_evil_pickle(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="weights_only=False is refused.*Drop `--weights_only false`"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt", weights_only=False)
    assert not marker.exists()
    torch.save({"x": torch.ones(1)}, tmp_path / "ok.ckpt")
    for weights_only in (None, True):
        assert AtomicCheckpointIO().load_checkpoint(tmp_path / "ok.ckpt", weights_only=weights_only)["x"] == 1


def fit_three_epochs(tmp_path, model, ckpt):
    """Three epochs of 4 steps on tiny data, validated after each, with ``ckpt`` the only checkpoint callback."""
    from helpers import tiny_loader
    from lightning.pytorch import Trainer

    Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
    ).fit(model, tiny_loader(), tiny_loader(n=8))


def test_last_ckpt_is_always_the_latest_epoch(tmp_path):

    from lightning_frozenbn import FrozenBNClassifier, ResumableCheckpoint

    class WorseEveryEpoch(FrozenBNClassifier):
        def on_validation_epoch_end(self):
            self.log("score", float(-self.current_epoch))  # never improves after epoch 0

    ckpt = ResumableCheckpoint(dirpath=tmp_path, monitor="score", mode="max", save_last=True)
    fit_three_epochs(tmp_path, WorseEveryEpoch(num_classes=4, arch="resnet18"), ckpt)
    assert torch.load(ckpt.last_model_path, weights_only=True)["epoch"] == 2
    assert torch.load(ckpt.best_model_path, weights_only=True)["epoch"] == 0


def test_with_every_n_train_steps_a_best_checkpoint_holds_the_model_its_score_was_measured_on(tmp_path):
    """Step-interval saves between validations go to last.ckpt only: a top-k file named with a score holds
    the model of the validation that measured it (ModelCheckpoint wrote it at later steps, under a stale score)."""

    from lightning_frozenbn import FrozenBNClassifier, ResumableCheckpoint

    class ScoreIsStep(FrozenBNClassifier):
        def on_validation_epoch_end(self):
            self.log("score", float(self.global_step))  # names the step of the model that was validated

    ckpt = ResumableCheckpoint(
        dirpath=tmp_path,
        monitor="score",
        mode="max",
        save_last=True,
        save_top_k=-1,
        every_n_train_steps=3,
        filename="{epoch}-{step}-{score:.0f}",
    )
    fit_three_epochs(tmp_path, ScoreIsStep(num_classes=4, arch="resnet18"), ckpt)
    saved = {Path(p).name: float(s) for p, s in ckpt.best_k_models.items()}
    assert sorted(saved.values()) == [4.0, 8.0, 12.0]  # one per validation (4 steps an epoch), none between
    for name, score in saved.items():
        assert torch.load(tmp_path / name, weights_only=True)["global_step"] == score, name
    assert torch.load(ckpt.last_model_path, weights_only=True)["global_step"] == 12


# ---- what earlier versions wrote keeps working -----------------------------------------------------------
# Written by the quickstart and detection quickstart at 5fa12b9 (before the data wing became a package): each
# run's config.yaml, and each last.ckpt's contents other than the model and optimizer state, as JSON (its few
# scalar tensors marked with their dtype). The test writes the checkpoint from that record and a state dict
# rebuilt from the recorded hyperparameters: no checkpoint file is tracked, and everything else the test loads
# is what that version saved (the conversion was checked to round-trip exactly).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "written_by_5fa12b9"


def _decoded(value):
    """The JSON record back into checkpoint values: tensors and tuples as that version saved them."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        if "__tuple__" in value:
            return tuple(_decoded(v) for v in value["__tuple__"])
        return {k: _decoded(v) for k, v in value.items()}
    return [_decoded(v) for v in value] if isinstance(value, list) else value


def _old(name, tmp_path):
    text = (FIXTURES / name).read_text().replace("/tmp/fx", str(tmp_path))
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def _old_checkpoint(name, model_class, tmp_path, class_path=None):
    import json

    saved = _decoded(json.loads((FIXTURES / name).read_text()))
    hparams = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
    if class_path is not None:  # as a still earlier version recorded it
        saved["hyper_parameters"]["_class_path"] = class_path
    saved["state_dict"] = model_class(**hparams).state_dict()
    path = tmp_path / "old-last.ckpt"
    torch.save(saved, path)
    return path


def _new_images(folder, n=3, size=40):
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (size, size), (40 * i, 200, 30)).save(folder / f"{i}.png")
    return folder


@pytest.mark.slow
def test_a_run_config_written_by_an_earlier_version_still_fits(tmp_path):
    from lightning_frozenbn.cli import main

    config = _old("quickstart-config.yaml", tmp_path)
    main(["fit", "--config", config, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "1", "--data.init_args.num_workers", "0"])  # fmt: skip
    assert (tmp_path / "runs" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["quickstart", "quickstart-before-074b116", "detection"])
def test_a_checkpoint_written_by_an_earlier_version_predicts_with_the_label_set_it_recorded(kind, tmp_path):
    import csv
    import json

    from lightning_frozenbn import FrozenBNClassifier, FrozenBNDetector
    from lightning_frozenbn.checkpoint import read_record
    from lightning_frozenbn.cli import detect_main, main

    # before 074b116 (2026-11-28) the classifier lived in lightning_frozenbn.module, and checkpoints name it there
    moved = "lightning_frozenbn.module.FrozenBNClassifier" if kind.endswith("074b116") else None
    kind = kind.split("-")[0]
    model_class, run = (FrozenBNClassifier, main) if kind == "quickstart" else (FrozenBNDetector, detect_main)
    ckpt = _old_checkpoint(f"{kind}-last-record.json", model_class, tmp_path, moved)
    record = read_record(ckpt)
    digits = [str(d) for d in range(10)]
    assert record["class_names"] == digits and record["epoch"] == 0 and record["csv_version"] == 0
    assert record["category_ids"] == (None if kind == "quickstart" else list(range(1, 11)))
    out = tmp_path / ("pred.csv" if kind == "quickstart" else "det.json")
    every_box = [] if kind == "quickstart" else ["--model.init_args.box_score_thresh", "0.0"]  # rows to check
    run(["predict", "--config", _old(f"{kind}-config.yaml", tmp_path), "--ckpt_path", str(ckpt), *every_box,
         "--data.init_args.predict_root", str(_new_images(tmp_path / "new")), "--data.init_args.num_workers", "0",
         "--prediction_writer.output", str(out), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    if kind == "quickstart":
        rows = list(csv.DictReader(out.open()))
        assert [Path(r["file"]).name for r in rows] == ["0.png", "1.png", "2.png"]
        assert {r["predicted_class"] for r in rows} <= set(digits)
    else:  # detections name the recorded category ids (and names) of each file, if any scored
        rows = json.loads(out.read_text())
        assert {Path(r["file"]).name for r in rows} == {"0.png", "1.png", "2.png"}
        assert all(r["category_id"] in range(1, 11) and r["category"] == str(r["category_id"] - 1) for r in rows)
