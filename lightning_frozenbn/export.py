"""Export for deployment: every frozen BN folded into a plain conv, ONNX and torch.export, checked against eager."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn.classifier import FrozenBNClassifier
from lightning_frozenbn.epilogue import unfuse_epilogues
from lightning_frozenbn.errors import InputError
from lightning_frozenbn.files import write_atomically
from lightning_frozenbn.fold import FoldedConv2d, FoldedFrozenBatchNorm2d, fold_frozen_batchnorm
from lightning_frozenbn.norm import StatsFrozenBatchNorm2d, convert_frozen_batchnorm

__all__ = [
    "ExportError",
    "ExportingTrainer",
    "ExportMismatch",
    "check_onnx",
    "check_program",
    "deployable",
    "export_onnx",
    "export_program",
]

Format = Literal["onnx", "pt2"]
RTOL, ATOL = 1e-3, 1e-5  # torchvision's ONNX tests compare onnxruntime with eager at these tolerances


class ExportError(InputError):
    """The model, an option or the output path cannot be exported as asked (one line: what and the fix)."""


class ExportMismatch(RuntimeError):
    """The exported file computes something other than the eager model (max differences in the message)."""


def _plain_conv(folded: FoldedConv2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` holding the folded weight and bias (the frozen BN gone from the graph)."""
    with torch.no_grad():
        weight, bias = folded._fold(None)
    conv = nn.Conv2d(
        folded.in_channels,
        folded.out_channels,
        folded.kernel_size,
        folded.stride,
        folded.padding,
        folded.dilation,
        folded.groups,
        bias=True,
        padding_mode=folded.padding_mode,
    )
    conv.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return conv


