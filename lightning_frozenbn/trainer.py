"""ExportingTrainer: Lightning's Trainer with an ``export`` entry point and ``predict`` from an exported file."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer
from torch import Tensor

from lightning_frozenbn.classifier import FrozenBNClassifier
from lightning_frozenbn.detection.c4 import FrozenBNDetector
from lightning_frozenbn.detection.deployed import DeployedDetector
from lightning_frozenbn.export import (
    ExportError,
    check_detector_onnx,
    check_onnx,
    check_output,
    check_program,
    deployable,
    export_detector_onnx,
    export_onnx,
    export_program,
)
from lightning_frozenbn.exported import ExportedModel, both_named

__all__ = ["ExportingTrainer", "example_images", "example_inputs"]

Format = Literal["onnx", "pt2"]


def _first_val_batch(datamodule: Any) -> Any:
    """The data's first validation batch as the model sees it (transferred to the CPU, normalised), or None."""
    if datamodule is None or not hasattr(datamodule, "val_dataloader"):
        return None
    datamodule.prepare_data()
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    return datamodule.on_after_batch_transfer(datamodule.transfer_batch_to_device(batch, torch.device("cpu"), 0), 0)


def example_inputs(datamodule: Any, image_size: int) -> list[Tensor]:
    """Two classifier inputs to check on: the data's first validation batch as the model sees it, and its first image.

    Two batch sizes, real images. Random inputs of ``image_size`` where there is no data module.
    """
    batch = _first_val_batch(datamodule)
    x = batch[0].float().contiguous() if batch is not None else None
    if x is None:
        x = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return [x, x[:1].clone()]


def example_images(datamodule: Any) -> list[Tensor]:
    """Detector inputs to check on: the first two validation images (float 0..1), and the first at another shape.

    The other shape (1.5 times as wide) is what shows that the exported graph is not specialised to the
    size it was traced at. Random images without a data module.
    """
    batch = _first_val_batch(datamodule)
    if batch is not None:
        images = [img.float().div(255) if not img.is_floating_point() else img.float() for img in batch[0][:2]]
    else:
        images = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))]
    first = images[0]
    wider = (first.shape[-2], round(first.shape[-1] * 1.5))
    images.append(torch.nn.functional.interpolate(first[None], size=wider, mode="bilinear", antialias=True)[0])
    return [img.contiguous() for img in images]


