"""ExportedModel: an exported ONNX file run by onnxruntime in Lightning's predict loop, with the package's writers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_frozenbn.errors import InputError

__all__ = ["ExportedModel", "both_named", "exported_metadata"]

TASKS = {"classification": "lightning-frozenbn", "detection": "lightning-frozenbn-detect"}


def both_named(exported: str, ckpt_path: str) -> str:
    """The one line for ``--exported`` given with ``--ckpt_path``: two models named, the run would use one."""
    return f"--exported {exported!r} and --ckpt_path {ckpt_path!r} both name the model: give one of them."


def exported_metadata(path: str | Path, task: str) -> dict[str, Any]:
    """The metadata of an ONNX file ``export`` wrote, refused in one line if missing, not ours, or of the other task.

    Read before anything of the run is built: the label set it carries lets predict run on new images
    without the training data, as a checkpoint's record does.
    """
    from lightning_frozenbn.export import read_metadata

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--exported {str(path)!r}: no such file; give the model.onnx that `export` wrote.")
    try:
        metadata = read_metadata(path)
    except Exception as err:  # onnx's parser raises its own types
        raise InputError(f"--exported {str(path)!r} is not an ONNX file ({type(err).__name__}).") from err
    held = metadata.get("task")
    if held != task:
        where = f"run it with `{TASKS[held]} predict`" if held in TASKS else "export the checkpoint again"
        raise InputError(f"--exported {str(path)!r} holds a {held or 'unknown'} model, not {task}: {where}.")
    return metadata


class ExportedModel(pl.LightningModule):
    """The ONNX file ``export`` wrote, as a LightningModule that only predicts.

    Its ``predict_step`` returns what the eager model's returns (class probabilities; per image
    ``boxes``, ``labels``, ``scores`` and the data's ``image_id``), so the same data module, predict loop
    and writers (CSV, COCO results JSON) serve both; the network runs in onnxruntime on the CPU,
    without the package's model code. The file's metadata says which task it holds.

    Args:
        path: the ``model.onnx`` file.
        task: the task of the command it is run from; a file of the other task is refused, naming the
            command that runs it.
    """

    def __init__(self, path: str | Path, task: str) -> None:
        super().__init__()
        self.metadata = exported_metadata(path, task)
        self.path, self.task = Path(path), task
        self._session: Any = None

    @property
    def session(self) -> Any:
        """The onnxruntime session, opened on first use (in the process that predicts)."""
        if self._session is None:
            import onnxruntime

            self._session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        return self._session

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Class probabilities ``(N, num_classes)``, or per image the detections, as the eager model returns them."""
        if self.task == "classification":
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            (logits,) = self.session.run(None, {self.session.get_inputs()[0].name: x.float().cpu().numpy()})
            return torch.from_numpy(logits).softmax(dim=-1)
        images, targets = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
        out = []
        for i, image in enumerate(images):
            boxes, labels, scores = self.session.run(None, {"image": _zero_one(image).numpy()})
            item: dict[str, Any] = {
                "boxes": torch.from_numpy(boxes),
                "labels": torch.from_numpy(labels),
                "scores": torch.from_numpy(scores),
            }
            if targets is not None and "image_id" in targets[i]:
                item["image_id"] = int(targets[i]["image_id"])
            out.append(item)
        return out


def _zero_one(image: Tensor) -> Tensor:
    """Float 0..1 on the CPU, as the eager detector converts uint8 images."""
    image = image.cpu()
    return image.float() if image.is_floating_point() else image.float().div_(255)
