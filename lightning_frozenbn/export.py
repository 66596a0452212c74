"""Export for deployment: every frozen BN folded into a plain conv, ONNX and torch.export, checked against eager."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn.epilogue import unfuse_epilogues
from lightning_frozenbn.errors import InputError
from lightning_frozenbn.files import write_atomically
from lightning_frozenbn.fold import FoldedConv2d, FoldedFrozenBatchNorm2d, fold_frozen_batchnorm
from lightning_frozenbn.norm import StatsFrozenBatchNorm2d, convert_frozen_batchnorm

__all__ = [
    "ExportError",
    "ExportMismatch",
    "check_detector_onnx",
    "check_onnx",
    "check_program",
    "deployable",
    "export_detector_onnx",
    "export_onnx",
    "export_program",
    "read_metadata",
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
        raise _failed(err, opset, "Try another --opset (default: the exporter's), or --formats [pt2].") from err
    return _save_onnx(program.model_proto, path, metadata, opset)


def _save_onnx(proto: Any, path: str | Path, metadata: dict[str, Any], opset: int | None) -> Path:
    """Check the opset written is the one asked for, add ``metadata``, write the file whole or not at all."""
    import onnx

    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:  # the exporter logs a failed conversion and keeps its own opset
        raise ExportError(
            f"ONNX export failed at opset {opset}: the exporter could not convert the model to it (it produced "
            f"opset {written}). Use --opset {written} or leave it unset."
        )
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    buffer = io.BytesIO()
    onnx.save_model(proto, buffer)
    path = Path(path)
    write_atomically(path, lambda f: f.write(buffer.getvalue()))
    return path


def _failed(err: Exception, opset: int | None, fix: str) -> ExportError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    first = first if len(first) < 200 else first[:200] + "..."  # the tracer quotes whole graphs
    where = f" at opset {opset}" if opset else ""
    return ExportError(f"ONNX export failed{where}: {type(err).__name__}: {first} {fix}")


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


DETECTOR_OPSET = 17  # torchvision registers nms and roi_align for the TorchScript exporter from opset 11


def export_detector_onnx(
    model: nn.Module, example: Tensor, path: str | Path, metadata: dict[str, Any], opset: int | None = None
) -> Path:
    """Write a detector (a :class:`~lightning_frozenbn.detection.deployed.DeployedDetector`) as ONNX, any image size.

    Input ``image``: float ``(3, H, W)`` RGB 0..1, ``H`` and ``W`` dynamic; outputs ``boxes``, ``labels``,
    ``scores``, as many rows as detections. Exported by tracing (torch's TorchScript exporter, as
    torchvision's own ONNX tests export Faster R-CNN): the dynamo exporter and ``torch.export`` stop at
    the data-dependent sizes after the RPN's NMS (``GuardOnDataDependentSymNode``, measured with torch
    2.14). Written whole or not at all.
    """
    import warnings

    import onnx

    buffer = io.BytesIO()
    dynamic = {"image": {1: "height", 2: "width"}, **{k: {0: "detections"} for k in ("boxes", "labels", "scores")}}
    try:
        with warnings.catch_warnings():  # tracer warnings on Python ints torchvision computes from sizes
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                buffer,
                opset_version=opset or DETECTOR_OPSET,
                dynamo=False,
                input_names=["image"],
                output_names=["boxes", "labels", "scores"],
                dynamic_axes=dynamic,
            )
    except Exception as err:  # the exporter raises many types; the user's fix is the same
        raise _failed(err, opset, f"Detectors export at --opset 11 to 20 (default {DETECTOR_OPSET}).") from err
    return _save_onnx(onnx.load_model_from_string(buffer.getvalue()), path, metadata, opset)


def check_detector_onnx(
    path: str | Path,
    model: nn.Module,
    images: Sequence[Tensor],
    score_thresh: float,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> list[float]:
    """Run a detector's ONNX file on each image and compare with the eager ``model``'s detections.

    The same detections scoring at least ``score_thresh``: labels equal, boxes and scores within
    ``rtol``/``atol`` (:func:`~lightning_frozenbn.detection.deployed.match_detections`). Returns the max
    |diff| of the boxes (pixels) on each image.

    Raises:
        ExportMismatch: other detections, labels, or boxes/scores outside the tolerance.
    """
    import onnxruntime

    from lightning_frozenbn.detection.deployed import match_detections

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = []
    for image in images:
        boxes, labels, scores = session.run(None, {"image": image.numpy()})
        got = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "scores": torch.from_numpy(scores)}
        with torch.no_grad():
            (expected,) = model([image])
        matched = match_detections(got, expected, score_thresh, rtol, atol)
        if isinstance(matched, str):
            raise ExportMismatch(
                f"ONNX detections on a {tuple(image.shape)} image differ from the eager model's: {matched}. "
                "The exported file is not trustworthy."
            )
        diffs.append(matched[0])
    return diffs


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata an exported ONNX file carries (class names, category ids, the source checkpoint)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in proto.metadata_props}
