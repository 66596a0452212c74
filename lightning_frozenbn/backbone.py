"""Build a torchvision ResNet with a BN policy, split it into backbone (stem..layer3) and head (layer4)."""

from __future__ import annotations

import difflib
import os
import pickle
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn.epilogue import fuse_epilogues
from lightning_frozenbn.errors import WeightsDownloadError, WeightsMismatchError
from lightning_frozenbn.fold import fold_frozen_batchnorm
from lightning_frozenbn.norm import StatsFrozenBatchNorm2d, convert_frozen_batchnorm

# The statistics every torchvision ImageNet weight was trained with: inputs are normalised by them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "ARCHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMS",
    "ResNetBackbone",
    "ResNetHead",
    "WeightsMismatchError",
    "build_resnet",
    "key_mismatch",
    "load_trunk_state_dict",
    "read_weights_file",
]

ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
Norm = Literal["frozen", "eval", "train", "sync"]
NORMS: tuple[str, ...] = get_args(Norm)  # one source: the CLI shows the Literal, the check reads its values
# detectron2's freeze_at: stage k (1-based) is frozen when k <= freeze_at.
STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
_NORM_LAYERS = {
    "frozen": FrozenBatchNorm2d,
    "eval": StatsFrozenBatchNorm2d,
    "train": nn.BatchNorm2d,
    "sync": nn.BatchNorm2d,
}


class ResNetBackbone(nn.Module):
    """Stem (conv1, bn1, relu, maxpool) and layer1..layer3 of a torchvision ResNet.

    Returns the C4 feature map (stride 16), the input of detection and re-id heads. Submodule names
    are torchvision's, so the state dict of backbone + head is the ResNet's minus ``fc``.
    """

    def __init__(self, resnet: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.out_channels: int = resnet.fc.in_features // 2

    def forward(self, x: Tensor) -> Tensor:
        """Return the C4 feature map, shape ``(N, out_channels, H/16, W/16)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Return C2, C3 and C4 (strides 4, 8, 16): the maps a feature pyramid takes, with layer4's C5."""
        c2 = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c3 = self.layer2(c2)
        return [c2, c3, self.layer3(c3)]


class ResNetHead(nn.Module):
    """layer4 and global pooling: C4 map (or C4 regions) in, ``(N, out_channels)`` embedding out.

    ``pool="max"`` max-pools instead of averaging, as the person-search box heads do (a region's
    strongest response, not its mean, identifies it). The pooling module keeps torchvision's name
    ``avgpool`` either way; it holds no state.
    """

    def __init__(self, resnet: torchvision.models.ResNet, pool: Literal["avg", "max"] = "avg") -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"head pool={pool!r} is invalid: expected 'avg' or 'max'.")
        self.layer4 = resnet.layer4
        self.avgpool = resnet.avgpool if pool == "avg" else nn.AdaptiveMaxPool2d((1, 1))
        self.out_channels: int = resnet.fc.in_features

    def forward(self, x: Tensor) -> Tensor:
        """Return the pooled embedding."""
        return torch.flatten(self.avgpool(self.layer4(x)), 1)


def _choice_error(what: str, value: Any, choices: tuple[str, ...] | list[str], fix: str) -> ValueError:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown {what} {value!r}.{hint} Expected one of: {', '.join(choices)}. {fix}")


def _written_by(path: Path) -> str:
    """For ``runs/<name>/checkpoints/x.ckpt`` with a ``configs/<name>.yaml`` here: the command that writes it."""
    parts = path.parts
    if path.suffix != ".ckpt" or len(parts) < 3 or parts[-2] != "checkpoints":
        return ""
    config = Path("configs") / f"{parts[-3]}.yaml"
    if not config.is_file():
        return " It is a checkpoint that a fit of this package writes: run that fit first."
    return f" It is written by `lightning-frozenbn fit --config {config.as_posix()}`: run that first."


