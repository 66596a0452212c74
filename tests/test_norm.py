"""BN policies: conversion to FrozenBatchNorm2d, the stats-frozen layer, calibrate_bn."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn import (
    StatsFrozenBatchNorm2d,
    calibrate_bn,
    convert_frozen_batchnorm,
    fold_frozen_batchnorm,
)


def run(model, x):
    return model["head"](model["backbone"](x))


TENSORS = ("weight", "bias", "running_mean", "running_var")


def test_convert_any_model_clones_stats_and_carries_eps():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.SyncBatchNorm(4)
    )
    randomize_bn(model)
    model[4].running_var.fill_(2.0)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model[:4](x)
    expected = (expected - model[4].running_mean[:, None, None]) / (model[4].running_var[:, None, None] + 1e-5).sqrt()
    expected = expected * model[4].weight[:, None, None] + model[4].bias[:, None, None]
    sources = {i: model[i] for i in (1, 4)}  # the BN modules themselves, not copies of them
    values = {i: {k: getattr(bn, k).detach().clone() for k in TENSORS} for i, bn in sources.items()}
    frozen = convert_frozen_batchnorm(model)
    assert isinstance(frozen[1], FrozenBatchNorm2d) and isinstance(frozen[4], FrozenBatchNorm2d)
    assert frozen[1].eps == 1e-3
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-5)
    # cloned, not shared: no storage in common with the source BN, and editing the frozen copy in
    # place leaves the source's tensors as they were
    for i, bn in sources.items():
        for key in TENSORS:
            assert getattr(frozen[i], key).untyped_storage().data_ptr() != getattr(bn, key).untyped_storage().data_ptr()
            getattr(frozen[i], key).add_(1)
            assert torch.equal(getattr(bn, key), values[i][key]), (i, key)


def test_convert_refuses_bn_without_running_stats():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        convert_frozen_batchnorm(nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)))


def test_stats_frozen_bn_normalises_with_running_stats_in_train_mode_and_trains_affine():
    bn = randomize_bn(nn.Sequential(StatsFrozenBatchNorm2d(4)))[0].double().train()
    stats = {k: getattr(bn, k).detach().clone() for k in ("running_mean", "running_var", "num_batches_tracked")}
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64) * 3 + 2  # batch statistics far from the running ones
    out = bn(x)
    expected = F.batch_norm(
        x, stats["running_mean"], stats["running_var"], bn.weight, bn.bias, training=False, eps=bn.eps
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.pow(2).sum().backward()
    for key, value in stats.items():
        assert torch.equal(getattr(bn, key), value), key
    w_grad, b_grad = torch.autograd.grad(expected.pow(2).sum(), (bn.weight, bn.bias))
    torch.testing.assert_close(bn.weight.grad, w_grad)
    torch.testing.assert_close(bn.bias.grad, b_grad)


def test_calibrate_bn_computes_population_statistics():
    conv = nn.Conv2d(3, 6, 3, bias=False)
    model = nn.Sequential(conv, FrozenBatchNorm2d(6), nn.ReLU())
    fold_frozen_batchnorm(model)
    batches = [torch.randn(4, 3, 12, 12) * (i + 1) + i for i in range(5)]
    with torch.no_grad():
        feats = torch.cat([conv(b).permute(1, 0, 2, 3).reshape(6, -1) for b in batches], dim=1).double()
    n = calibrate_bn(model, iter(batches), num_batches=5)
    assert n == 1
    bn = model[1]
    torch.testing.assert_close(bn.running_mean.double(), feats.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), feats.var(1, unbiased=False), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no batches"):
        calibrate_bn(model, iter([]), num_batches=3)


def test_calibrate_bn_through_several_layers_matches_a_float64_reference():
    """Three frozen BN layers in a row (one behind a residual add): each layer's statistics are those of
    its input while the layers before it normalise by batch statistics, as in training (precise BN)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), FrozenBatchNorm2d(6)
            self.c2, self.b2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), FrozenBatchNorm2d(6)
            self.c3, self.b3 = nn.Conv2d(6, 4, 1), FrozenBatchNorm2d(4)

        def forward(self, x, bn=None):
            bn = bn or (lambda layer, h: layer(h))
            h = torch.relu(bn(self.b1, self.c1(x)))
            h = torch.relu(bn(self.b2, self.c2(h)) + h)
            return bn(self.b3, self.c3(h))

    model = randomize_bn(Net())
    reference = copy.deepcopy(model).double()
    batches = [torch.randn(4, 3, 10, 10) * (i + 1) + i for i in range(4)]
    inputs = {}

    def batch_norm(layer, h):  # normalise by the batch, record what the layer saw
        inputs.setdefault(layer, []).append(h.permute(1, 0, 2, 3).reshape(h.shape[1], -1))
        return F.batch_norm(h, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)

    with torch.no_grad():
        for b in batches:
            reference(b.double(), batch_norm)
    fold_frozen_batchnorm(model, pairs=[("c1", "b1"), ("c2", "b2"), ("c3", "b3")])
    assert calibrate_bn(model, iter(batches), num_batches=4) == 3
    for name in ("b1", "b2", "b3"):
        seen = torch.cat(inputs[getattr(reference, name)], dim=1)
        layer = getattr(model, name)
        torch.testing.assert_close(layer.running_mean.double(), seen.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var.double(), seen.var(1, unbiased=False), rtol=1e-5, atol=1e-6)
