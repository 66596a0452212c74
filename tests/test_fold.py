"""Folding frozen BN into convolutions: exact in float64, dtype-keeping, on detectors, timm and under compile."""

import copy

import pytest
import torch
import torchvision
from helpers import randomize_bn, requires_gpu
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn import (
    FoldedConv2d,
    build_resnet,
    fold_frozen_batchnorm,
    unfold_frozen_batchnorm,
)

TENSORS = ("weight", "bias", "running_mean", "running_var")


def reference_and_folded(arch="resnet18", freeze_at=2, norm="frozen"):
    """Two copies of the same network with non-trivial statistics: torchvision's FrozenBN vs folded."""
    plain = randomize_bn(getattr(torchvision.models, arch)(weights=None))
    plain.fc = nn.Identity()
    ref = nn.ModuleDict(dict(zip(("backbone", "head"), build_resnet(arch, None, norm, freeze_at, fold=False))))
    ref.load_state_dict(
        {f"{'backbone' if not k.startswith('layer4') else 'head'}.{k}": v for k, v in plain.state_dict().items()},
        strict=False,
    )
    folded = copy.deepcopy(ref)
    fold_frozen_batchnorm(folded["backbone"])
    fold_frozen_batchnorm(folded["head"])
    return ref, folded


def run(model, x):
    return model["head"](model["backbone"](x))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("freeze_at", [0, 2])
def test_fold_is_exact_forward_and_gradients(arch, freeze_at):
    ref, folded = reference_and_folded(arch, freeze_at)
    assert list(ref.state_dict()) == list(folded.state_dict())
    assert any(isinstance(m, FoldedConv2d) for m in folded.modules())
    x = torch.randn(2, 3, 32, 32)
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        folded.train(mode == "train")
        out_ref, out_fold = run(ref, x), run(folded, x)
        torch.testing.assert_close(out_fold, out_ref, rtol=1e-4, atol=1e-4 * out_ref.abs().max().item())
    (run(ref, x) ** 2).mean().backward()
    (run(folded, x) ** 2).mean().backward()
    grads = {n: p.grad for n, p in folded.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            scale = p.grad.abs().max().item() + 1e-12
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-3, atol=1e-3 * scale)


