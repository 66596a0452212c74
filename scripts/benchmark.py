"""Side-by-side benchmark of the frozen-BN recipe: ours (folded) vs the peers a user would pick instead.

Everything runs in ONE process, interleaved round by round, and reports medians of many steps and
ratios, so machine noise hits every variant alike. Prints tables and writes a JSON file.

    python scripts/benchmark.py                       # CPU defaults: resnet50, batch 16, 64 px (< 5 min)
    python scripts/benchmark.py --device cuda         # H100 recipe sizes: batch 256, 224 px, + torch.compile

Sections: step time and peak memory per variant (fp32 and bf16 autocast; eager, and compiled on
CUDA; on CUDA also the fused-epilogue experiment); bytes autograd saves for backward in one forward
(deterministic: the memory figure that holds on a noisy CPU); a per-op profile of ours vs the
strongest peer; the input pipeline on real photographs (stock PIL path vs ours per worker count,
nvJPEG on CUDA) and ``Trainer.fit`` on those JPEGs vs in-memory tensors (``data``); Lightning
``Trainer.fit`` step vs a plain PyTorch loop (and the cost of the NaN check, every step or deferred);
the FrozenModuleGuard's overhead; the Faster R-CNN C4 training step (ours folded vs the same detector
with torchvision's FrozenBatchNorm2d vs torchvision's ``fasterrcnn_resnet50_fpn``: time and saved bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn import FoldedConv2d, FrozenBNClassifier, FrozenModuleGuard, build_resnet
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


def _freeze_stages(resnet: nn.Module, freeze_at: int) -> None:
    for stage in STAGES[:freeze_at]:
        for name in stage:
            getattr(resnet, name).requires_grad_(False)


def make_variant(name: str, arch: str, freeze_at: int) -> tuple[nn.Module, bool]:
    """Return (model, keep_bn_eval) for one variant; all share the same architecture and classifier."""
    tv = getattr(torchvision.models, arch)
    if name in ("ours (folded)", EXPERIMENT):
        backbone, head = build_resnet(arch, None, "frozen", freeze_at, fold=True)
        model = nn.Sequential(backbone, head, nn.Linear(head.out_channels, 1000))
        return (fuse_epilogues(model) if name == EXPERIMENT else model), False
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
EXPERIMENT = "experiment: ours + cuDNN fused bias/ReLU"


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


def bench_steps(args, device, x, y, precision, compiled, variants):
    runners, failed = [], []
    for v in variants:
        try:
            runner = Runner(v, args, device, precision, compiled)
            for _ in range(args.warmup):  # warm-up (and compilation)
                runner.step(x, y)
            runners.append(runner)
        except Exception as err:  # only the experiment may fail: report it, keep the baselines
            if v != EXPERIMENT:
                raise
            failed.append({"variant": v, "precision": precision, "compiled": compiled, "error": repr(err)[:300]})
    for _ in range(args.rounds):
        for r in runners:
            r.timed_steps(x, y, args.steps)
    rows = []
    ours = statistics.median(runners[0].times)
    for r in runners:
        med = statistics.median(r.times)
        rows.append(
            {
                "variant": r.name,
                "precision": precision,
                "compiled": compiled,
                "ms_per_step": med * 1e3,
                "img_per_s": x.shape[0] / med,
                "peak_gib": r.peak_bytes / 2**30 if device.type == "cuda" else None,
                "ours_over_this": ours / med,
                "steps": len(r.times),
            }
        )
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows + failed


def saved_bytes(args, device, variants):
    """Bytes of distinct storages autograd saves for backward in one forward pass."""
    rows = []
    x = torch.randn(args.saved_batch, 3, args.saved_size, args.saved_size, device=device)
    for precision in ("fp32", "bf16"):
        for name in variants:
            model, keep_eval = make_variant(name, args.arch, 2)
            model.to(device).train()
            if keep_eval:
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.eval()
            seen: dict[int, int] = {}

            def pack(t, seen=seen):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = model(x)
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            total = sum(seen.values())
            no_params = sum(n for ptr, n in seen.items() if ptr not in params)
            rows.append(
                {
                    "variant": name,
                    "precision": precision,
                    "saved_mib": total / 2**20,
                    "saved_mib_excl_params": no_params / 2**20,
                    "output_dtype": str(out.dtype),
                }
            )
    return rows


def profile_ops(args, device, x, y, variants=("ours (folded)", "detectron2 FrozenBN"), precision="bf16"):
    """Where a step's time goes, per aten op, for ours and the strongest peer (torch.profiler, eager).

    On CUDA the time is the GPU time of the kernels each op launched (self device time); on CPU it is
    the op's self CPU time. Calls per step are deterministic and show what each variant runs: e.g. the
    elementwise passes a BN costs, or the bias add a folded conv keeps.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps = max(2, args.steps)
    runners = {name: Runner(name, args, device, precision, False) for name in variants}
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step(x, y)
    per_variant: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for _ in range(args.rounds):  # interleaved, like the step timings
        for name, runner in runners.items():
            sync()
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    runner.step(x, y)
                sync()
            for event in prof.key_averages():
                spent = event.self_device_time_total if cuda else event.self_cpu_time_total
                if event.key.startswith(("aten::", "lightning_frozenbn::")):  # ours: the tiny-map convolution
                    total = per_variant[name].setdefault(event.key, [0.0, 0.0])
                    total[0] += spent / 1e3 / steps / args.rounds
                    total[1] += event.count / steps / args.rounds
    del runners
    ours, peer = (per_variant[name] for name in variants)
    rows = []
    for op in set(ours) | set(peer):
        (ours_ms, ours_calls), (peer_ms, peer_calls) = ours.get(op, (0.0, 0.0)), peer.get(op, (0.0, 0.0))
        rows.append(
            {"op": op, "ours_ms": ours_ms, "ours_calls": ours_calls, "peer_ms": peer_ms, "peer_calls": peer_calls}
        )
    rows.sort(key=lambda r: -max(r["ours_ms"], r["peer_ms"]))
    return {
        "peer": variants[1],
        "precision": precision,
        "clock": "GPU kernel time" if cuda else "CPU self time",
        "steps": steps,
        "ops": rows,
        "ours_total_ms": sum(t for t, _ in ours.values()),
        "peer_total_ms": sum(t for t, _ in peer.values()),
    }


