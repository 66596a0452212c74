"""cuDNN's fused convolution epilogue (folded shift, residual add, ReLU) for folded ResNet blocks."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from lightning_frozenbn.fold import FoldedConv2d, FoldedFrozenBatchNorm2d

__all__ = [
    "ConvBiasReLU",
    "FusedBasicBlock",
    "FusedBottleneck",
    "cudnn_epilogue_available",
    "epilogue_mismatch",
    "fuse_epilogues",
    "fused_epilogue_works",
    "unfuse_epilogues",
]

Mode = Literal["cuda", "always", "off"]


@functools.cache
def cudnn_epilogue_available() -> bool:
    """True where cuDNN's fused convolution + bias (+ add) + ReLU ops exist and CUDA is usable."""
    ops = torch.ops.aten
    have = hasattr(ops, "cudnn_convolution_relu") and hasattr(ops, "cudnn_convolution_add_relu")
    return have and torch.cuda.is_available() and torch.backends.cudnn.is_available()


class ConvBiasReLU(torch.autograd.Function):
    """``relu(conv(x, w) + b [+ z])``: one cuDNN call on CUDA, the composite reference elsewhere.

    Why: eager PyTorch runs a folded convolution's bias, the residual add and the ReLU as separate
    passes over the output (each a read and a write of the activation); cuDNN applies them in the
    convolution's epilogue (``aten::cudnn_convolution_relu`` / ``cudnn_convolution_add_relu``, forward
    only). This Function gives them a backward: the ReLU's mask comes from the saved output (the
    pre-activation is never stored), then one ``convolution_backward`` for input and weight; the bias
    and residual gradients are the masked gradient itself (summed over batch and space for the bias).
    On other devices the forward is the same arithmetic composed of ordinary ops: that reference path
    is what the CPU tests check the backward against, in float64.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        z: Tensor | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> Tensor:
        y = _kernel(x, w, b, z, stride, padding, dilation, groups)
        ctx.save_for_backward(x, w, y)
        ctx.conv = (stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        x, w, y = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad = torch.ops.aten.threshold_backward(grad, y, 0)  # the ReLU: zero where the output is 0
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, stride, padding, dilation, False, [0] * len(stride), groups, mask
        )
        gb = grad.sum(dim=(0, 2, 3)).to(w.dtype) if ctx.needs_input_grad[2] else None
        gz = grad if ctx.needs_input_grad[3] else None
        return gx, gw, gb, gz, None, None, None, None


def _kernel(
    x: Tensor,
    w: Tensor,
    b: Tensor,
    z: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """The forward of :class:`ConvBiasReLU`: cuDNN's fused op on CUDA, the composite reference elsewhere."""
    if x.is_cuda:
        if z is None:
            return torch.ops.aten.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)
        return torch.ops.aten.cudnn_convolution_add_relu(x, w, z, 1.0, b, stride, padding, dilation, groups)
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    return (y if z is None else y + z).relu_()


# Tolerances of the first-use check, per dtype: TF32/cuDNN algorithm choice in float32, rounding in 16-bit.
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
_CHECKED: dict[tuple[str, int | None, torch.dtype], bool] = {}  # (device type, index, dtype) -> fused works


