"""A CPU kernel for 3x3 convolutions on maps of at most 2x2 (a C4 detector's per-region layer4), as matrix products."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["conv3x3_on_tiny_map", "fits_tiny_map_kernel"]


def fits_tiny_map_kernel(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``conv(x)`` is a 3x3, stride-1, padding-1 convolution on a CPU map of at most 2x2 (eager mode)."""
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()  # compiled graphs keep the convolution
        and x.dim() == 4
        and x.shape[-2] <= 2
        and x.shape[-1] <= 2
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def conv3x3_on_tiny_map(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv2d(x, weight, bias, padding=1)`` through :class:`_Conv3x3OnTinyMap` (profiled under its own name)."""
    with torch.profiler.record_function("lightning_frozenbn::conv3x3_on_tiny_map"):
        return _Conv3x3OnTinyMap.apply(x, weight, bias)


@functools.lru_cache(maxsize=8)
def _tap_index(height: int, width: int) -> Tensor:
    """The kernel tap (``3 * row + column``) linking each output position p to each input position q.

    For a 3x3, padding-1 convolution on a map of at most 2x2 the kernel covers the map, so every pair
    has one; ordered (p, q).
    """
    pos = [(y, x) for y in range(height) for x in range(width)]
    return torch.tensor([(q[0] - p[0] + 1) * 3 + (q[1] - p[1] + 1) for p in pos for q in pos])


def _dense_taps(weight: Tensor, height: int, width: int) -> Tensor:
    """The 3x3 kernel as a dense ``(O*P) x (P*C)`` matrix for a map of P positions.

    Rows are (out channel, out position), columns (in position, in channel): rows of C channels are
    copied whole (an index over the kernel's last two dimensions would gather element by element).
    """
    o, c, p = weight.shape[0], weight.shape[1], height * width
    taps = weight.permute(0, 2, 3, 1).reshape(o, 9, c)
    return taps.index_select(1, _tap_index(height, width).to(weight.device)).view(o * p, p * c)


class _Conv3x3OnTinyMap(torch.autograd.Function):
    """``conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel on a map of at most 2x2, as matrix products.

    Why: the per-region layer4 of a C4 detector with small RoIs (the CPU quickstart's RoIAlign 4 gives
    2x2 maps) spends most of its step in oneDNN's convolution backward, which on these maps runs at a
    quarter of its forward's rate (profile in ``scripts/benchmark_results/quickstart-2026-11-27b.md`` and
    ``docs/performance.md``). The kernel covers the whole map, so the convolution is a dense matrix
    gathered from its taps (no zero-padding taps computed) and BLAS runs forward and backward at full
    rate. The dense matrix (1.8x the kernel) is rebuilt in backward instead of saved: what autograd
    keeps is the input and the weight, as for the convolution. Exact up to summation order (tested).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: D102
        n, c, h, w = x.shape
        p = h * w
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype
        flat, dense = x.permute(0, 2, 3, 1).reshape(n, p * c), _dense_taps(weight, h, w)
        y = flat @ dense.t() if bias is None else torch.addmm(bias.repeat_interleave(p), flat, dense.t())
        return y.view(n, -1, h, w).clone()  # not a view: the next layer's in-place ReLU may write into it

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: D102
        x, weight = ctx.saved_tensors
        n, c, h, w = x.shape
        o, p = weight.shape[0], h * w
        g = grad.reshape(n, o * p)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _dense_taps(weight, h, w).to(g.dtype)).view(n, h, w, c).permute(0, 3, 1, 2).to(x.dtype)
        if ctx.needs_input_grad[1]:
            flat = x.permute(0, 2, 3, 1).reshape(n, p * c).to(g.dtype)
            pairs = (g.t() @ flat).view(o, p * p, c)  # d loss / d dense, (out, in) position pairs
            # each pair adds to the one tap that links its positions
            taps = torch.zeros(o, 9, c, dtype=pairs.dtype, device=pairs.device)
            taps.index_add_(1, _tap_index(h, w).to(pairs.device), pairs)
            grad_w = taps.view(o, 3, 3, c).permute(0, 3, 1, 2).to(weight.dtype, memory_format=torch.contiguous_format)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.view(n, o, p).sum(dim=(0, 2)).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b