class _StepClock:
    """Lightning callback: the steady time per step, from the wall clock over a run's steps after the first ``skip``.

    The device is synchronised only where the timed span starts and ends: a sync every step would
    hide the cost of anything else that syncs (the NaN check, a logger) and would let a slow input
    pipeline hide behind the model. Epoch times (with a sync at each end) are kept too.
    """

    def __init__(self, skip=1):
        from lightning.pytorch import Callback

        clock = self

        def sync(trainer):
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()

        class _Cb(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == skip:
                    sync(trainer)
                    clock.t0 = time.perf_counter()

            def on_train_end(self, trainer, pl_module):
                sync(trainer)
                if clock.t0 is not None and trainer.global_step > skip:
                    clock.steps.append((time.perf_counter() - clock.t0) / (trainer.global_step - skip))
                clock.t0 = None

            def on_train_epoch_start(self, trainer, pl_module):
                sync(trainer)
                clock.e0 = time.perf_counter()

            def on_train_epoch_end(self, trainer, pl_module):
                sync(trainer)
                clock.epochs.append(time.perf_counter() - clock.e0)

        self.callback, self.steps, self.epochs, self.t0, self.e0 = _Cb(), [], [], None, 0.0


def _bench_trainer(device, precision, callbacks, **limits):
    """A Trainer with nothing but the model step and the given callbacks (no logger, checkpoint, bar)."""
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator=device.type if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        **limits,
    )