def read_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Read a weights file safely and return the ResNet-trunk state dict it holds.

    Accepts a torchvision-style state dict (``torch.save(model.state_dict())``, with or without
    ``fc.*`` and ``num_batches_tracked``), a ``{"state_dict": ...}`` wrapper, or a Lightning
    checkpoint of :class:`~lightning_frozenbn.FrozenBNClassifier` (its ``backbone.``/``head.``
    keys). Files are read with ``torch.load(weights_only=True)``: a file that needs arbitrary Python
    objects (and could run code while unpickling) is refused.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, unsafe, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist.{_written_by(path)} Pass an existing .pth/.ckpt file, a "
            "torchvision weight name such as 'DEFAULT', or null for random initialisation."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), "")
        raise ValueError(
            f"Refused to load {str(path)!r}: torch.load(weights_only=True) rejected it "
            f"({detail or 'unpickling error'}). "
            "Either the file is corrupt, or it holds Python objects other than tensors, whose loading "
            "could run code. Re-save only the weights with torch.save(model.state_dict(), path) from a "
            "source you trust."
        ) from err
    except Exception as err:  # truncated zip, random bytes, ... : torch raises several types
        raise ValueError(
            f"Could not read weights file {str(path)!r}: {err}. The file is truncated or not a PyTorch "
            "file; re-download or re-save it, or use an earlier checkpoint."
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
        if any(k.startswith(("backbone.", "head.")) for k in state):
            return {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(("backbone.", "head."))}
        obj = state
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{str(path)!r} does not hold a state dict (a mapping of names to tensors); found "
            f"{type(obj).__name__}. Save weights with torch.save(model.state_dict(), path)."
        )
    return obj


def key_mismatch(expected: dict[str, Tensor], state: dict[str, Tensor], ignore: tuple[str, ...] = ()) -> str:
    """What keeps ``state`` from loading into a model whose state is ``expected``: counts and names, or "".

    ``ignore``: expected keys that may be absent (they keep the model's values).
    """
    missing = [k for k in expected if k not in state and k not in ignore]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            more = f" ... and {len(keys) - 5} more" if len(keys) > 5 else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
    return "; ".join(parts)


def load_trunk_state_dict(trunk: nn.Module, state: dict[str, Tensor], source: str, arch: str) -> None:
    """Load a torchvision ResNet state dict into ``trunk`` (a ResNet whose ``fc`` is removed).

    Bookkeeping differences are reconciled (``fc.*`` dropped, ``num_batches_tracked`` added or
    dropped as the norm layers need); every other difference is an error that names the keys.
    """
    expected = trunk.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    for key in list(state):
        if key.endswith("num_batches_tracked") and key not in expected:
            del state[key]
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    problems = key_mismatch(expected, state)
    if problems:
        raise WeightsMismatchError(
            f"Weights {source} do not fit arch={arch!r}: {problems}. Check that `arch` names the architecture "
            "the file was saved from."
        )
    trunk.load_state_dict(state, strict=True)


def download_weights(weights: WeightsEnum) -> dict[str, Tensor]:
    """Torchvision's ``get_state_dict``, with a failed download explained: compute nodes are often offline.

    torchvision reads ``$TORCH_HOME/hub/checkpoints/<file>`` when it is there and downloads it otherwise;
    offline that surfaces as a bare ``<urlopen error ...>``.
    """
    import urllib.error

    try:
        return weights.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        raise WeightsDownloadError(
            f"Downloading torchvision's {weights} weights failed ({getattr(err, 'reason', err)}) from "
            f"{weights.url}. torchvision looks for a copy at {str(cache)!r} first (set TORCH_HOME to move it): "
            "download the file there on a machine with internet access, or save the weights "
            "(torch.save(model.state_dict(), 'r.pth')) and pass that file as `weights`."
        ) from err


def _looks_like_path(weights: str) -> bool:
    path = Path(weights)
    return path.exists() or "/" in weights or "\\" in weights or path.suffix in {".pth", ".pt", ".ckpt", ".bin"}


def _torchvision_weights(arch: str, name: str) -> WeightsEnum:
    enum = torchvision.models.get_model_weights(arch)
    short = name.rsplit(".", 1)[-1]
    if short in enum.__members__:
        return enum[short]
    raise _choice_error(
        f"torchvision weight name for {arch}",
        name,
        list(enum.__members__),
        "Or pass the path of an existing weights file, or null for random initialisation.",
    )


def eval_resize_for(arch: str, weights: str | Path | WeightsEnum | None, image_size: int) -> int | None:
    """The evaluation resize that torchvision weights were evaluated with, scaled to ``image_size``.

    ``IMAGENET1K_V2`` weights expect resize 232 then crop 224, ``IMAGENET1K_V1`` 256 then 224 (their
    ``transforms()`` preset); the classic ``image_size / 0.875`` rule fits only the latter. Returns
    None (use the classic rule) for random init or a weights file, whose preset is unknown. Reads the
    enum's metadata only: nothing is downloaded.
    """
    if weights is None or (isinstance(weights, (str, Path)) and _looks_like_path(str(weights))):
        return None
    enum = weights if isinstance(weights, WeightsEnum) else _torchvision_weights(arch, str(weights))
    preset = enum.transforms()
    resize, crop = getattr(preset, "resize_size", None), getattr(preset, "crop_size", None)
    if not resize or not crop:
        return None
    return round(image_size * resize[0] / crop[0])


