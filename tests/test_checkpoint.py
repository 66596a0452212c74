import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_evil_pickle

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
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
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
    from conftest import tiny_loader
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