def lightning_vs_plain(args, device, x, y):
    """Time per step: Trainer.fit vs a hand-written loop, same model, same batches, interleaved.

    Lightning runs three times per round: with ``check_finite=False`` (the same work as the plain
    loop, so the ratio is Lightning's own cost), with the package default ``check_finite=True``, whose
    NaN check reads the loss on the host every step (a device sync: free on CPU, measured on GPU), and
    with ``check_finite="deferred"`` (read one step later, no sync). Steady time per step over
    ``2 x steps`` steps after one warm-up step, device synced only at the ends of the span.
    """
    from torch.utils.data import DataLoader

    model = FrozenBNClassifier(num_classes=1000, arch=args.arch, check_finite=False, channels_last=args.channels_last)
    model.configure_optimizers = lambda: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9
    )
    steps = 2 * args.steps
    precision = "bf16-mixed" if args.fit_precision == "bf16" else "32-true"
    clocks = {False: _StepClock(), True: _StepClock(), "deferred": _StepClock()}
    plain_steps: list[float] = []
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = [(x.cpu(), y.cpu())] * (steps + 1)  # host batches, copied to the device each step as in a real run
    if device.type == "cuda":
        batches = [(x.cpu().pin_memory(), y.cpu().pin_memory())] * (steps + 1)
    for _ in range(args.rounds):
        for check_finite, clock in clocks.items():
            model.hparams.check_finite = check_finite
            trainer = _bench_trainer(device, precision, [clock.callback], max_steps=steps + 1)
            trainer.fit(model, DataLoader(batches, batch_size=None))
        model.to(device).train()
        for i, (xb, yb) in enumerate(batches):
            if i == 1:
                sync()
                t0 = time.perf_counter()
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.fit_precision == "bf16"):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync()
        plain_steps.append((time.perf_counter() - t0) / steps)
    lightning = statistics.median(clocks[False].steps)
    checked = statistics.median(clocks[True].steps)
    deferred = statistics.median(clocks["deferred"].steps)
    plain = statistics.median(plain_steps)
    return {
        "lightning_ms": lightning * 1e3,
        "plain_ms": plain * 1e3,
        "ratio": lightning / plain,
        "check_finite_ms": checked * 1e3,
        "check_finite_ratio": checked / lightning,
        "deferred_check_ms": deferred * 1e3,
        "deferred_check_ratio": deferred / lightning,
        "steps": steps,
        "runs": len(clocks[False].steps),
    }


def guard_overhead(args, device, x, y):
    """Epoch time with vs without the guard (interleaved), and the guard's own hook time per epoch."""
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(
        TensorDataset(x.cpu().repeat(args.steps, 1, 1, 1), y.cpu().repeat(args.steps)), batch_size=x.shape[0]
    )
    precision = "bf16-mixed" if args.fit_precision == "bf16" else "32-true"
    model = FrozenBNClassifier(num_classes=1000, arch=args.arch, check_finite=False, channels_last=args.channels_last)
    with_guard, without, hook_time = [], [], []
    for _ in range(args.rounds):
        for use_guard in (True, False):
            clock = _StepClock()
            guard = FrozenModuleGuard()
            spent = [0.0]
            for hook in ("on_train_batch_start", "on_train_epoch_start", "on_train_epoch_end"):
                original = getattr(guard, hook)

                def timed(*a, _original=original, spent=spent, **k):
                    t0 = time.perf_counter()
                    _original(*a, **k)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    spent[0] += time.perf_counter() - t0

                setattr(guard, hook, timed)
            callbacks = [clock.callback, guard] if use_guard else [clock.callback]
            _bench_trainer(device, precision, callbacks, max_epochs=2).fit(model, loader)
            (with_guard if use_guard else without).extend(clock.epochs[1:])
            if use_guard:
                hook_time.append(spent[0] / 2)
    epoch = statistics.median(without)
    return {
        "epoch_s_with_guard": statistics.median(with_guard),
        "epoch_s_without": epoch,
        "epoch_ratio": statistics.median(with_guard) / epoch,
        "guard_hook_s_per_epoch": statistics.median(hook_time),
        "guard_hook_fraction_of_epoch": statistics.median(hook_time) / epoch,
        "steps_per_epoch": args.steps,
    }


