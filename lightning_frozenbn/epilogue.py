"""cuDNN's fused convolution epilogue (folded shift, residual add, ReLU) for folded ResNet blocks."""

from __future__ import annotations

import functools
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
    "fuse_epilogues",
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
        if x.is_cuda:
            if z is None:
                y = torch.ops.aten.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)
            else:
                y = torch.ops.aten.cudnn_convolution_add_relu(x, w, z, 1.0, b, stride, padding, dilation, groups)
        else:
            y = F.conv2d(x, w, b, stride, padding, dilation, groups)
            y = (y if z is None else y + z).relu_()
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
        return (
            all(isinstance(c, FoldedConv2d) and c.padding_mode == "zeros" for c in self._convs())
            and all(type(n) is FoldedFrozenBatchNorm2d for n in norms)
            and isinstance(self.relu, nn.ReLU)
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
