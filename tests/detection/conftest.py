"""The detection tests' shared fit: one tiny detector trained once through the command, read by several commands."""

from __future__ import annotations

import pytest
from helpers import tiny_detection_args

from lightning_frozenbn.cli import DetectionCLI


@pytest.fixture(scope="session")
def tiny_fit(tmp_path_factory):
    """One epoch of `lightning-frozenbn-detect fit` in this process on the tiny canvas set: (folder, last.ckpt)."""
    folder = tmp_path_factory.mktemp("tiny_fit")
    fit_args = ["--trainer.max_epochs=1", "--model.init_args.box_nms_thresh=0.3", "--model.init_args.roi_output_size=6"]
    DetectionCLI(args=["fit", *tiny_detection_args(folder, "run", *fit_args)])
    return folder, folder / "run" / "checkpoints" / "last.ckpt"
