"""Frozen BN folded into the convolution before it: FoldedConv2d and the conv->BN pairing."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn.kernels import conv3x3_on_tiny_map, fits_tiny_map_kernel

log = logging.getLogger(__name__)

__all__ = [
    "FoldedConv2d",
    "FoldedFrozenBatchNorm2d",
    "FoldedFrozenBatchNormAct2d",
    "fold_frozen_batchnorm",
    "frozen_affine",
    "unfold_frozen_batchnorm",
]


def frozen_affine(bn: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """Return the per-channel ``(scale, shift)`` that a FrozenBatchNorm2d applies: ``y = x * scale + shift``.

    The arithmetic is torchvision's, in the buffers' dtype, so a folded convolution computes the same
    numbers as the unfolded module up to the rounding of one multiplication.
    """
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bn.bias - bn.running_mean * scale


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose affine map is applied by the convolution before it.

    It keeps its four buffers (and so its state-dict keys and the guard's view of them) but its
    forward is the identity: the paired :class:`FoldedConv2d` already produced the normalised output.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x`` unchanged: the preceding :class:`FoldedConv2d` applied this layer."""
        return x

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps}, folded into the conv)"


class FoldedFrozenBatchNormAct2d(FoldedFrozenBatchNorm2d):
    """timm's ``FrozenBatchNormAct2d`` with its affine map folded into the conv: only ``act(drop(x))`` is left.

    timm's layer computes torchvision's frozen affine map and then its dropout and activation, so the
    affine part folds exactly like :class:`FoldedFrozenBatchNorm2d` and the rest runs here. Same buffers
    and submodules, so the same state-dict keys; :func:`unfold_frozen_batchnorm` gives timm's layer back.
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__(source.weight.shape[0], source.eps)
        self.drop = source.drop
        self.act = source.act
        object.__setattr__(self, "_source_type", copy.deepcopy(source))  # a template, to unfold into

    def forward(self, x: Tensor) -> Tensor:
        """Dropout and activation of timm's layer; the preceding :class:`FoldedConv2d` did the affine map."""
        return self.act(self.drop(x))

    def unfolded(self) -> nn.Module:
        """Timm's ``FrozenBatchNormAct2d`` holding this layer's buffers and submodules."""
        layer = copy.deepcopy(self._source_type)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(layer, name, getattr(self, name))
        layer.drop, layer.act = self.drop, self.act
        return layer


def _is_timm_frozen_bn_act(module: nn.Module) -> bool:
    """Timm's FrozenBatchNormAct2d: torchvision's frozen affine map, then ``act(drop(x))`` (timm.layers.norm_act)."""
    cls = type(module)
    return cls.__name__ == "FrozenBatchNormAct2d" and cls.__module__.startswith("timm.") and hasattr(module, "act")


def _is_foldable_norm(module: nn.Module) -> bool:
    """Frozen norm layers whose arithmetic is known exactly: torchvision's FrozenBatchNorm2d and timm's Act variant."""
    return type(module) is FrozenBatchNorm2d or _is_timm_frozen_bn_act(module)


def _geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """The constructor arguments of a Conv2d like ``conv`` (its parameters are then shared, not built)."""
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