def _bf16_gradient_errors(model, truth, x):
    """Per-parameter relative L2 error of bf16-autocast gradients against fp32 ones, sorted."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, x).float()
    (out**2).mean().backward()
    grads = dict(model.named_parameters())
    return sorted(((grads[n].grad - g).norm() / g.norm()).item() for n, g in truth.items())


@pytest.mark.parametrize("freeze_at", [0, 2])
def test_fold_keeps_bf16_under_autocast_and_channels_last(freeze_at):
    ref, folded = reference_and_folded("resnet18", freeze_at)
    x = torch.randn(2, 3, 32, 32)
    dtypes = set()
    hooks = [
        m.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
        for m in folded.modules()
        if isinstance(m, FoldedConv2d)
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feat = folded["backbone"](x)
        assert feat.dtype == torch.bfloat16
        assert ref["backbone"](x).dtype == torch.float32  # torchvision's module promotes to fp32
        out_ref = run(ref, x).float()
        out_fold = run(folded, x).float()
    for h in hooks:
        h.remove()
    assert dtypes == {torch.bfloat16}  # every folded conv, trainable or frozen, stays in bf16
    torch.testing.assert_close(out_fold, out_ref, rtol=0.05, atol=0.05 * out_ref.abs().max().item())
    # Gradients: bf16 rounding makes elementwise comparison meaningless, so compare errors against the
    # fp32 gradients. Folding rounds once (W * s cast to bf16); it must be no less precise than
    # torchvision's module, which runs its affine map in fp32. (detectron2's arithmetic, y * s + b in
    # bf16, fails this: median 0.08 vs 0.05 at freeze_at=0.)
    ref.zero_grad()
    (run(ref, x) ** 2).mean().backward()
    truth = {n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad}
    ours = _bf16_gradient_errors(folded, truth, x)
    theirs = _bf16_gradient_errors(ref, truth, x)
    assert ours[-1] <= 1.25 * theirs[-1] and ours[len(ours) // 2] <= 1.25 * theirs[len(theirs) // 2], (ours, theirs)
    ref_cl = ref.to(memory_format=torch.channels_last)
    folded_cl = folded.to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    out = run(folded_cl, xcl)
    torch.testing.assert_close(out, run(ref_cl, xcl), rtol=1e-4, atol=1e-4 * out.abs().max().item())


def test_frozen_conv_cache_is_invalidated_on_load_to_and_inplace_edit():
    """In float64, so that a stale cached weight cannot hide inside float32 rounding of a deep network."""
    _, folded = reference_and_folded("resnet18", 2)
    backbone = folded["backbone"].double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def assert_unfolded_equal(model, x, tol=1e-10):
        expected = unfold_frozen_batchnorm(copy.deepcopy(model))(x)
        torch.testing.assert_close(model(x), expected, rtol=tol, atol=tol * expected.abs().max().item())

    with torch.no_grad():
        before = backbone(x)
        assert backbone.conv1._cache is not None  # the stem is frozen: cached
        # 1) load_state_dict of different values
        state = {k: v.clone() for k, v in backbone.state_dict().items()}
        state["conv1.weight"] *= 2
        state["bn1.running_mean"] += 0.5
        backbone.load_state_dict(state)
        assert_unfolded_equal(backbone, x)
        assert not torch.allclose(backbone(x), before)
        # 2) in-place edit of a BN buffer
        backbone.bn1.running_var.mul_(3)
        assert_unfolded_equal(backbone, x)
        # 3) .to(dtype): new storage
        b32 = backbone.to(torch.float32)
        assert b32(x.float()).dtype == torch.float32
        assert_unfolded_equal(b32, x.float(), tol=1e-4)


def test_fold_is_noop_without_frozen_bn_and_unfold_restores_types():
    backbone, _ = build_resnet("resnet18", norm="train", freeze_at=0, fold=True)
    assert not any(isinstance(m, FoldedConv2d) for m in backbone.modules())
    backbone, _ = build_resnet("resnet18", norm="frozen", fold=True)
    keys = list(backbone.state_dict())
    unfold_frozen_batchnorm(backbone)
    assert not any(isinstance(m, FoldedConv2d) for m in backbone.modules())
    assert {type(m) for m in backbone.modules()} >= {nn.Conv2d, FrozenBatchNorm2d}
    assert list(backbone.state_dict()) == keys


def test_fold_explains_untraceable_models():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="could not trace Branchy.*pairs="):
        fold_frozen_batchnorm(Branchy())
    model = fold_frozen_batchnorm(Branchy(), pairs=[("conv", "bn")])
    assert isinstance(model.conv, FoldedConv2d)


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("size", [3, 9], ids=["weight-larger-than-output", "output-larger-than-weight"])
def test_fold_single_pair_is_exact_in_float64(conv_bias, trainable, size):
    """conv -> FrozenBN folded equals the two modules in float64, with and without a conv bias, for a
    frozen conv (cached fold), a trainable one (fold recomputed each call) and the unfolded route the
    trainable conv takes when its weight outweighs its output; gradients included."""
    torch.manual_seed(0)
    ref = randomize_bn(nn.Sequential(nn.Conv2d(3, 5, 3, bias=conv_bias), FrozenBatchNorm2d(5))).double()
    ref[0].requires_grad_(trainable)
    folded = fold_frozen_batchnorm(copy.deepcopy(ref))
    assert isinstance(folded[0], FoldedConv2d)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    out_ref, out_fold = ref(x), folded(x)
    torch.testing.assert_close(out_fold, out_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, [x, *[p for p in ref.parameters() if p.requires_grad]], g)
    grads_fold = torch.autograd.grad(out_fold, [x, *[p for p in folded.parameters() if p.requires_grad]], g)
    assert len(grads_fold) == 1 + (trainable * (1 + conv_bias))
    for a, b in zip(grads_fold, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the cached path of a frozen conv, and inference of a trainable one
        torch.testing.assert_close(folded(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("hw", [(2, 2), (1, 2), (2, 1), (1, 1)])
def test_fold_on_maps_of_at_most_2x2_is_one_matrix_product_and_exact(hw, conv_bias):
    """A C4 detector's layer4 on small RoIs (2x2 maps): the folded 3x3 conv runs as one matrix product on
    CPU (oneDNN's backward is 4x slower than its forward there); values and gradients equal conv -> BN."""
    torch.manual_seed(0)
    conv_bn = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1, bias=conv_bias), FrozenBatchNorm2d(5), nn.ReLU(inplace=True))
    ref = randomize_bn(conv_bn).double()  # the in-place ReLU writes into the product's output, as in ResNet
    nn.init.normal_(ref[0].weight)  # every tap different: a flipped or shifted kernel cannot pass
    folded = fold_frozen_batchnorm(copy.deepcopy(ref))
    x = torch.randn(3, 6, *hw, dtype=torch.float64, requires_grad=True)
    calls = []
    handle = torch.nn.modules.conv.F.conv2d
    try:  # the matrix-product path is the one taken: no convolution runs
        torch.nn.modules.conv.F.conv2d = lambda *a, **k: calls.append(1) or handle(*a, **k)
        out_fold = folded(x)
    finally:
        torch.nn.modules.conv.F.conv2d = handle
    assert not calls
    out_ref = ref(x)
    torch.testing.assert_close(out_fold, out_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, [x, *ref.parameters()], g)
    grads_fold = torch.autograd.grad(out_fold, [x, *folded.parameters()], g)
    for a, b in zip(grads_fold, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref(x), rtol=1e-12, atol=1e-12)


@requires_gpu
@pytest.mark.gpu
def test_fold_on_cuda_bf16_keeps_dtype_and_matches():
    ref, folded = reference_and_folded("resnet50", 2)
    ref, folded = ref.cuda(), folded.cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert folded["backbone"](x).dtype == torch.bfloat16
        out_ref, out_fold = run(ref, x).float(), run(folded, x).float()
    torch.testing.assert_close(out_fold, out_ref, rtol=0.05, atol=0.05 * out_ref.abs().max().item())
    with torch.no_grad():
        o1, o2 = run(ref.float(), x), run(folded.float(), x)
    torch.testing.assert_close(o2, o1, rtol=1e-2, atol=1e-2 * o1.abs().max().item())  # TF32 may be on


