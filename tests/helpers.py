"""What the tests share besides fixtures: tiny seeded data, trainers, BN statistics, GPU gating."""

from __future__ import annotations

import atexit
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset
from torchvision.ops.misc import FrozenBatchNorm2d

ROOT = Path(__file__).resolve().parents[1]  # the repository
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# 2-process DDP inside pytest: forked processes (gloo). "ddp_spawn" would start fresh interpreters that
# import torch and Lightning again (~10 s a run on these 2 cores, 5x the training); "ddp" would re-run
# pytest. The CLI's own launcher ("ddp", torchrun) is tested through real console processes.
DDP_IN_PYTEST = "ddp_fork"


_ZYGOTE = None


def python() -> str:
    """The interpreter for a console process a test starts: the client of the tests' fork server.

    A worker forked from a server that imported the package once, instead of 6-10 s of imports in every
    process (tests/zygote.py says how it stays a real process and what differs). ``LFBN_REAL_PYTHON=1``
    runs the real interpreter instead, to check that a test does not depend on the difference.
    """
    global _ZYGOTE
    if os.environ.get("LFBN_REAL_PYTHON") == "1":
        return sys.executable
    if _ZYGOTE is None:
        from zygote import Zygote

        _ZYGOTE = Zygote()
        atexit.register(_ZYGOTE.close)
        if not _ZYGOTE.ready():
            warnings.warn(
                "the tests' fork server did not start; console processes use the real interpreter", stacklevel=2
            )
    return _ZYGOTE.python  # the client falls back to the real interpreter when no server listens


_EARLY: dict[str, tuple[subprocess.Popen, Path]] = {}


def start_early(key: str, args: Callable[[Path], list[str]]) -> None:
    """Start ``python args(folder)`` now, at the lowest CPU priority, in a fresh folder; ``finish_early`` awaits it.

    Why: the reduced studies and the benchmark smoke run are single end-to-end scripts of 30-100 s that
    leave one of the two cores mostly idle, as do most other tests; started when the suite starts
    (``tests/conftest.py``, for the selected tests that list them in their module's ``EARLY``), they
    use that idle core at nice 19 while the rest of the suite runs, and their tests assert on what they
    wrote exactly as before.
    """
    if key in _EARLY:
        return
    folder = Path(tempfile.mkdtemp(prefix="early-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [python(), *args(folder)], cwd=folder, stdout=out, stderr=err, preexec_fn=lambda: os.nice(19)
        )
    atexit.register(proc.kill)  # a session stopped early does not leave it running
    _EARLY[key] = (proc, folder)


def early_args(item: pytest.Item) -> Callable[[Path], list[str]] | None:
    """The script a test lists in its module's ``EARLY`` (test name -> the script's arguments), if any."""
    return getattr(item.module, "EARLY", {}).get(getattr(item, "originalname", item.name))


def finish_early(request: pytest.FixtureRequest, timeout: float) -> tuple[int, str, Path]:
    """Wait up to ``timeout`` seconds for the test's script that ``start_early`` started (starting it now if not).

    The script is killed when the wait runs out, as ``subprocess.run(timeout=...)`` kills its child.
    Returns the exit code, the script's stderr and the folder it ran in.
    """
    key = request.node.nodeid
    start_early(key, early_args(request.node))
    proc, folder = _EARLY[key]
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, (folder / "stderr.txt").read_text(), folder


def tiny_loader(n: int = 16, size: int = 32, num_classes: int = 4, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Random images with a learnable label (the mean of one channel decides the class)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x[:, 0] += y[:, None, None].float()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def make_tree(root, splits=("train", "val"), classes=("cat", "dog"), n=3, size=40):
    """An ImageFolder tree of small solid-colour PNGs: ``root/<split>/<class>/<i>.png``."""
    from PIL import Image

    for split in splits:
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (size, size), (i * 40, 100, 200)).save(folder / f"{i}.png")
    return root


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN (BatchNorm2d or FrozenBatchNorm2d) non-trivial statistics and affine values.

    So that tests cannot pass on defaults: a FrozenBatchNorm2d fresh from torchvision is the identity.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)) or type(m).__name__ == "FrozenBatchNormAct2d":
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                if getattr(m, "num_batches_tracked", None) is not None:
                    m.num_batches_tracked.fill_(100)
    return model


def quiet_trainer(tmp_path, **kwargs) -> Trainer:
    """A CPU Trainer with no logger, progress bar, summary or checkpoints unless asked for."""
    defaults = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return Trainer(**{**defaults, **kwargs})


class _CreatesFile:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_evil_pickle(path: Path, marker: Path, key: str = "state_dict") -> None:
    """A pickle that would create ``marker`` when loaded by an unsafe loader."""
    with open(path, "wb") as f:
        pickle.dump({key: {}, "payload": _CreatesFile(str(marker))}, f)


def tiny_detection_args(tmp_path, run="run", *extra):
    """The detection quickstart config on a tiny canvas set: 16 training canvases of 64 px, random init."""
    return [
        "--config",
        str(ROOT / "configs" / "detection_quickstart.yaml"),
        "--data.init_args.root",
        str(tmp_path / "dd"),
        "--data.init_args.canvas_size=64",
        "--data.init_args.digit_size=[16, 24]",
        "--data.init_args.num_train=16",
        "--data.init_args.num_val=4",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--model.init_args.weights=null",
        "--model.init_args.calibrate_bn=1",
        "--model.init_args.min_size=64",
        "--model.init_args.anchor_sizes=[16, 24]",
        "--model.init_args.box_batch_size_per_image=8",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        "--trainer.default_root_dir",
        str(tmp_path / run),
        *extra,
    ]