class FoldedConv2d(nn.Conv2d):
    """Conv2d followed by a FrozenBatchNorm2d, computed as one convolution: ``conv(x, W * s) + b``.

    Why: torchvision's FrozenBatchNorm2d is two extra elementwise passes over every activation and,
    under bf16 autocast, multiplies by fp32 buffers so every activation after it becomes fp32. Frozen
    BN is a per-output-channel affine map, so it folds into the convolution exactly. For a trainable
    convolution ``W * s`` is recomputed each call (a tensor the size of the weight, not of the
    activation) so autograd reaches ``W``; for a frozen one the folded weight is cached, keyed on the
    storage and version counter of every tensor it came from, so ``load_state_dict``, ``.to()``, an
    in-place edit or a resume can never leave a stale weight behind.

    The module shares its ``weight``/``bias`` parameters with the original convolution and reads the
    batch-norm buffers from the paired :class:`FoldedFrozenBatchNorm2d`, which stays where torchvision
    puts it: state-dict keys and values are unchanged by folding.
    """

    def __init__(self, conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
        super().__init__(**_geometry(conv), device="meta")
        self.weight = conv.weight
        self.bias = conv.bias
        self.train(conv.training)
        # Not a registered submodule: the BN buffers must keep their own state-dict keys.
        object.__setattr__(self, "_folded_bn", bn)
        self._cache_key: tuple | None = None
        self._cache: tuple[Tensor, Tensor] | None = None
        self._affine_key: tuple | None = None
        self._affine_cache: tuple[Tensor, Tensor] | None = None

    def _sources(self) -> list[Tensor]:
        bn = self._folded_bn
        tensors = [self.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        return tensors if self.bias is None else [*tensors, self.bias]

    @staticmethod
    def _key(tensors: list[Tensor], dtype: torch.dtype | None) -> tuple:
        return (dtype, *((t.device, t.dtype, t.data_ptr(), t._version) for t in tensors))

    def _affine(self, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """The BN's ``(scale, shift)`` as a ``(C, 1, 1, 1)`` weight multiplier and a conv bias.

        Cached outside torch.compile: the buffers are frozen, so a trainable conv's step costs one
        multiplication ``W * scale`` instead of five small kernels. The key holds each buffer's
        storage and version counter, so a reload or in-place edit recomputes it.
        """
        if torch.compiler.is_compiling():
            return self._compute_affine(dtype)
        key = self._key(self._sources()[1:5], dtype)
        if key != self._affine_key or self._affine_cache is None:
            with torch.no_grad():
                self._affine_cache = self._compute_affine(dtype)
            self._affine_key = key
        return self._affine_cache

    def _compute_affine(self, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        scale, shift = frozen_affine(self._folded_bn)
        shift = shift if dtype is None else shift.to(dtype)
        return scale.to(self.weight.dtype).reshape(-1, 1, 1, 1), shift

    def _fold(self, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        scale, shift = self._affine(dtype if self.bias is None else None)
        weight = self.weight * scale
        bias = shift if self.bias is None else self.bias * scale.flatten() + shift
        if dtype is not None:
            weight, bias = weight.to(dtype), bias.to(dtype)
        return weight, bias

    def folded_weight_and_bias(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the convolution weight and bias with the frozen BN folded in, cached when frozen."""
        dtype = None
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        needs_grad = torch.is_grad_enabled() and (
            self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        )
        if needs_grad or torch.compiler.is_compiling():
            return self._fold(dtype)
        key = self._key(self._sources(), dtype)
        if key != self._cache_key or self._cache is None:
            with torch.no_grad():
                self._cache = self._fold(dtype)
            self._cache_key = key
        return self._cache

    def _fold_is_cheaper(self, x: Tensor) -> bool:
        """For a trainable conv in full precision: fold only where the weight is smaller than the output.

        Folding costs elementwise passes over the weight (``W * s`` and its backward); the unfolded
        path costs passes over the output activation. Under autocast folding always wins (it keeps
        the activation in bf16), and a frozen conv's fold is cached, so this rule only matters for
        fp32 training of small inputs, where layer4's weights outweigh its activations (CPU, 64 px).
        """
        if torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
            return True
        out_elements = (
            x.shape[0] * self.out_channels * (x.shape[-2] // self.stride[0]) * (x.shape[-1] // self.stride[1])
        )
        return self.weight.numel() <= out_elements

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if fits_tiny_map_kernel(self, input):  # the CPU kernel for 3x3 convolutions on maps of at most 2x2
            return conv3x3_on_tiny_map(input, weight, bias)
        return super()._conv_forward(input, weight, bias)

    def forward(self, input: Tensor) -> Tensor:
        """Convolve with the folded weight; the result equals ``bn(conv(input))``."""
        if self.weight.requires_grad and torch.is_grad_enabled() and not self._fold_is_cheaper(input):
            scale, shift = self._affine(None)
            y = self._conv_forward(input, self.weight, self.bias)
            return y * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
        weight, bias = self.folded_weight_and_bias(input)
        return self._conv_forward(input, weight, bias)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cache"], state["_cache_key"] = None, None
        state["_affine_cache"], state["_affine_key"] = None, None
        return state

    def extra_repr(self) -> str:
        """Conv2d's repr, marked as folded."""
        return super().extra_repr() + ", folded with frozen BN"


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps FrozenBatchNorm2d (a torchvision module, not torch.nn) as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        norm_layer = isinstance(m, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm)) or _is_foldable_norm(m)
        return norm_layer or super().is_leaf_module(m, module_qualified_name)


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Find ``(conv, bn)`` module names where a Conv2d's output feeds only a foldable frozen norm layer.

    Traced with torch.fx so the pairing comes from the real data flow, not from naming habits.
    """
    try:
        graph = _LeafTracer().trace(module)
    except Exception as err:  # fx raises many types for untraceable control flow
        raise ValueError(
            f"fold_frozen_batchnorm could not trace {type(module).__name__} with torch.fx ({err}). "
            "Pass the pairs explicitly: fold_frozen_batchnorm(model, pairs=[('conv1', 'bn1'), ...])."
        ) from err
    modules = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_foldable_norm(modules[node.target]):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and type(modules[src.target]) is nn.Conv2d
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def fold_frozen_batchnorm(module: nn.Module, pairs: list[tuple[str, str]] | None = None) -> nn.Module:
    """Fold every ``Conv2d -> frozen BN`` pair of ``module`` into one convolution, in place.

    Folded are the frozen norm layers whose arithmetic is known exactly: torchvision's
    FrozenBatchNorm2d (also what timm's ``freeze_batch_norm_2d`` puts in place of a BatchNorm2d) and
    timm's FrozenBatchNormAct2d (its affine map folds; its activation stays, see
    :class:`FoldedFrozenBatchNormAct2d`). Parameters and buffers are shared, not copied, so
    state-dict keys and values, optimizer references and the guard's fingerprints are unchanged.
    BatchNorm2d layers (norm "eval", "train", "sync") are left alone: their statistics or affine map
    change during training. Frozen norm layers that are not fed by a convolution alone, or of another
    class, are left as they are and counted in a log line (logger ``lightning_frozenbn.fold``).

    Args:
        module: any model; its conv/BN pairs are found by tracing it with torch.fx.
        pairs: explicit ``(conv_name, bn_name)`` pairs for models that torch.fx cannot trace.

    Returns:
        ``module``, edited in place.
    """
    foldable = [n for n, m in module.named_modules() if _is_foldable_norm(m)]
    if pairs is None:
        pairs = _conv_bn_pairs(module) if foldable else []
    modules = dict(module.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if type(conv) is not nn.Conv2d or not _is_foldable_norm(bn):
            raise ValueError(
                f"Cannot fold ({conv_name!r}, {bn_name!r}): expected an nn.Conv2d and a FrozenBatchNorm2d (or "
                f"timm's FrozenBatchNormAct2d), found {type(conv).__name__} and {type(bn).__name__}."
            )
        if conv.out_channels != bn.weight.shape[0]:
            raise ValueError(
                f"Cannot fold ({conv_name!r}, {bn_name!r}): the conv has {conv.out_channels} output "
                f"channels but the BN normalises {bn.weight.shape[0]}."
            )
        if _is_timm_frozen_bn_act(bn):
            folded_bn: FoldedFrozenBatchNorm2d = FoldedFrozenBatchNormAct2d(bn)
        else:
            folded_bn = FoldedFrozenBatchNorm2d(bn.weight.shape[0], bn.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(folded_bn, name, getattr(bn, name))
        folded_bn.train(bn.training)
        _set_submodule(module, bn_name, folded_bn)
        _set_submodule(module, conv_name, FoldedConv2d(conv, folded_bn))
    left = [n for n in foldable if n not in {bn for _, bn in pairs}]
    if left:
        log.info(
            f"fold_frozen_batchnorm: folded {len(pairs)} conv -> frozen BN pairs; left {len(left)} frozen BN layers "
            f"unfolded (not fed by an nn.Conv2d alone): {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}"
        )
    return module


def unfold_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`fold_frozen_batchnorm` in place: plain ``nn.Conv2d`` + ``FrozenBatchNorm2d`` again."""
    for name, child in list(module.named_modules()):
        if not name:
            continue
        if isinstance(child, FoldedConv2d):
            conv = nn.Conv2d(**_geometry(child), device="meta")
            conv.weight, conv.bias = child.weight, child.bias
            conv.train(child.training)
            _set_submodule(module, name, conv)
        elif isinstance(child, FoldedFrozenBatchNormAct2d):
            bn = child.unfolded()
            bn.train(child.training)
            _set_submodule(module, name, bn)
        elif isinstance(child, FoldedFrozenBatchNorm2d):
            bn = FrozenBatchNorm2d(child.weight.shape[0], child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                setattr(bn, key, getattr(child, key))
            bn.train(child.training)
            _set_submodule(module, name, bn)
    return module
