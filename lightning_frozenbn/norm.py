"""BatchNorm policies: the stats-frozen layer, BN <-> FrozenBatchNorm2d conversion, calibrate_bn."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn.epilogue import unfuse_epilogues
from lightning_frozenbn.fold import unfold_frozen_batchnorm

log = logging.getLogger(__name__)

__all__ = [
    "StatsFrozenBatchNorm2d",
    "calibrate_bn",
    "convert_frozen_batchnorm",
    "to_batchnorm",
]


class StatsFrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics, whatever the module mode.

    This is the ``norm="eval"`` policy (mmdetection's ``norm_eval``): the affine ``weight`` and
    ``bias`` stay trainable parameters, but ``running_mean``/``running_var`` never move. Unlike the
    usual "call ``.eval()`` on the BN layers" recipe, a stray ``model.train()`` cannot undo it,
    because the forward never reads ``self.training``. The state-dict keys are those of
    ``nn.BatchNorm2d``, so torchvision checkpoints load unchanged.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` with the running statistics and the (trainable) affine map."""
        self._check_input_dim(input)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d and SyncBatchNorm in ``module`` by a FrozenBatchNorm2d.

    Works on any model (detectron2's ``convert_frozen_batchnorm`` shape: a leaf is returned as a
    new module, a container is edited in place). Unlike detectron2 and timm, the statistics and the
    affine map are *cloned*, not shared, so freezing a copy never aliases the source model's
    storage, and ``eps`` is carried over (models with ``eps=1e-3`` stay exact).

    Args:
        module: a model or a single BN layer.

    Returns:
        The converted module (a new object if ``module`` itself was a BN layer).

    Raises:
        ValueError: a BN layer keeps no running statistics (``track_running_stats=False``), so
            there is nothing to freeze.
    """
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        if module.running_mean is None or module.running_var is None:
            raise ValueError(
                f"Cannot freeze {module}: it was built with track_running_stats=False, so it has no "
                "running statistics to freeze. Build it with track_running_stats=True or use "
                "norm='train'."
            )
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight = module.weight.detach().clone()
                frozen.bias = module.bias.detach().clone()
            else:
                frozen.weight = torch.ones_like(module.running_mean)
                frozen.bias = torch.zeros_like(module.running_mean)
            frozen.running_mean = module.running_mean.detach().clone()
            frozen.running_var = module.running_var.detach().clone()
        return frozen
    for name, child in module.named_children():
        new_child = convert_frozen_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def to_batchnorm(module: nn.Module) -> nn.Module:
    """Export: turn frozen and folded layers back into plain ``nn.Conv2d`` + ``nn.BatchNorm2d``.

    The result's state dict loads into a plain ``torchvision.models.<arch>()`` (it has
    ``num_batches_tracked`` again) and computes the same function in eval mode. Tensors are cloned.
    """
    module = unfuse_epilogues(unfold_frozen_batchnorm(module))
    if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)) and not isinstance(module, nn.SyncBatchNorm):
        plain = nn.BatchNorm2d(module.weight.shape[0], eps=module.eps)
        plain = plain.to(device=module.running_mean.device, dtype=module.running_mean.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(plain, name).copy_(getattr(module, name))
        plain.eval()
        return plain
    for name, child in module.named_children():
        new_child = to_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def calibrate_bn(
    model: nn.Module,
    batches: Iterable[Tensor],
    num_batches: int,
    reduce: Callable[..., Tensor] | None = None,
) -> int:
    """Re-estimate the statistics of every frozen BN layer as a population average, then keep them frozen.

    Why: frozen BN normalises with whatever statistics it was given. When the data is far from the
    pretraining data (or the weights are random) those statistics are wrong at every layer. This is
    "precise BN": the model runs ``num_batches`` batches with each frozen BN layer normalising by the
    batch's own statistics (as in training), while the exact per-channel mean and variance of each
    layer's input are accumulated in float64 over all pixels of all batches; no exponential moving
    average, no dependence on batch order. Under DDP pass ``reduce=trainer.strategy.reduce`` so the
    sums are added over ranks and every rank ends with the same statistics.

    Args:
        model: the model; folded pairs are unfolded (the caller may fold again afterwards).
        batches: an iterable of input tensors, already on the model's device.
        num_batches: how many batches to use (fewer if ``batches`` runs out).
        reduce: a ``reduce(tensor, reduce_op="sum")`` across processes, e.g. a Lightning strategy's.

    Returns:
        The number of BN layers calibrated.

    Raises:
        ValueError: ``batches`` yields nothing.
    """
    unfold_frozen_batchnorm(model)
    layers = [m for m in model.modules() if isinstance(m, (FrozenBatchNorm2d, StatsFrozenBatchNorm2d))]
    if not layers:
        return 0
    stats: dict[nn.Module, list[Tensor]] = {}

    def normalise_by_batch(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = args[0].double()
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        acc = stats.setdefault(module, [torch.zeros_like(mean), torch.zeros_like(mean), torch.zeros_like(mean[:1])])
        n = x.numel() / x.shape[1]
        acc[0] += mean * n
        acc[1] += (var + mean**2) * n
        acc[2] += n
        y = (x - mean[None, :, None, None]) * (var[None, :, None, None] + module.eps).rsqrt()
        y = y * module.weight.double()[None, :, None, None] + module.bias.double()[None, :, None, None]
        return y.to(output.dtype)

    modes = {m: m.training for m in model.modules()}
    handles = [layer.register_forward_hook(normalise_by_batch) for layer in layers]
    used = 0
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                if used >= num_batches:
                    break
                model(x)
                used += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    if used == 0:
        raise ValueError("calibrate_bn got no batches: the training dataloader is empty.")
    with torch.no_grad():
        for layer in layers:
            total, total_sq, count = stats[layer]
            if reduce is not None:
                total, total_sq, count = (reduce(t, reduce_op="sum") for t in (total, total_sq, count))
            mean = total / count
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            layer.running_var.copy_((total_sq / count - mean**2).clamp_min(0).to(layer.running_var.dtype))
    return len(layers)