# ---- detection: the Faster R-CNN C4 step, ours vs the same detector unfolded vs torchvision's FPN recipe ----
def detection_variants(args):
    """(name, model) pairs: ours (folded), ours with torchvision's FrozenBatchNorm2d unfolded, torchvision's FPN."""
    from lightning_frozenbn import FrozenBNDetector

    common = dict(min_size=args.det_size, max_size=args.det_size * 2)
    c4 = dict(
        arch=args.arch,
        box_batch_size_per_image=args.det_regions,
        rpn_post_nms_top_n_train=max(args.det_regions * 2, 256),
        roi_output_size=args.det_roi,
        **common,
    )
    torch.manual_seed(0)
    ours = FrozenBNDetector(args.det_classes, fold=True, **c4)
    unfolded = FrozenBNDetector(args.det_classes, fold=False, **c4)
    unfolded.load_state_dict(ours.state_dict())  # same weights; the folded keys are the same names
    fpn = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=args.det_classes + 1,
        trainable_backbone_layers=3,  # torchvision's fine-tuning default: stem + layer1 frozen, as ours
        box_batch_size_per_image=args.det_regions,
        **common,
    )
    return [
        ("ours C4 (folded)", ours),
        ("C4, torchvision FrozenBN", unfolded),
        ("torchvision fasterrcnn_resnet50_fpn", fpn),
    ]


def detection_scenes(args, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = args.det_size
    images = [torch.rand(3, size, size + 32 * (i % 2), generator=g).to(device) for i in range(args.det_batch)]
    targets = []
    for _ in range(args.det_batch):
        k = 3
        xy = torch.rand(k, 2, generator=g) * size * 0.6
        wh = torch.rand(k, 2, generator=g) * size * 0.3 + size * 0.08
        boxes = torch.cat([xy, xy + wh], 1).to(device)
        targets.append({"boxes": boxes, "labels": torch.randint(1, args.det_classes + 1, (k,), generator=g).to(device)})
    return images, targets


def detection_section(args, device):
    """Training step time and saved-for-backward bytes of the three detectors, side by side."""
    images, targets = detection_scenes(args, device)
    models = [(n, m.to(device).train()) for n, m in detection_variants(args)]
    opts = {n: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models}
    rows = []
    for precision in args.precisions.split(","):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        def step(name, model, autocast=autocast):
            torch.manual_seed(1)  # the same region sampling for every variant
            with autocast:
                loss = sum(model(images, targets).values())
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)

        times = {n: [] for n, _ in models}
        peaks = {}
        for name, model in models:
            for _ in range(args.warmup):
                step(name, model)
        for _ in range(args.rounds):
            for name, model in models:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(args.det_steps):
                    start = time.perf_counter()
                    step(name, model)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
        for name, model in models:
            seen: dict[int, int] = {}

            def pack(t, seen=seen):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
                return t

            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            torch.manual_seed(1)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                model(images, targets)
            rows.append(
                {
                    "variant": name,
                    "precision": precision,
                    "ms_per_step": statistics.median(times[name]) * 1e3,
                    "saved_mib_excl_params": sum(n for p, n in seen.items() if p not in params) / 2**20,
                    "peak_gib": peaks[name] / 2**30 if name in peaks else None,
                    "steps": len(times[name]),
                }
            )
        ours = next(r for r in rows if r["precision"] == precision and r["variant"].startswith("ours"))
        for r in rows:
            if r["precision"] == precision:
                r["ours_time_over_this"] = ours["ms_per_step"] / r["ms_per_step"]
                r["ours_saved_over_this"] = ours["saved_mib_excl_params"] / r["saved_mib_excl_params"]
    return rows