class ExportingTrainer(Trainer):
    """Lightning's Trainer with :meth:`export` (the CLI's ``export`` subcommand) and ``predict(exported=...)``."""

    def export(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output: str = "export",
        formats: list[Format] | None = None,
        opset: int | None = None,
        check: bool = True,
    ) -> dict[str, Any]:
        """Export the model with every frozen BN folded (ONNX and/or ``torch.export``), checked against eager.

        A classifier is run on the data's first validation batch and on its first image; a detector on
        the first validation images and on the first at another shape, comparing the detections above
        its ``box_score_thresh``. Both at torchvision's ONNX tolerances (rtol 1e-3, atol 1e-5): a mismatch
        stops the command. Class names (and COCO category ids) travel in the files' metadata.

        Args:
            model: the model (with ``--ckpt_path``, rebuilt from the checkpoint's hyperparameters).
            datamodule: the data whose validation images the check runs on (random images without it).
            ckpt_path: the checkpoint whose weights are exported.
            output: the folder the files are written to (``model.onnx``, ``model.pt2``).
            formats: ``onnx``, ``pt2`` or both; default: all the model can be exported to (a classifier
                both, a detector ``onnx``: ``torch.export`` cannot trace its data-dependent sizes).
            opset: the ONNX opset (default: the exporter's; 17 for detectors).
            check: run each file and compare with the eager model (on by default).
        """
        from lightning_frozenbn.checkpoint import AtomicCheckpointIO, record_of
        from lightning_frozenbn.data.contract import LabelledDataModule

        folder = Path(output)
        check_output(folder)
        if not isinstance(model, (FrozenBNClassifier, FrozenBNDetector)):
            raise ExportError(f"{type(model).__name__} cannot be exported: export covers this package's models.")
        detector = isinstance(model, FrozenBNDetector)
        formats = list(dict.fromkeys(formats or (["onnx"] if detector else ["onnx", "pt2"])))
        if detector and "pt2" in formats:
            raise ExportError(
                "a detector cannot be exported as a torch.export program (.pt2): torch.export stops at the "
                "data-dependent sizes after the RPN's NMS. Use --formats [onnx]."
            )
        ckpt_path = self._named_checkpoint(ckpt_path)
        checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path) if ckpt_path is not None else {}
        if checkpoint:
            model.load_state_dict(checkpoint["state_dict"])
        record = record_of(checkpoint)
        labelled = isinstance(datamodule, LabelledDataModule)
        metadata = {
            "task": "detection" if detector else "classification",
            "class_names": datamodule.classes if labelled else record["class_names"],
            "category_ids": datamodule.category_ids if labelled else record["category_ids"],
            "checkpoint": ckpt_path,
            "input": "one float32 image (3, H, W), RGB 0..1, any size: resized and normalised inside; outputs "
            "boxes (K, 4) xyxy in its pixels, labels (K,) 1..num_classes, scores (K,)"
            if detector
            else "float32 (N, 3, H, W), RGB 0..1 normalised with the ImageNet mean and std",
        }
        eager = copy.deepcopy(model).cpu().float().eval()  # what the files are checked against: the model as trained
        folder.mkdir(parents=True, exist_ok=True)
        if detector:
            images = example_images(datamodule)
            deploy = DeployedDetector(deployable(model))
            path = export_detector_onnx(deploy, images[0], folder / "model.onnx", metadata, opset)
            diffs = check_detector_onnx(path, eager, images, model.roi_heads.score_thresh) if check else []
            shapes = " and ".join(str(tuple(x.shape)) for x in images)
            said = f"; same detections as eager on {shapes}: max |box diff| {max(diffs):.3g} px" if diffs else ""
            print(f"{path}: onnx, every frozen BN folded{said}", flush=True)
            return {str(path): diffs}
        inputs = example_inputs(datamodule, getattr(datamodule, "image_size", 224))
        deploy = deployable(model)
        written: dict[str, Any] = {}
        for fmt in formats:
            path = folder / f"model.{fmt}"
            if fmt == "onnx":
                export_onnx(deploy, inputs[0], path, metadata, opset)
                diffs = check_onnx(path, eager, inputs) if check else []
            else:
                export_program(deploy, inputs[0], path, metadata)
                diffs = check_program(path, eager, inputs) if check else []
            written[str(path)] = diffs
            shapes = " and ".join(str(tuple(x.shape)) for x in inputs)
            said = f"; checked against eager at {shapes}: max |diff| {max(diffs):.3g}" if diffs else ""
            print(f"{path}: {fmt}, every frozen BN folded{said}", flush=True)
        return written

    def _named_checkpoint(self, ckpt_path: str | None) -> str | None:
        """``last`` is the run's ``last.ckpt`` (where its checkpoint callback writes), as for fit and predict.

        Lightning resolves ``last`` inside fit/validate/test/predict; ``export`` loads the file itself, so it
        resolves it here. ``best`` needs a fit in this process and is refused, naming the fix.
        """
        if ckpt_path == "last":
            folder = getattr(self.checkpoint_callback, "dirpath", None) or Path(self.default_root_dir) / "checkpoints"
            return str(Path(folder) / "last.ckpt")
        if ckpt_path in ("best", "hpc", "registry"):
            raise ExportError(
                f"--ckpt_path {ckpt_path} names no file before a fit: give the checkpoint's path, or `last`."
            )
        return ckpt_path

    def predict(
        self,
        model: pl.LightningModule | None = None,
        dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        return_predictions: bool | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        exported: str | None = None,
    ) -> Any:
        """Lightning's ``predict``; with ``exported``, the ONNX file ``export`` wrote predicts instead of ``model``.

        Args:
            model: the model (replaced by the exported file when ``exported`` is given).
            dataloaders: as in Lightning's ``Trainer.predict``.
            datamodule: the data to predict on (its label set must be the exported file's).
            return_predictions: as in Lightning's ``Trainer.predict``.
            ckpt_path: the checkpoint whose weights predict (not with ``exported``).
            weights_only: as in Lightning's ``Trainer.predict``.
            exported: a ``model.onnx`` from ``export``: run by onnxruntime through the same data, predict
                loop and writers (:class:`~lightning_frozenbn.exported.ExportedModel`); no checkpoint then.
        """
        if exported is not None:
            if ckpt_path is not None:
                raise ExportError(both_named(exported, ckpt_path))
            task = "detection" if isinstance(model, FrozenBNDetector) else "classification"
            model = ExportedModel(exported, task)
            _check_label_set(model.metadata.get("class_names"), datamodule, exported)
        return super().predict(
            model,
            dataloaders,
            datamodule,
            return_predictions=return_predictions,
            ckpt_path=ckpt_path,
            weights_only=weights_only,
        )


def _check_label_set(names: list[str] | None, datamodule: Any, exported: str) -> None:
    """The exported file's class names must be the data's, or every written name would be another class's."""
    from lightning_frozenbn.data.contract import LabelledDataModule

    if names is None or not isinstance(datamodule, LabelledDataModule):
        return
    if list(datamodule.classes) != list(names):
        raise ExportError(
            f"--exported {exported!r} was exported with the classes {names}, the data has {list(datamodule.classes)}: "
            "predict with the data it was trained on, or leave the data's label set unset (the file's is used)."
        )