def epilogue_mismatch(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the fused op once on a small random problem and compare it with the composite reference.

    The forward and every gradient (input, weight, bias, residual), with and without the residual. Returns
    None where they agree within the dtype's tolerance (relative to the reference's largest value), or what
    went wrong: the op raised, or which output differs by how much.
    """
    g = torch.Generator().manual_seed(0)  # a generator of its own: the run's random streams stay untouched
    shapes = {"x": (2, 8, 9, 9), "w": (8, 8, 3, 3), "b": (8,), "z": (2, 8, 9, 9)}
    base = {k: torch.randn(v, generator=g, dtype=torch.float64).to(device, dtype) for k, v in shapes.items()}
    args = ((1, 1), (1, 1), (1, 1), 1)
    tolerance = _TOLERANCE.get(dtype, 5e-2)
    for residual in (False, True):
        outputs = []
        for fused in (True, False):
            t = {k: v.clone().requires_grad_(True) for k, v in base.items()}
            z = t["z"] if residual else None
            try:
                with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                    if fused:
                        y = ConvBiasReLU.apply(t["x"], t["w"], t["b"], z, *args)
                    else:
                        y = F.conv2d(t["x"], t["w"], t["b"], *args)
                        y = (y if z is None else y + z).relu()
                    y.backward(torch.ones_like(y))
            except Exception as error:  # noqa: BLE001 - any failure of the op means: do not use it
                return f"the fused op raised {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            grads = [t[k].grad for k in ("x", "w", "b")] + ([t["z"].grad] if residual else [])
            outputs.append([y, *grads])
        for what, got, ref in zip(("forward", "input grad", "weight grad", "bias grad", "residual grad"), *outputs):
            scale = ref.double().abs().max().clamp_min(1.0)
            diff = ((got.double() - ref.double()).abs().max() / scale).item()
            if not diff <= tolerance:  # NaN too
                with_z = "with" if residual else "without"
                return f"the {what} ({with_z} residual) differs by {diff:.3g} relative (tolerance {tolerance:g})"
    return None


def fused_epilogue_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused epilogue matched the reference on this device and dtype: checked once, at first use.

    Why: it is the CUDA default but a private cuDNN op whose results depend on the cuDNN build and the GPU.
    Where it fails or disagrees, one warning names the op, the dtype and the difference, and the blocks run
    torchvision's (unfused) forward on that device and dtype from then on.
    """
    key = (device.type, device.index, dtype)
    if key not in _CHECKED:
        problem = epilogue_mismatch(device, dtype)
        _CHECKED[key] = problem is None
        if problem is not None:
            op = "aten::cudnn_convolution_relu / cudnn_convolution_add_relu" if device.type == "cuda" else "composite"
            warnings.warn(
                f"lightning_frozenbn: the fused convolution epilogue ({op}) on {device} in {dtype}: {problem}. "
                "Running unfused (torchvision's forward) on this device and dtype. Set `fused_epilogue: false` "
                "to skip the fused path and this check.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _CHECKED[key]


def _conv_bias_relu(conv: FoldedConv2d, x: Tensor, z: Tensor | None = None) -> Tensor:
    weight, bias = conv.folded_weight_and_bias(x)
    if torch.is_autocast_enabled(x.device.type):  # autocast does not know these ops: cast as it would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, z = x.to(dtype), None if z is None else z.to(dtype)
    return ConvBiasReLU.apply(x, weight, bias, z, conv.stride, conv.padding, conv.dilation, conv.groups)


class _Fused:
    """The shared decision: fused when every conv of the block is folded and the mode and device allow it."""

    epilogue: Mode = "cuda"

    def _convs(self) -> list[nn.Module]:
        raise NotImplementedError

    def _fusable(self, x: Tensor) -> bool:
        if isinstance(x, torch.fx.Proxy):  # traced by torch.fx (fold_frozen_batchnorm): torchvision's graph
            return False
        if self.epilogue == "off" or torch.compiler.is_compiling():  # compiled: the compiler fuses the epilogue
            return False
        if self.epilogue == "cuda" and not (x.is_cuda and cudnn_epilogue_available()):
            return False
        norms = [getattr(self, f"bn{i}") for i in range(1, len(self._convs()) + 1)]
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return (
            all(isinstance(c, FoldedConv2d) and c.padding_mode == "zeros" for c in self._convs())
            and all(type(n) is FoldedFrozenBatchNorm2d for n in norms)
            and isinstance(self.relu, nn.ReLU)
            and fused_epilogue_works(x.device, dtype)
        )


class FusedBasicBlock(_Fused, BasicBlock):
    """torchvision's BasicBlock whose folded convolutions end in cuDNN's fused epilogue (same modules and keys)."""

    def _convs(self) -> list[nn.Module]:
        return [self.conv1, self.conv2]

    def forward(self, x: Tensor) -> Tensor:
        """BasicBlock's function; fused where :meth:`_fusable` says so, torchvision's forward otherwise."""
        if not self._fusable(x):
            return super().forward(x)
        identity = x if self.downsample is None else self.downsample(x)
        return _conv_bias_relu(self.conv2, _conv_bias_relu(self.conv1, x), identity)


class FusedBottleneck(_Fused, Bottleneck):
    """torchvision's Bottleneck whose folded convolutions end in cuDNN's fused epilogue (same modules and keys)."""

    def _convs(self) -> list[nn.Module]:
        return [self.conv1, self.conv2, self.conv3]

    def forward(self, x: Tensor) -> Tensor:
        """Bottleneck's function; fused where :meth:`_fusable` says so, torchvision's forward otherwise."""
        if not self._fusable(x):
            return super().forward(x)
        identity = x if self.downsample is None else self.downsample(x)
        out = _conv_bias_relu(self.conv2, _conv_bias_relu(self.conv1, x))
        return _conv_bias_relu(self.conv3, out, identity)


def fuse_epilogues(model: nn.Module, mode: Mode = "cuda") -> int:
    """Give every ResNet block of ``model`` the fused-epilogue forward, in place; return how many.

    The blocks keep their modules, parameters, buffers and state-dict keys (only their class changes,
    to a subclass of torchvision's), so checkpoints move freely between fused and unfused models. A
    block fuses only while all its convolutions are folded (:func:`fold_frozen_batchnorm`); otherwise,
    and under ``torch.compile`` (where the compiler fuses the pointwise epilogue itself), it runs
    torchvision's forward.

    Args:
        model: any module containing torchvision ``BasicBlock`` / ``Bottleneck`` blocks.
        mode: ``"cuda"`` fused on CUDA where cuDNN has the ops (the default); ``"always"`` also on other
            devices through the composite reference (tests); ``"off"`` never.
    """
    if mode not in ("cuda", "always", "off"):
        raise ValueError(f"mode={mode!r} is invalid: expected 'cuda', 'always' or 'off'.")
    count = 0
    for block in model.modules():
        if type(block) is Bottleneck:  # a subclass of the user keeps its own forward
            block.__class__ = FusedBottleneck
        elif type(block) is BasicBlock:
            block.__class__ = FusedBasicBlock
        if isinstance(block, _Fused):
            block.epilogue = mode
            count += 1
    return count


def unfuse_epilogues(model: nn.Module) -> nn.Module:
    """Give every fused block its torchvision class back, in place (export to plain torchvision)."""
    for block in model.modules():
        if type(block) is FusedBottleneck:
            block.__class__ = Bottleneck
        elif type(block) is FusedBasicBlock:
            block.__class__ = BasicBlock
        vars(block).pop("epilogue", None)
    return model
