import pytest
import torch
import torchvision
from helpers import randomize_bn, write_evil_pickle
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn import ARCHS, WeightsMismatchError, build_resnet, to_batchnorm
from lightning_frozenbn.backbone import STAGES
from lightning_frozenbn.fold import FoldedConv2d


def plain_model(arch: str) -> nn.Module:
    return randomize_bn(getattr(torchvision.models, arch)(weights=None)).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_loads_plain_weights_and_exports(arch, tmp_path):
    plain = plain_model(arch)
    path = tmp_path / f"{arch}.pth"
    torch.save(plain.state_dict(), path)
    backbone, head = build_resnet(arch, weights=str(path), norm="frozen", freeze_at=2, fold=True)
    # the arch argument really selects the arch
    ours = {**backbone.state_dict(), **head.state_dict()}
    theirs = {k: v for k, v in plain.state_dict().items() if not k.startswith("fc.") and "num_batches" not in k}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in [*backbone.modules(), *head.modules()])
    assert head.out_channels == plain.fc.in_features and backbone.out_channels == plain.fc.in_features // 2
    x = torch.randn(2, 3, 32, 32)
    plain.fc = nn.Identity()
    with torch.no_grad():
        expected = plain(x)
        got = head(backbone(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # export round trip: plain nn.BatchNorm2d again, loads into torchvision, same function
    export = to_batchnorm(nn.ModuleDict({"b": backbone, "h": head}))
    state = {**export["b"].state_dict(), **export["h"].state_dict()}
    fresh = getattr(torchvision.models, arch)(weights=None)
    fresh.fc = nn.Identity()
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("freeze_at", range(6))
def test_freeze_at_sets_exactly_the_expected_flags(freeze_at):
    backbone, head = build_resnet("resnet18", norm="train", freeze_at=freeze_at, fold=False)
    modules = {**dict(backbone.named_children()), **dict(head.named_children())}
    for stage_index, stage in enumerate(STAGES):
        frozen = stage_index < freeze_at
        for name in stage:
            params = list(modules[name].parameters())
            # a frozen stage's BN is frozen BN whatever `norm` says (detectron2's rule): no params left
            if name == "bn1":
                assert isinstance(modules[name], FrozenBatchNorm2d) == frozen
                continue
            assert params and all(p.requires_grad != frozen for p in params), (name, freeze_at)
            has_plain_bn = any(type(m) is nn.BatchNorm2d for m in modules[name].modules())
            assert has_plain_bn != frozen or name == "conv1"


@pytest.mark.parametrize("norm", ["frozen", "eval", "train", "sync"])
def test_norm_policies_select_layers(norm):
    backbone, head = build_resnet("resnet18", norm=norm, freeze_at=0, fold=True)
    types = {type(m).__name__ for m in [*backbone.modules(), *head.modules()]}
    expected = {
        "frozen": "FoldedFrozenBatchNorm2d",
        "eval": "StatsFrozenBatchNorm2d",
        "train": "BatchNorm2d",
        "sync": "SyncBatchNorm",
    }[norm]
    assert expected in types
    if norm != "frozen":  # fold is a no-op where BN is not frozen
        assert not any(isinstance(m, FoldedConv2d) for m in backbone.modules())


@pytest.mark.parametrize("drop_nbt", [True, False])
@pytest.mark.parametrize("drop_fc", [True, False])
@pytest.mark.parametrize("norm", ["frozen", "eval", "train"])
def test_weights_with_and_without_bookkeeping_keys(tmp_path, drop_nbt, drop_fc, norm):
    plain = plain_model("resnet18")
    state = {
        k: v
        for k, v in plain.state_dict().items()
        if not (drop_nbt and k.endswith("num_batches_tracked")) and not (drop_fc and k.startswith("fc."))
    }
    torch.save(state, tmp_path / "w.pth")
    backbone, _ = build_resnet("resnet18", weights=str(tmp_path / "w.pth"), norm=norm, freeze_at=0)
    torch.testing.assert_close(backbone.layer2[0].bn1.running_var, plain.layer2[0].bn1.running_var)


def test_weight_enum_names_are_resolved_without_download():
    from lightning_frozenbn.backbone import _torchvision_weights

    assert _torchvision_weights("resnet50", "DEFAULT") is torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert _torchvision_weights("resnet50", "IMAGENET1K_V1") is torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    with pytest.raises(ValueError, match="for resnet18 .IMAGENET1K_V2.*Expected one of: IMAGENET1K_V1, DEFAULT"):
        build_resnet("resnet18", weights="IMAGENET1K_V2")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "resnet05"}, "Unknown arch 'resnet05'. Did you mean 'resnet50'.*resnet18, resnet34"),
        ({"norm": "frozn"}, "Unknown norm 'frozn'. Did you mean 'frozen'.*eval, train, sync"),
        ({"freeze_at": 6}, "freeze_at=6 is out of range: expected an integer 0..5"),
        ({"freeze_at": -1}, "freeze_at=-1 is out of range"),
        ({"freeze_at": True}, "freeze_at=True is out of range"),
        ({"weights": "missing/dir/w.pth"}, "weights file 'missing/dir/w.pth' does not exist"),
    ],
)
def test_bad_arguments_name_the_value_and_the_fix(kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        build_resnet(**{"arch": "resnet18", **kwargs})


def test_wrong_arch_lists_missing_and_unexpected_keys(tmp_path):
    torch.save(plain_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsMismatchError, match=r"do not fit arch='resnet50': 165 missing: layer1.0.conv3.weight"):
        build_resnet("resnet50", weights=str(tmp_path / "r18.pth"))
    torch.save(plain_model("resnet50").state_dict(), tmp_path / "r50.pth")
    with pytest.raises(
        WeightsMismatchError, match=r"do not fit arch='resnet18': \d+ unexpected: layer1.0.conv3.weight"
    ):
        build_resnet("resnet18", weights=str(tmp_path / "r50.pth"))
    with pytest.raises(WeightsMismatchError, match=r"wrong shape: .*\(file .*, model .*\)"):
        build_resnet("resnext50_32x4d", weights=str(tmp_path / "r50.pth"))


def test_files_that_are_not_state_dicts(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        build_resnet("resnet18", weights=str(tmp_path / "list.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="Refused to load .*junk.pth.*corrupt"):
        build_resnet("resnet18", weights=str(tmp_path / "junk.pth"))
    torch.save(plain_model("resnet18").state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Could not read weights file .*truncated.pth.*truncated"):
        build_resnet("resnet18", weights=str(tmp_path / "truncated.pth"))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    write_evil_pickle(tmp_path / "evil.pth", marker, key="conv1.weight")
    with pytest.raises(ValueError, match="Refused to load"):
        build_resnet("resnet18", weights=str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_eval_resize_follows_the_weights_preset():
    from lightning_frozenbn.backbone import eval_resize_for

    assert eval_resize_for("resnet50", "IMAGENET1K_V2", 224) == 232  # not 256: V2 was evaluated at 232
    assert eval_resize_for("resnet50", "IMAGENET1K_V1", 224) == 256
    assert eval_resize_for("resnet50", "DEFAULT", 112) == 116  # scaled to the crop size in use
    assert eval_resize_for("resnet18", None, 224) is None and eval_resize_for("resnet18", "my/r18.pth", 224) is None
