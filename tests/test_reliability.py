"""Kill-and-resume, DDP faults and guard false positives, with real processes."""

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import DDP_IN_PYTEST, ROOT, python, quiet_trainer, randomize_bn, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.multiprocessing import ProcessRaisedException

from lightning_frozenbn import FrozenBNClassifier, FrozenModuleGuard
from lightning_frozenbn.guard import fingerprint

pytestmark = pytest.mark.slow


def pretrained_file(tmp_path) -> Path:
    path = tmp_path / "pretrained.pth"
    if not path.exists():
        torch.save(randomize_bn(torchvision.models.resnet18(weights=None)).state_dict(), path)
    return path


def fit_args(tmp_path, run, *extra):
    return [
        python(),
        "-m",
        "lightning_frozenbn",
        "fit",
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--data.init_args.root",
        str(tmp_path / "digits"),
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.augment",
        "false",
        "--model.init_args.weights",
        str(pretrained_file(tmp_path)),
        "--model.init_args.calibrate_bn",
        "0",
        "--trainer.default_root_dir",
        str(tmp_path / run),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.max_epochs",
        "3",
        "--trainer.limit_train_batches",
        "12",
        "--trainer.limit_val_batches",
        "3",
        *extra,
    ]


def last_val_acc(run_dir: Path) -> float:
    rows = [r for p in sorted(run_dir.rglob("metrics.csv")) for r in csv.DictReader(open(p)) if r.get("val/acc")]
    return float(rows[-1]["val/acc"])