def deployable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for export: eval mode, float32 on the CPU, every frozen BN folded into its conv.

    Frozen BN (FrozenBatchNorm2d, and the stats-frozen ``norm="eval"`` layers, whose statistics and
    affine are constants once trained) is an affine map per channel: it is folded into the preceding
    convolution, which becomes a plain ``nn.Conv2d`` with the folded weight and bias, and the BN becomes
    ``nn.Identity``. What is written then has no normalisation node and no separate scale/shift for a
    frozen BN. Trainable BN (``norm="train"``) stays a BatchNorm in eval mode. The model itself is not
    touched.
    """
    copy_ = copy.deepcopy(model).cpu().float().eval()
    copy_ = unfuse_epilogues(copy_)
    for name, module in list(copy_.named_modules()):
        if isinstance(module, StatsFrozenBatchNorm2d):
            _set(copy_, name, convert_frozen_batchnorm(module))
    fold_frozen_batchnorm(copy_)  # pairs not folded yet (fold=False models, converted layers)
    for name, module in list(copy_.named_modules()):
        if isinstance(module, FoldedConv2d):
            _set(copy_, name, _plain_conv(module))
        elif type(module) is FoldedFrozenBatchNorm2d:
            _set(copy_, name, nn.Identity())
    left = [n for n, m in copy_.named_modules() if type(m) is FrozenBatchNorm2d]
    if left:
        raise ExportError(
            f"{len(left)} frozen BN layers follow no convolution and cannot be folded ({', '.join(left[:3])}); "
            "export keeps only folded frozen BN."
        )
    copy_.requires_grad_(False)
    return copy_


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def check_output(path: Path) -> None:
    """Refuse an output folder that is a file, before anything is exported."""
    if path.exists() and not path.is_dir():
        raise ExportError(f"output {str(path)!r} is a file, not a folder: choose a folder for the exported files.")


def export_onnx(
    model: nn.Module, example: Tensor, path: str | Path, metadata: dict[str, Any], opset: int | None = None
) -> Path:
    """Write ``model`` (from :func:`deployable`) as ONNX with a dynamic batch, ``metadata`` in its properties.

    Written whole or not at all (a temporary file renamed into place). An opset the model cannot be
    exported at is an :class:`ExportError` naming it.
    """
    import onnx

    buffer = io.BytesIO()
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamic_shapes=(_dynamic(),),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    except Exception as err:  # the exporter raises many types; the user's fix is the same
        raise ExportError(
            f"ONNX export failed{f' at opset {opset}' if opset else ''}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. Try another --opset (default: the exporter's), "
            "or export the torch.export program only."
        ) from err
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:  # the exporter logs a failed conversion and keeps its own opset
        raise ExportError(
            f"ONNX export failed at opset {opset}: the exporter could not convert the model to it (it produced "
            f"opset {written}). Use --opset {written} or leave it unset."
        )
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save_model(proto, buffer)
    path = Path(path)
    write_atomically(path, lambda f: f.write(buffer.getvalue()))
    return path


def _dynamic() -> dict[int, Any]:
    """The batch dynamic; the image size is the one the classifier was trained and evaluated at.

    Why not the size too: at small sizes (the quickstart's 32 px) layer4's map is 1x1 and the exporter
    specialises on it; a classifier is deployed at its evaluation crop anyway.
    """
    return {0: torch.export.Dim("batch", min=1, max=1024)}


def export_program(model: nn.Module, example: Tensor, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``model`` as a ``torch.export`` program (``.pt2``, dynamic batch), ``metadata`` as an extra file."""
    program = torch.export.export(model, (example,), dynamic_shapes=(_dynamic(),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"lightning_frozenbn.json": json.dumps(metadata)})
    path = Path(path)
    write_atomically(path, lambda f: f.write(buffer.getvalue()))
    return path


def _compare(name: str, got: Tensor, expected: Tensor, rtol: float, atol: float) -> float:
    diff = (got - expected).abs()
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        worst = (diff - rtol * expected.abs()).max().item()
        raise ExportMismatch(
            f"{name} differs from the eager model beyond rtol {rtol} / atol {atol}: max |diff| "
            f"{diff.max().item():.3g} (over tolerance by {worst:.3g}). The exported file is not trustworthy."
        )
    return diff.max().item()


def check_onnx(
    path: str | Path, model: nn.Module, inputs: Sequence[Tensor], rtol: float = RTOL, atol: float = ATOL
) -> list[float]:
    """Run the ONNX file with onnxruntime (CPU) on each input and compare with ``model``: the max |diff| of each.

    Raises:
        ExportMismatch: an output outside ``rtol``/``atol`` of the eager model's.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    diffs = []
    for x in inputs:
        (got,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            expected = model(x)
        diffs.append(_compare(f"ONNX output at input {tuple(x.shape)}", torch.from_numpy(got), expected, rtol, atol))
    return diffs


def check_program(
    path: str | Path, model: nn.Module, inputs: Sequence[Tensor], rtol: float = RTOL, atol: float = ATOL
) -> list[float]:
    """Load the ``.pt2`` program and compare it with ``model`` on each input, as :func:`check_onnx` does."""
    program = torch.export.load(str(path)).module()
    diffs = []
    for x in inputs:
        with torch.no_grad():
            got, expected = program(x), model(x)
        diffs.append(_compare(f"torch.export output at input {tuple(x.shape)}", got, expected, rtol, atol))
    return diffs


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata an exported ONNX file carries (class names, category ids, the source checkpoint)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


def example_inputs(datamodule: Any, image_size: int) -> list[Tensor]:
    """Two inputs to check on: the data's first validation batch as the model sees it, and its first image alone.

    The batch is normalised as the data module normalises it for the model: two batch sizes, real
    images. Random inputs of ``image_size`` where there is no data module.
    """
    x = None
    if datamodule is not None and hasattr(datamodule, "val_dataloader"):
        datamodule.prepare_data()
        datamodule.setup("validate")
        batch = next(iter(datamodule.val_dataloader()))
        batch = datamodule.on_after_batch_transfer(
            datamodule.transfer_batch_to_device(batch, torch.device("cpu"), 0), 0
        )
        x = batch[0].float().contiguous()
    if x is None:
        x = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return [x, x[:1].clone()]


class ExportingTrainer(Trainer):
    """Lightning's Trainer with one more entry point, :meth:`export`: the CLI's ``export`` subcommand."""

    def export(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output: str = "export",
        formats: list[Format] = ("onnx", "pt2"),
        opset: int | None = None,
        check: bool = True,
    ) -> dict[str, Any]:
        """Export the model with every frozen BN folded (ONNX and/or ``torch.export``), checked against eager.

        Each file is run on the data's first validation batch and on one image at another size, and
        compared with the eager model at torchvision's ONNX tolerances (rtol 1e-3, atol 1e-5): a mismatch
        stops the command. Class names (and COCO category ids) travel in the files' metadata.

        Args:
            model: the model (with ``--ckpt_path``, rebuilt from the checkpoint's hyperparameters).
            datamodule: the data whose validation images the check runs on (random images without it).
            ckpt_path: the checkpoint whose weights are exported.
            output: the folder the files are written to (``model.onnx``, ``model.pt2``).
            formats: ``onnx``, ``pt2`` or both.
            opset: the ONNX opset (default: the exporter's).
            check: run each file and compare with the eager model (on by default).
        """
        from lightning_frozenbn.checkpoint import AtomicCheckpointIO, record_of
        from lightning_frozenbn.data.contract import LabelledDataModule

        folder = Path(output)
        check_output(folder)
        if not isinstance(model, FrozenBNClassifier):
            raise ExportError(
                f"{type(model).__name__} cannot be exported yet: export covers the classifier; the detectors' "
                "export (dynamic image sizes through the RPN and RoI heads) is not built."
            )
        checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path) if ckpt_path is not None else {}
        if checkpoint:
            model.load_state_dict(checkpoint["state_dict"])
        record = record_of(checkpoint)
        names = datamodule.classes if isinstance(datamodule, LabelledDataModule) else record["class_names"]
        metadata = {
            "class_names": names,
            "category_ids": record["category_ids"],
            "checkpoint": ckpt_path,
            "input": "float32 (N, 3, H, W), RGB 0..1 normalised with the ImageNet mean and std",
        }
        inputs = example_inputs(datamodule, getattr(datamodule, "image_size", 224))
        deploy = deployable(model)
        eager = copy.deepcopy(model).cpu().float().eval()  # what the files are checked against: the model as trained
        folder.mkdir(parents=True, exist_ok=True)
        written: dict[str, Any] = {}
        for fmt in dict.fromkeys(formats):
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
