"""The fused epilogue: the Function's backward against autograd in float64, whole blocks against the unfused model."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_bn
from torch import nn

from lightning_frozenbn import build_resnet, fold_frozen_batchnorm, fuse_epilogues, to_batchnorm
from lightning_frozenbn.epilogue import ConvBiasReLU, FusedBottleneck, cudnn_epilogue_available


def reference(x, w, b, z, stride, padding, groups):
    y = F.conv2d(x, w, b, stride, padding, 1, groups)
    return (y if z is None else y + z).relu()


@pytest.mark.parametrize(
    "stride, groups, residual",
    [(1, 1, True), (2, 1, False), (1, 4, True)],  # the bottleneck's conv3 + add, a strided conv, ResNeXt groups
    ids=["add", "stride2", "groups"],
)
def test_function_forward_and_every_gradient_match_autograd_in_float64(stride, groups, residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(12, 8 // groups, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, generator=g, requires_grad=True)
    out = (9 - 1) // stride + 1
    z = torch.randn(2, 12, out, out, dtype=torch.float64, generator=g, requires_grad=True) if residual else None
    args = ((stride, stride), (1, 1), (1, 1), groups)
    fused = ConvBiasReLU.apply(x, w, b, z, *args)
    ref = reference(x, w, b, z, (stride, stride), (1, 1), groups)
    assert torch.equal(fused, ref)
    grad = torch.randn(fused.shape, dtype=torch.float64, generator=g)
    inputs = [t for t in (x, w, b, z) if t is not None]
    got = torch.autograd.grad(fused, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for name, a, e in zip("xwbz", got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)

    def function(x, w, b, *z):
        return ConvBiasReLU.apply(x, w, b, z[0] if z else None, *args)

    assert torch.autograd.gradcheck(function, (x, w, b, *([z] if residual else [])))


def model_pair(arch):
    """A folded model (trainable layer2+, random BN statistics) and a copy with the epilogue forced on CPU."""
    backbone, head = build_resnet(arch, None, "frozen", 2, fold=False)
    model = randomize_bn(nn.Sequential(backbone, head)).double()
    fold_frozen_batchnorm(model)
    fused = copy.deepcopy(model)
    return model, fused, fuse_epilogues(fused, mode="always")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_fused_blocks_compute_the_unfolded_models_function_and_gradients(arch):
    model, fused, count = model_pair(arch)
    assert count == {"resnet18": 8, "resnet50": 16, "resnext50_32x4d": 16}[arch]
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(m))
    try:
        out = fused(x)
    finally:
        handle.remove()
    block_relus = [
        m.relu for m in fused.modules() if isinstance(m, torchvision.models.resnet.BasicBlock | FusedBottleneck)
    ]
    assert len(block_relus) == count and not any(r in calls for r in block_relus)  # fused: inside the Function
    ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    ref.square().sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    fused_params = dict(fused.named_parameters())
    for name, p in trainable:
        atol = 1e-11 * p.grad.abs().max().item()  # float64: summation order only
        torch.testing.assert_close(fused_params[name].grad, p.grad, rtol=1e-9, atol=atol)


def test_cpu_default_runs_torchvisions_forward_and_export_gives_plain_blocks():
    backbone, head = build_resnet("resnet50")
    blocks = [m for m in backbone.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert blocks and all(type(m) is FusedBottleneck and m.epilogue == "cuda" for m in blocks)
    x = torch.randn(1, 3, 32, 32)
    relus = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: relus.append(m) if isinstance(m, nn.ReLU) else None
    )
    try:
        backbone(x)
    finally:
        handle.remove()
    assert relus  # on CPU the unfused path (nn.ReLU modules) runs
    off, _ = build_resnet("resnet50", fused_epilogue=False)
    assert not any(isinstance(m, FusedBottleneck) for m in off.modules())
    exported = to_batchnorm(backbone)
    assert all(
        type(m) is torchvision.models.resnet.Bottleneck for m in exported.modules() if "Bottleneck" in type(m).__name__
    )


def test_a_block_with_an_unfolded_conv_or_a_user_subclass_is_not_fused():
    class MyBlock(torchvision.models.resnet.BasicBlock):
        pass

    model = nn.Sequential(MyBlock(8, 8), torchvision.models.resnet.BasicBlock(8, 8)).eval()
    assert fuse_epilogues(model, mode="always") == 1  # the user's subclass keeps its own forward
    assert type(model[0]) is MyBlock
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(model(x), model[1](model[0](x)))  # unfolded: torchvision's forward
    with pytest.raises(ValueError, match="mode='fast' is invalid"):
        fuse_epilogues(model, mode="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn_epilogue_available(), reason="needs CUDA with cuDNN's fused epilogue ops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_the_cudnn_epilogue_matches_the_unfused_model(dtype):
    from lightning_frozenbn.epilogue import epilogue_mismatch

    torch.backends.cudnn.allow_tf32 = False
    # the first-use self-check on this GPU and dtype: the fused op must pass it, or the model runs unfused
    assert epilogue_mismatch(torch.device("cuda"), dtype) is None
    ref_model, _ = build_resnet("resnet50", None, "frozen", 2, fold=True, fused_epilogue=False)
    ref_model = randomize_bn(ref_model).cuda().to(memory_format=torch.channels_last)
    fused = fuse_epilogues(copy.deepcopy(ref_model))  # the default mode: fused on CUDA
    x = torch.randn(4, 3, 96, 96, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is torch.bfloat16):
        out, ref = fused(x), ref_model(x)
    assert out.dtype == ref.dtype == dtype
    tol = 2e-2 if dtype is torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())
    out.float().square().mean().backward()
    ref.float().square().mean().backward()
    fused_params = dict(fused.named_parameters())
    for name, p in ref_model.named_parameters():
        if p.requires_grad:
            scale = p.grad.abs().max().item() + 1e-12
            torch.testing.assert_close(fused_params[name].grad, p.grad, rtol=5 * tol, atol=5 * tol * scale, msg=name)


def _no_bias_kernel(x, w, b, z, stride, padding, dilation, groups):
    """A wrong fused op, as a broken cuDNN build could be: the folded bias left out."""
    y = torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, groups)
    return (y if z is None else y + z).relu_()


def _raising_kernel(*args):
    raise RuntimeError("CUDNN_STATUS_NOT_SUPPORTED")


@pytest.mark.parametrize(
    ("planted", "match"),
    [
        (None, None),
        (_no_bias_kernel, r"composite\) on cpu in torch.float64: the forward \(without residual\) differs by"),
        (_raising_kernel, r"the fused op raised RuntimeError: CUDNN_STATUS_NOT_SUPPORTED"),
    ],
    ids=["right-op", "wrong-op", "raising-op"],
)
def test_the_fused_path_checks_itself_once_per_device_and_dtype_and_runs_unfused_when_wrong(
    monkeypatch, planted, match
):
    import warnings

    from lightning_frozenbn import epilogue

    monkeypatch.setattr(epilogue, "_CHECKED", {})
    if planted is not None:
        monkeypatch.setattr(epilogue, "_kernel", planted)
    model, fused, _ = model_pair("resnet18")
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    applied = []
    monkeypatch.setattr(
        epilogue.ConvBiasReLU, "apply", lambda *a, _f=epilogue.ConvBiasReLU.apply: applied.append(1) or _f(*a)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fused(x)
        fused(x)  # checked once: no second warning
    ours = [w for w in caught if "fused convolution epilogue" in str(w.message)]
    torch.testing.assert_close(out, model(x), rtol=1e-9, atol=1e-9)  # right either way: fused, or unfused
    if planted is None:
        assert not ours and len(applied) > 16  # the check's calls and the blocks' own
    else:
        assert len(ours) == 1 and re.search(match, str(ours[0].message)), [str(w.message) for w in ours]
        assert "Running unfused" in str(ours[0].message)