def wait_for(predicate, timeout, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    from lightning_frozenbn import DigitsDataModule

    DigitsDataModule(root=tmp_path / "digits").prepare_data()
    # the uninterrupted run A alongside B (separate processes and folders, the same seed): the suite waits once
    log = open(tmp_path / "A.log", "w")  # noqa: SIM115 (closed once A has ended)
    uninterrupted = subprocess.Popen(fit_args(tmp_path, "A"), stdout=log, stderr=subprocess.STDOUT)
    proc = subprocess.Popen(fit_args(tmp_path, "B"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: any((tmp_path / "B").rglob("last.ckpt")), 240, proc), "no checkpoint before exit"
        time.sleep(0.7)  # into the next epoch's batches
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    last = next((tmp_path / "B").rglob("last.ckpt"))
    killed_at = torch.load(last, weights_only=True)["epoch"]
    assert killed_at < 2, "the run finished before it was killed"
    resumed = subprocess.run(
        fit_args(tmp_path, "B", "--ckpt_path", str(last)), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted.wait(timeout=300)
    log.close()
    assert uninterrupted.returncode == 0, (tmp_path / "A.log").read_text()[-3000:]

    final_a = torch.load(next((tmp_path / "A").rglob("last.ckpt")), weights_only=True)
    final_b = torch.load(tmp_path / "B" / "checkpoints" / "last.ckpt", weights_only=True)  # the resumed run's
    assert final_a["epoch"] == final_b["epoch"] == 2
    # frozen tensors: bit-identical to the pretrained file
    file_state = torch.load(pretrained_file(tmp_path), weights_only=True)
    frozen = {
        k: v
        for k, v in final_b["state_dict"].items()
        if k.startswith(("backbone.conv1", "backbone.layer1", "backbone.bn1")) or "running_" in k
    }
    assert len(frozen) > 40
    for key, value in frozen.items():
        assert torch.equal(value, file_state[key.split(".", 1)[1]]), key
    # the guard's reference came through the checkpoint: it counts all 3 epochs and matches the file
    guard = next(v for k, v in final_b["callbacks"].items() if k.startswith("FrozenModuleGuard"))
    assert guard["epochs_verified"] == 3
    name = "backbone.layer1.0.conv1.weight"
    assert guard["reference_checksums"][name] == fingerprint([file_state[name.split(".", 1)[1]]]).tolist()[0]
    # deterministic: the resumed run ends where the uninterrupted one did
    for key, value in final_a["state_dict"].items():
        assert torch.equal(value, final_b["state_dict"][key]), key
    assert last_val_acc(tmp_path / "A") == last_val_acc(tmp_path / "B")
    # one metrics.csv for B that reads like A's: the rows B logged after its checkpoint, before the kill, are
    # gone, and the resumed run appended to the same version
    metrics = {run: sorted((tmp_path / run).rglob("metrics.csv")) for run in "AB"}
    assert len(metrics["A"]) == len(metrics["B"]) == 1
    assert list(csv.DictReader(open(metrics["B"][0]))) == list(csv.DictReader(open(metrics["A"][0])))


class NaNOnRank1(FrozenBNClassifier):
    def compute_loss(self, logits, target):
        loss = super().compute_loss(logits, target)
        return loss * float("nan") if self.global_rank == 1 and self.global_step == 2 else loss


def test_ddp_nan_on_one_rank_stops_every_rank(tmp_path):
    trainer = quiet_trainer(tmp_path, devices=2, strategy=DDP_IN_PYTEST)
    started = time.time()
    with pytest.raises((FloatingPointError, ProcessRaisedException), match=r"not finite at global step 2"):
        trainer.fit(NaNOnRank1(num_classes=4, arch="resnet18"), tiny_loader(n=64, batch_size=4))
    assert time.time() - started < 120


def test_ddp_rank_1_killed_rank_0_exits_then_resume(tmp_path):
    from lightning_frozenbn import DigitsDataModule

    DigitsDataModule(root=tmp_path / "digits").prepare_data()
    args = fit_args(
        tmp_path,
        "ddp",
        "--config",
        str(ROOT / "configs" / "ddp.yaml"),
        "--trainer.devices",
        "2",
        "--trainer.max_epochs",
        "50",
        "--trainer.limit_train_batches",
        "6",
    )
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: any((tmp_path / "ddp").rglob("last.ckpt")), 240, proc), "no checkpoint"
        rank_1 = _started_with(str(tmp_path), "LOCAL_RANK=1")
        assert rank_1, "rank 1 process not found"
        for pid in rank_1:
            os.kill(pid, signal.SIGKILL)
        killed = time.time()
        proc.wait(timeout=120)
        assert time.time() - killed < 120
    finally:
        proc.kill()
    assert proc.returncode != 0
    last = next((tmp_path / "ddp").rglob("last.ckpt"))
    epoch = torch.load(last, weights_only=True)["epoch"]
    resumed = subprocess.run(
        [*args, "--trainer.max_epochs", str(epoch + 2), "--ckpt_path", str(last)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "bit-identical at epoch" in resumed.stdout + resumed.stderr


def _started_with(argument: str, variable: str) -> list[int]:
    """The processes started with ``argument`` in their command line and ``variable`` in their environment.

    Lightning's launcher starts rank 1 with ``LOCAL_RANK=1`` and the command line of rank 0.
    """
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and argument.encode() in (entry / "cmdline").read_bytes():
                if variable.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:  # ended meanwhile, or not ours to read
            pass
    return found


class TrainCallingUser(FrozenBNClassifier):
    def on_train_batch_start(self, batch, batch_idx):
        self.train()  # a user hook, called after every callback's on_train_batch_start


@pytest.mark.parametrize(
    ("fold", "precision"),
    # bf16 with the fold only: the folded convs' bf16 caches are the risk, and bf16 autocast is emulated
    # (30 s a case) on CPUs without native bf16
    [(True, "32-true"), (False, "32-true"), (True, "bf16-mixed")],
)
def test_guard_reports_no_false_positives(tmp_path, fold, precision):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)

    def make_trainer(epochs, callbacks):
        return quiet_trainer(
            tmp_path, precision=precision, max_epochs=epochs, callbacks=callbacks, enable_checkpointing=True
        )

    def make_model():
        # norm="train": layer2 keeps nn.BatchNorm2d, frozen by the user. TrainCallingUser's self.train()
        # puts it in train mode before every batch; only the guard's eval enforcement keeps its running
        # statistics from moving (stem and layer1 are FrozenBatchNorm2d, folded or not).
        model = TrainCallingUser(num_classes=4, arch="resnet18", fold=fold, norm="train", freeze_at=2)
        model.backbone.layer2.requires_grad_(False)
        return model

    guard = FrozenModuleGuard()
    model = make_model()
    make_trainer(2, [guard, ckpt]).fit(model, tiny_loader(n=16), tiny_loader(n=8, seed=1))
    assert guard.epochs_verified == 2
    assert "backbone.layer2.0.bn1.running_mean" in guard.frozen_tensor_names
    guard2 = FrozenModuleGuard()
    model2 = make_model()
    make_trainer(3, [guard2]).fit(model2, tiny_loader(n=16), tiny_loader(n=8, seed=1), ckpt_path=ckpt.last_model_path)
    assert guard2.epochs_verified == 3