def make_photos(root, n, size=(500, 375), classes=4, seed=0):
    """``n`` real photographs as JPEG (quality 90) in ``root/train/<class>/`` and one per class in ``val``.

    Random crops (area 30-100 %, random position, landscape or portrait, flipped or not) of the two
    photographs bundled with scikit-learn, resized to ImageNet's typical 500 x 375: real image
    statistics for the decoders (noise would compress and decode at other speeds), with no download.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    root = Path(root)
    for i in range(n + classes):
        split, c = ("train", i % classes) if i < n else ("val", i - n)
        photo = photos[i % len(photos)]
        area = float(torch.empty(1).uniform_(0.3, 1.0, generator=g)) * photo.width * photo.height
        w = min(photo.width, round((area * 4 / 3) ** 0.5))
        h = min(photo.height, round(w * 3 / 4))
        left = int(torch.randint(0, photo.width - w + 1, (1,), generator=g))
        top = int(torch.randint(0, photo.height - h + 1, (1,), generator=g))
        image = photo.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BILINEAR)
        if i % 3 == 1:
            image = image.transpose(Image.Transpose.ROTATE_90)  # portrait
        if int(torch.randint(0, 2, (1,), generator=g)):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / split / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


PIPELINES = {
    "stock (PIL, float on workers)": dict(decode="pil"),
    "ours (uint8, normalised on device)": dict(decode="tensor"),
    "ours + nvJPEG on the GPU": dict(decode="tensor", decode_device="cuda"),
}


def _photo_datamodule(root, args, workers, image_size, batch_size, repeat=1, **kwargs):
    """The package's ImageFolderDataModule; ``repeat`` > 1 makes an epoch go over the files several times."""
    from torch.utils.data import ConcatDataset

    from lightning_frozenbn import ImageFolderDataModule

    class Repeated(ImageFolderDataModule):
        def setup(self, stage):
            super().setup(stage)
            if repeat > 1 and "train" in self.datasets and not isinstance(self.datasets["train"], ConcatDataset):
                self.datasets["train"] = ConcatDataset([self.datasets["train"]] * repeat)

    return Repeated(root, image_size=image_size, batch_size=batch_size, num_workers=workers, **kwargs)