def test_trainable_conv_affine_cache_follows_buffer_edits():
    _, folded = reference_and_folded("resnet18", 2)
    backbone = folded["backbone"].train()
    x = torch.randn(2, 3, 64, 64)
    backbone(x).sum().backward()  # fills the affine caches of the trainable convs
    conv = backbone.layer3[0].conv1
    assert conv.weight.requires_grad and conv._affine_cache is not None
    with torch.no_grad():
        backbone.layer3[0].bn1.running_var.mul_(4)
        backbone.layer3[0].bn1.bias.add_(1)
    out = backbone(x)
    expected = unfold_frozen_batchnorm(copy.deepcopy(backbone))(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_fold_is_exact_on_a_torchvision_detection_model():
    """The detection recipe this package serves: Faster R-CNN on an FPN ResNet with FrozenBatchNorm2d.

    Folding the detector's backbone (found by tracing, no pairs given) changes no state-dict key and,
    in float64, neither the four training losses nor any gradient: the fold is the same function.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    randomize_bn(backbone)
    g = torch.Generator().manual_seed(0)
    ref = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64).double().train()
    folded = copy.deepcopy(ref)
    fold_frozen_batchnorm(folded.backbone)
    assert sum(isinstance(m, FoldedConv2d) for m in folded.modules()) == 20  # every conv of the ResNet-18
    assert list(folded.state_dict()) == list(ref.state_dict())
    images = [torch.rand(3, 64, 64, generator=g, dtype=torch.float64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])}] * 2
    losses = {}
    for name, model in (("ref", ref), ("folded", folded)):
        torch.manual_seed(1)  # the same proposal sampling on both sides
        losses[name] = model(images, targets)
        sum(losses[name].values()).backward()
    for key, value in losses["ref"].items():
        torch.testing.assert_close(losses["folded"][key], value, rtol=1e-10, atol=1e-10)
    folded_params = dict(folded.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(folded_params[name].grad, p.grad, rtol=1e-9, atol=1e-9 * p.grad.abs().max())


def test_fold_under_torch_compile_is_one_graph_and_exact():
    """torch.compile traces the fold's compile-only branches as one graph (no graph break), with the
    same outputs and gradients as torchvision's module, in fp32 and with bf16 out under autocast.

    ``aot_eager`` runs dynamo and AOTAutograd, the parts that see this package's code, without
    inductor's C++ code generation (50 s on this CPU); the gpu-marked fit test covers inductor on CUDA.
    """
    ref, folded = reference_and_folded("resnet18", 2)
    compiled = {k: torch.compile(m, backend="aot_eager", fullgraph=True) for k, m in folded.items()}
    x = torch.randn(2, 3, 32, 32)
    out, expected = run(compiled, x), run(ref, x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    (out**2).mean().backward()
    (expected**2).mean().backward()
    grads = dict(folded.named_parameters())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-3 * p.grad.abs().max().item())
    assert all(m._cache is None for m in folded.modules() if isinstance(m, FoldedConv2d))  # nothing cached
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert run(compiled, x).dtype == torch.bfloat16
    assert list(folded.state_dict()) == list(ref.state_dict())


def test_fold_timm_frozen_bn_act_is_exact_in_float64():
    """timm's freeze_batch_norm_2d gives FrozenBatchNormAct2d layers (affine map, then activation): the
    affine map folds into the conv, the activation stays; outputs and gradients equal in float64, keys
    unchanged, and unfolding gives timm's layers back."""
    timm = pytest.importorskip("timm")
    from timm.utils.model import freeze_batch_norm_2d

    torch.manual_seed(0)
    # timm's own tiny EfficientNet for tests (efficientnet_b0 in float64 takes 100 s here; the guard test uses it)
    ref = freeze_batch_norm_2d(timm.create_model("test_efficientnet", pretrained=False, num_classes=4))
    randomize_bn(ref)
    ref = ref.double()
    folded = fold_frozen_batchnorm(copy.deepcopy(ref))
    assert sum(isinstance(m, FoldedConv2d) for m in folded.modules()) == 13  # every conv -> BN pair
    assert sum(type(m).__name__ == "FoldedFrozenBatchNormAct2d" for m in folded.modules()) == 13
    assert list(folded.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out_ref, out_fold = ref(x), folded(x)
    torch.testing.assert_close(out_fold, out_ref, rtol=1e-10, atol=1e-10 * out_ref.abs().max().item())
    out_ref.square().sum().backward()
    out_fold.square().sum().backward()
    grads = dict(folded.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-9, atol=1e-9 * p.grad.abs().max().item())
    unfolded = unfold_frozen_batchnorm(copy.deepcopy(folded))
    assert type(unfolded.bn1).__name__ == "FrozenBatchNormAct2d"
    torch.testing.assert_close(unfolded(x), out_ref, rtol=1e-12, atol=1e-12)