def build_resnet(
    arch: str = "resnet50",
    weights: str | Path | WeightsEnum | None = None,
    norm: Norm = "frozen",
    freeze_at: int = 2,
    fold: bool = True,
    head_pool: Literal["avg", "max"] = "avg",
    fused_epilogue: bool = True,
) -> tuple[ResNetBackbone, ResNetHead]:
    """Build a torchvision ResNet for fine-tuning and split it into backbone and head.

    Args:
        arch: any torchvision ResNet family member (see ``ARCHS``).
        weights: ``None`` (random init); a torchvision weight name (``"DEFAULT"``,
            ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``, downloaded by torchvision on first use); or a
            local file: a torchvision-style state dict or a checkpoint of this package.
        norm: ``"frozen"`` FrozenBatchNorm2d (statistics and affine fixed: the classic detection
            recipe); ``"eval"`` statistics fixed, affine trainable; ``"train"`` plain BatchNorm2d;
            ``"sync"`` SyncBatchNorm.
        freeze_at: detectron2's meaning: 0 nothing frozen, 1 the stem, 2 stem+layer1 (default),
            3 +layer2, 4 +layer3, 5 +layer4 (the whole trunk: a linear probe). Frozen stages get
            ``requires_grad=False`` and, whatever ``norm`` is, FrozenBatchNorm2d: a frozen stage's
            statistics must not move either (detectron2 does the same).
        fold: fold every conv -> FrozenBatchNorm2d pair into one convolution (same function, same
            state-dict keys; faster and smaller under mixed precision).
        head_pool: the head's global pooling, ``"avg"`` (torchvision's) or ``"max"`` (person-search
            box heads).
        fused_epilogue: with ``fold``, each block's folded shift, residual add and ReLU run in cuDNN's
            convolution epilogue on CUDA where cuDNN has those ops (:mod:`lightning_frozenbn.epilogue`;
            same function, same keys); elsewhere, and under ``torch.compile``, the unfused path runs.

    Returns:
        ``(backbone, head)``: stem..layer3 returning the C4 map, and layer4 + pooling returning the
        embedding; both expose ``out_channels``.

    Raises:
        ValueError: an unknown ``arch`` or ``norm``, ``freeze_at`` outside 0..5, or unusable weights.
    """
    if arch not in ARCHS:
        raise _choice_error("arch", arch, ARCHS, "Set `arch` to one of these torchvision ResNets.")
    if norm not in NORMS:
        raise _choice_error("norm", norm, NORMS, "Set `norm` to one of these BN policies.")
    if head_pool not in ("avg", "max"):
        raise ValueError(f"head_pool={head_pool!r} is invalid: expected 'avg' (torchvision) or 'max' (person search).")
    if isinstance(freeze_at, bool) or not isinstance(freeze_at, int) or not 0 <= freeze_at <= 5:
        raise ValueError(
            f"freeze_at={freeze_at!r} is out of range: expected an integer 0..5 (0 nothing frozen, "
            "1 stem, 2 stem+layer1, 3 +layer2, 4 +layer3, 5 the whole trunk)."
        )
    resnet = getattr(torchvision.models, arch)(weights=None, norm_layer=_NORM_LAYERS[norm])
    in_features = resnet.fc.in_features
    resnet.fc = nn.Identity()
    if weights is not None:
        if isinstance(weights, WeightsEnum) or (isinstance(weights, str) and not _looks_like_path(weights)):
            tv_weights = weights if isinstance(weights, WeightsEnum) else _torchvision_weights(arch, weights)
            state, source = download_weights(tv_weights), str(tv_weights)
        else:
            state, source = read_weights_file(weights), repr(str(weights))
        load_trunk_state_dict(resnet, state, source, arch)
    resnet.fc = nn.Linear(in_features, 1, device="meta")  # read by the wrappers for out_channels
    for stage in STAGES[:freeze_at]:
        for name in stage:
            module = getattr(resnet, name)
            frozen = convert_frozen_batchnorm(module)
            if frozen is not module:
                setattr(resnet, name, frozen)
            frozen.requires_grad_(False)
    if norm == "sync":
        resnet = nn.SyncBatchNorm.convert_sync_batchnorm(resnet)
    backbone, head = ResNetBackbone(resnet), ResNetHead(resnet, head_pool)
    if fold:
        fold_frozen_batchnorm(backbone)
        fold_frozen_batchnorm(head)
        if fused_epilogue:
            fuse_epilogues(backbone)
            fuse_epilogues(head)
    return backbone, head