def pipeline_rates(args, device, root):
    """Images/s delivered to the device, normalised, by each pipeline and worker count (train transform).

    Counts what the model would receive: batches from the DataLoader, moved to the device and, for
    our pipeline, normalised there (as the Trainer's transfer hooks do). Each run takes
    ``max(16, 6 x workers)`` batches of ``--pipeline-batch`` images; the rate is over the batches after
    each worker's first one (worker start-up excluded); median of interleaved rounds.
    """
    pipelines = [p for p in PIPELINES if device.type == "cuda" or "nvJPEG" not in p]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = {(p, w): [] for p in pipelines for w in args.worker_counts}
    for _ in range(args.data_rounds):
        for workers in args.worker_counts:
            batches = max(16, 6 * workers)
            repeat = -(-batches * args.pipeline_batch // args.data_images)  # enough files for that many batches
            for name in pipelines:
                dm = _photo_datamodule(
                    root, args, workers, args.data_image_size, args.pipeline_batch, repeat, **PIPELINES[name]
                )
                dm.setup("fit")
                arrivals, images = [], 0
                for batch in dm.train_dataloader():
                    batch = dm.on_after_batch_transfer(dm.transfer_batch_to_device(batch, device, 0), 0)
                    sync()
                    arrivals.append(time.perf_counter())
                    if len(arrivals) > workers:
                        images += batch[0].shape[0]
                    if len(arrivals) == batches:
                        break
                rates[(name, workers)].append(images / (arrivals[-1] - arrivals[workers - 1]))
                del dm
    stock = {w: statistics.median(rates[(pipelines[0], w)]) for w in args.worker_counts}
    rows = []
    for (name, workers), values in rates.items():
        rate = statistics.median(values)
        rows.append(
            {
                "pipeline": name,
                "workers": workers,
                "img_per_s": rate,
                "img_per_s_per_worker": rate / workers,
                "vs_stock": rate / stock[workers],
            }
        )
    return rows


def fit_real_vs_synthetic(args, device, root):
    """Trainer.fit time per step on the JPEG photos vs on in-memory tensors: same model, same batch size.

    Synthetic batches are uint8 tensors already collated in host memory (pinned on CUDA), sent
    through the same transfer hooks: the data costs nothing but its copy. A warm-up fit first
    (compilation, cuDNN autotuning), then interleaved rounds; steady time per step after 2 steps.
    """
    from torch.utils.data import DataLoader

    precision = "bf16-mixed" if args.fit_precision == "bf16" else "32-true"
    model = FrozenBNClassifier(
        num_classes=4,
        arch=args.arch,
        channels_last=args.channels_last,
        compile=args.compile and device.type == "cuda",
        check_finite=False,  # random weights on photos can overflow bf16: this section times the data only
    )
    model.configure_optimizers = lambda: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9
    )
    g = torch.Generator().manual_seed(0)
    n, size = args.data_batch, args.image_size
    pin = device.type == "cuda"
    synthetic_batches = [
        (torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.randint(0, 4, (n,)))
        for _ in range(4)
    ]
    if pin:
        synthetic_batches = [(a.pin_memory(), b.pin_memory()) for a, b in synthetic_batches]

    def synthetic_dm():
        dm = _photo_datamodule(root, args, 0, size, n)
        dm.train_dataloader = lambda: DataLoader(synthetic_batches * (args.fit_steps // 4 + 2), batch_size=None)
        return dm

    # one epoch longer than the run: an epoch boundary restarts the workers' prefetching, a stall that a
    # real epoch (thousands of steps) amortises but a short timed span would not (seen on the H200)
    repeat = -(-(args.fit_steps + 2 + 2 * args.workers) * n // args.data_images)
    runs = {"synthetic tensors": synthetic_dm}
    for name, kwargs in PIPELINES.items():
        if "stock" not in name and (device.type == "cuda" or "nvJPEG" not in name):
            runs[f"JPEG: {name}"] = lambda kw=kwargs: _photo_datamodule(
                root, args, args.workers, size, n, repeat=repeat, **kw
            )
    limits = dict(max_steps=args.fit_steps + 2, limit_val_batches=0)
    _bench_trainer(device, precision, [], max_steps=3, limit_val_batches=0).fit(model, datamodule=synthetic_dm())
    clocks = {name: _StepClock(skip=2) for name in runs}
    for _ in range(args.data_rounds):
        for name, make in runs.items():
            _bench_trainer(device, precision, [clocks[name].callback], **limits).fit(model, datamodule=make())
    base = statistics.median(clocks["synthetic tensors"].steps)
    rows = []
    for name, clock in clocks.items():
        step = statistics.median(clock.steps)
        rows.append(
            {
                "data": name,
                "workers": 0 if name.startswith("synthetic") else args.workers,
                "ms_per_step": step * 1e3,
                "img_per_s": n / step,
                "vs_synthetic_speed": base / step,
                "runs": len(clock.steps),
            }
        )
    return rows


def data_section(args, device, save=lambda data: None):
    """The input pipeline on real photos: stock vs ours per worker count, then end-to-end fit vs synthetic."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = make_photos(tmp, args.data_images)
        data = {
            "photos": args.data_images,
            "photo_size": "500x375 JPEG q90 (crops of scikit-learn's sample photos)",
            "pipeline_batch_size": args.pipeline_batch,
            "fit_batch_size": args.data_batch,
            "pipeline_image_size": args.data_image_size,
            "fit_image_size": args.image_size,
            "seconds_to_write_photos": time.perf_counter() - t0,
        }
        data["pipelines"] = pipeline_rates(args, device, root)
        save(data)  # a run cut short by a timeout keeps the pipeline table
        if args.fit_steps > 0:
            data["fit"] = fit_real_vs_synthetic(args, device, root)
        return data


def fmt_table(rows, cols):
    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "-" if v is None else str(v)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument("--warmup", type=int)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile (default: on for cuda)",
    )
    parser.add_argument(
        "--experiment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the cuDNN fused-epilogue experiment (default: on for cuda; it needs CUDA to mean anything)",
    )
    parser.add_argument("--sections", default="steps,saved,profile,lightning,guard,data,detection")
    parser.add_argument("--det-size", type=int, help="detection: shorter image side (GPU default 800, as COCO)")
    parser.add_argument("--det-batch", type=int, help="detection: images per step")
    parser.add_argument("--det-regions", type=int, help="detection: regions per image through the box head")
    parser.add_argument(
        "--det-roi",
        type=int,
        default=14,
        help="detection: RoIAlign side of ours (14: Detectron; the CPU quickstart's 4)",
    )
    parser.add_argument("--det-steps", type=int, help="detection: timed steps per variant per round")
    parser.add_argument("--det-classes", type=int, default=80, help="detection: object classes")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--fit-precision", choices=["fp32", "bf16"])
    parser.add_argument("--workers", type=int, help="DataLoader workers of the real-JPEG fit")
    parser.add_argument("--worker-counts", help="comma-separated worker counts of the pipeline table")
    parser.add_argument("--data-images", type=int, help="distinct photos written for the data section")
    parser.add_argument("--fit-steps", type=int, help="timed steps per fit in the data section")
    parser.add_argument("--data-image-size", type=int, default=224, help="train crop of the pipeline table")
    parser.add_argument("--pipeline-batch", type=int, default=64, help="batch size of the pipeline table")
    parser.add_argument("--data-rounds", type=int, default=2, help="interleaved rounds of the data section")
    parser.add_argument("--compile-variants", default=",".join(VARIANTS[:4]), help="variants timed under torch.compile")
    parser.add_argument("--output", default="benchmark.json")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; use --device cpu.")
    defaults = dict(
        batch_size=256 if gpu else 16,
        image_size=224 if gpu else 64,
        steps=10 if gpu else 3,
        rounds=3 if gpu else 5,
        warmup=5 if gpu else 2,
        compile=gpu,
        experiment=gpu,
        fit_precision="bf16" if gpu else "fp32",
        workers=min(14, max(1, (os.cpu_count() or 2) - 2)) if gpu else 2,
        worker_counts="1,4,8,14" if gpu else "1,2",
        data_images=1024 if gpu else 64,
        fit_steps=None,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.channels_last = gpu
    for key, gpu_value, cpu_value in (
        ("det_size", 800, 128),
        ("det_batch", 8, 2),
        ("det_regions", 512, 64),
        ("det_steps", 5, 2),
    ):
        if getattr(args, key) is None:
            setattr(args, key, gpu_value if gpu else cpu_value)
    args.saved_batch, args.saved_size = 8, 64
    args.worker_counts = [int(w) for w in str(args.worker_counts).split(",")]
    if args.fit_steps is None:  # many batches per worker: the timed span must not end inside the first bursts
        args.fit_steps = max(40, 5 * args.workers) if gpu else 8
    args.data_batch = args.batch_size
    device = torch.device(args.device)
    torch.manual_seed(0)
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    sections = args.sections.split(",")

    def save(result):  # after every section, so a run cut short by a timeout keeps what it measured
        Path(args.output).write_text(json.dumps(result, indent=2, default=str))

    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "device": name,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: v for k, v in vars(args).items()},
    }
    print(
        f"# {name}, torch {torch.__version__}, {args.arch}, batch {args.batch_size}, {args.image_size} px, freeze_at=2"
    )
    if "steps" in sections:
        rows = []
        for precision in args.precisions.split(","):
            rows += bench_steps(args, device, x, y, precision, False, VARIANTS + [EXPERIMENT] * args.experiment)
        result["steps"] = rows
        print("\n## Step time (median of interleaved steps) and peak memory; ours_over_this < 1 means ours is faster")
        print(
            fmt_table(
                rows,
                ["variant", "precision", "compiled", "ms_per_step", "img_per_s", "peak_gib", "ours_over_this", "steps"],
            )
        )
        for row in rows:
            if "error" in row:
                print(f"{row['variant']} ({row['precision']}) failed: {row['error']}")
    save(result)
    if "saved" in sections:
        rows = saved_bytes(args, device, VARIANTS)
        for row in rows:
            ref = next(r for r in rows if r["variant"] == "torchvision FrozenBN" and r["precision"] == row["precision"])
            row["vs_torchvision"] = row["saved_mib"] / ref["saved_mib"]
        result["saved"] = rows
        print(
            f"\n## Bytes saved for backward in one forward (batch {args.saved_batch}, {args.saved_size} px; deterministic)"
        )
        print("(saved_mib counts every distinct storage, parameters included, as reference-figures.md does)")
        print(
            fmt_table(
                rows, ["variant", "precision", "saved_mib", "vs_torchvision", "saved_mib_excl_params", "output_dtype"]
            )
        )
    save(result)
    if "profile" in sections:
        prof = profile_ops(args, device, x, y)
        result["profile"] = prof
        print(
            f"\n## Per-op {prof['clock']} per step, eager {prof['precision']}: ours vs {prof['peer']} "
            f"(totals {prof['ours_total_ms']:.1f} vs {prof['peer_total_ms']:.1f} ms; top 15 ops)"
        )
        print(fmt_table(prof["ops"][:15], ["op", "ours_ms", "ours_calls", "peer_ms", "peer_calls"]))
    step_rate = next(
        (
            r["img_per_s"]
            for r in result.get("steps", [])
            if r["variant"] == "ours (folded)" and r["precision"] == args.fit_precision and not r["compiled"]
        ),
        None,
    )
    save(result)
    if "data" in sections:
        result["data"] = data = data_section(args, device, lambda d: save({**result, "data": d}))
        print(
            f"\n## Input pipeline on {data['photos']} real photos ({data['photo_size']}), train transform to "
            f"{args.data_image_size} px, batch {args.pipeline_batch}: images/s delivered to the device, normalised"
        )
        print(fmt_table(data["pipelines"], ["pipeline", "workers", "img_per_s", "img_per_s_per_worker", "vs_stock"]))
        if data.get("fit"):
            print(
                f"\n## Trainer.fit on those JPEGs ({args.workers} workers) vs on in-memory tensors "
                f"({args.arch}, {args.image_size} px, {args.fit_precision}, steady time per step; "
                "vs_synthetic_speed 1.0 = data costs nothing)"
            )
            print(fmt_table(data["fit"], ["data", "workers", "ms_per_step", "img_per_s", "vs_synthetic_speed", "runs"]))
        if step_rate:
            data["model_step_img_per_s"] = step_rate
    save(result)
    if "lightning" in sections:
        result["lightning"] = lightning_vs_plain(args, device, x, y)
        print("\n## Lightning Trainer.fit step vs plain PyTorch loop (ours, steady time per step, median of runs)")
        print("(check_finite_ratio: the default NaN check's host sync per step; deferred: read one step later)")
        print(
            fmt_table(
                [result["lightning"]],
                [
                    "lightning_ms",
                    "plain_ms",
                    "ratio",
                    "check_finite_ms",
                    "check_finite_ratio",
                    "deferred_check_ms",
                    "deferred_check_ratio",
                    "steps",
                    "runs",
                ],
            )
        )
    save(result)
    if "guard" in sections:
        result["guard"] = guard_overhead(args, device, x, y)
        print("\n## FrozenModuleGuard overhead (epoch time with/without, and the guard hooks' own time)")
        print(
            fmt_table(
                [result["guard"]],
                [
                    "epoch_s_with_guard",
                    "epoch_s_without",
                    "epoch_ratio",
                    "guard_hook_s_per_epoch",
                    "guard_hook_fraction_of_epoch",
                    "steps_per_epoch",
                ],
            )
        )
    save(result)
    if "detection" in sections:
        result["detection"] = rows = detection_section(args, device)
        print(
            f"\n## Faster R-CNN training step: {args.arch} C4, batch {args.det_batch}, {args.det_size} px, "
            f"{args.det_regions} regions/image, RoIAlign {args.det_roi}; ours_*_over_this < 1: ours is faster / saves less"
        )
        print(
            fmt_table(
                rows,
                [
                    "variant",
                    "precision",
                    "ms_per_step",
                    "ours_time_over_this",
                    "saved_mib_excl_params",
                    "ours_saved_over_this",
                    "peak_gib",
                    "steps",
                ],
            )
        )
    save(result)
    if "steps" in sections and args.compile:  # last: compilation takes minutes
        compiled = bench_steps(args, device, x, y, "bf16", True, args.compile_variants.split(","))
        result["steps"] += compiled
        print("\n## torch.compile, bf16 (median of interleaved steps)")
        print(
            fmt_table(
                compiled,
                ["variant", "precision", "compiled", "ms_per_step", "img_per_s", "peak_gib", "ours_over_this", "steps"],
            )
        )
    save(result)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
