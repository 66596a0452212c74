"""The fused-epilogue experiment: each folded conv's shift, ReLU and residual add in cuDNN's fused epilogue."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from lightning_frozenbn import FoldedConv2d


# ---- an experiment for the next GPU run: the folded shift and ReLU in cuDNN's conv epilogue -----
# Eager PyTorch adds a conv's bias in a separate kernel (a read+write pass over the output), then the
# ReLU (another), then the residual add (another). cuDNN can fuse all three into the convolution
# (aten::cudnn_convolution_relu / cudnn_convolution_add_relu: forward only, CUDA only, used by FX's
# inference fusion). This variant wraps them in an autograd Function so training can use them, and
# re-routes each ResNet block's forward through it. It is measured on CUDA only; on CPU the same
# Function runs a composite forward, which is how the tests check its backward.
class ConvBiasReLU(torch.autograd.Function):
    """``relu(conv(x, w) + b [+ z])`` in one cuDNN call on CUDA; the backward reuses the saved output."""

    @staticmethod
    def forward(ctx, x, w, b, z, stride, padding, dilation, groups):
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
    def backward(ctx, grad):
        x, w, y = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad = torch.ops.aten.threshold_backward(grad, y, 0)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, stride, padding, dilation, False, [0] * len(stride), groups, mask
        )
        return gx, gw, None, grad if ctx.needs_input_grad[3] else None, None, None, None, None


def _conv_bias_relu(conv, x, z=None):
    weight, bias = conv.folded_weight_and_bias(x)
    if torch.is_autocast_enabled(x.device.type):  # autocast does not know these ops: cast by hand
        dtype = torch.get_autocast_dtype(x.device.type)
        x, z = x.to(dtype), None if z is None else z.to(dtype)
    return ConvBiasReLU.apply(x, weight, bias, z, conv.stride, conv.padding, conv.dilation, conv.groups)


def _fused_basic_block(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    return _conv_bias_relu(self.conv2, _conv_bias_relu(self.conv1, x), identity)


def _fused_bottleneck(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = _conv_bias_relu(self.conv2, _conv_bias_relu(self.conv1, x))
    return _conv_bias_relu(self.conv3, out, identity)


def fuse_epilogues(model: nn.Module) -> nn.Module:
    """Route every folded ResNet block through :class:`ConvBiasReLU` (same parameters, same keys)."""
    for block in model.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            convs = [block.conv1, block.conv2, *([block.conv3] if isinstance(block, Bottleneck) else [])]
            if all(isinstance(c, FoldedConv2d) for c in convs):
                fused = _fused_bottleneck if isinstance(block, Bottleneck) else _fused_basic_block
                block.forward = types.MethodType(fused, block)
    return model
