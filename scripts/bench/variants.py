"""The peers, re-created in a few lines each, and the runner that times one of them."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn import build_resnet
from lightning_frozenbn.backbone import STAGES


# ---- the peers, re-created in a few lines each --------------------------------------------------
class Detectron2FrozenBN(FrozenBatchNorm2d):
    """detectron2's FrozenBatchNorm2d: scale/bias cast to the input dtype; fused BN when no grad."""

    def forward(self, x):
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + bias.reshape(1, -1, 1, 1).to(x.dtype)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, eps=self.eps)


def _freeze_stages(resnet: nn.Module, freeze_at: int) -> None:
    for stage in STAGES[:freeze_at]:
        for name in stage:
            getattr(resnet, name).requires_grad_(False)


def make_variant(name: str, arch: str, freeze_at: int) -> tuple[nn.Module, bool]:
    """Return (model, keep_bn_eval) for one variant; all share the same architecture and classifier."""
    tv = getattr(torchvision.models, arch)
    if name in ("ours (folded)", EPILOGUE_OFF):  # the product default: the fused epilogue on CUDA
        backbone, head = build_resnet(arch, None, "frozen", freeze_at, fold=True, fused_epilogue=name != EPILOGUE_OFF)
        return nn.Sequential(backbone, head, nn.Linear(head.out_channels, 1000)), False
    if name == "torchvision FrozenBN":
        backbone, head = build_resnet(arch, None, "frozen", freeze_at, fold=False)
        return nn.Sequential(backbone, head, nn.Linear(head.out_channels, 1000)), False
    if name == "detectron2 FrozenBN":
        model = tv(weights=None, norm_layer=Detectron2FrozenBN)
    elif name == "mmdet norm_eval":
        model = tv(weights=None)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)
        _freeze_stages(model, freeze_at)
        return model, True
    elif name == "BatchNorm2d train":
        model = tv(weights=None)
    else:
        raise ValueError(name)
    _freeze_stages(model, freeze_at)
    return model, False


VARIANTS = ["ours (folded)", "torchvision FrozenBN", "detectron2 FrozenBN", "mmdet norm_eval", "BatchNorm2d train"]


# ours without the fused epilogue (the fast path before it became the default): timed beside it on CUDA
EPILOGUE_OFF = "ours (folded), fused epilogue off"


class Runner:
    """One variant: model, optimizer, a compiled or eager step, per-step timings and peak memory."""

    def __init__(self, name, args, device, precision, compiled):
        self.name, self.device, self.precision, self.compiled = name, device, precision, compiled
        self.model, self.keep_eval = make_variant(name, args.arch, 2)
        self.model.to(device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        if self.keep_eval:
            for m in self.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.times: list[float] = []
        self.peak_bytes = 0

    def step(self, x, y):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = F.cross_entropy(self.forward(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed_steps(self, x, y, n):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        if self.device.type == "cuda":
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            self.step(x, y)
            sync()
            self.times.append(time.perf_counter() - t0)
        if self.device.type == "cuda":
            static = sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])
            static += sum(
                v.numel() * v.element_size() for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)
            )
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated() - base + static)
