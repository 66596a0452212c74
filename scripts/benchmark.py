"""Side-by-side benchmark of the frozen-BN recipe: ours (folded) vs the peers a user would pick instead.

Everything runs in ONE process, interleaved round by round, and reports medians of many steps and
ratios, so machine noise hits every variant alike. Prints tables and writes a JSON file.

    python scripts/benchmark.py                       # CPU defaults: resnet50, batch 16, 64 px (< 5 min)
    python scripts/benchmark.py --device cuda         # H100 recipe sizes: batch 256, 224 px, + torch.compile

Sections: step time and peak memory per variant (fp32 and bf16 autocast; eager, and compiled on
CUDA; on CUDA also the fused-epilogue experiment); bytes autograd saves for backward in one forward
(deterministic: the memory figure that holds on a noisy CPU); a per-op profile of ours vs the
strongest peer; Lightning ``Trainer.fit`` step vs a plain PyTorch loop (and the cost of the default
NaN check); the FrozenModuleGuard's overhead; the ImageFolder input pipeline's images/s vs the model
step's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
                if event.key.startswith("aten::"):
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
    """Lightning callback recording the wall time between consecutive training batches."""

    def __init__(self):
        from lightning.pytorch import Callback

        clock = self

        class _Cb(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.strategy.root_device.type == "cuda":
                    torch.cuda.synchronize()
                clock.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.strategy.root_device.type == "cuda":
                    torch.cuda.synchronize()
                if batch_idx >= 1 or trainer.max_steps <= 2:
                    clock.steps.append(time.perf_counter() - clock.t0)

            def on_train_epoch_start(self, trainer, pl_module):
                clock.e0 = time.perf_counter()

            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.strategy.root_device.type == "cuda":
                    torch.cuda.synchronize()
                clock.epochs.append(time.perf_counter() - clock.e0)

        self.callback, self.steps, self.epochs, self.t0, self.e0 = _Cb(), [], [], 0.0, 0.0


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
    """Per-step median: Trainer.fit vs a hand-written loop, same model, same batches, interleaved.

    Lightning runs twice per round: with ``check_finite=False`` (the same work as the plain loop, so
    the ratio is Lightning's own cost) and with the package default ``check_finite=True``, whose
    NaN check reads the loss on the host every step (a device sync; free on CPU, measured on GPU).
    """
    from torch.utils.data import DataLoader, TensorDataset

    model = FrozenBNClassifier(num_classes=1000, arch=args.arch, check_finite=False, channels_last=args.channels_last)
    model.configure_optimizers = lambda: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9
    )
    data = [(x, y)] * args.steps
    precision = "bf16-mixed" if args.fit_precision == "bf16" else "32-true"
    clocks = {False: _StepClock(), True: _StepClock()}
    plain_steps: list[float] = []
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.rounds):
        for check_finite, clock in clocks.items():
            model.hparams.check_finite = check_finite
            trainer = _bench_trainer(
                device, precision, [clock.callback], max_steps=args.steps + 1, limit_train_batches=args.steps + 1
            )
            trainer.fit(
                model,
                DataLoader(
                    TensorDataset(x.cpu().repeat(args.steps + 1, 1, 1, 1), y.cpu().repeat(args.steps + 1)),
                    batch_size=x.shape[0],
                ),
            )
        model.to(device).train()
        for i, (xb, yb) in enumerate(data):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.fit_precision == "bf16"):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync()
            if i >= 1 or args.steps == 1:
                plain_steps.append(time.perf_counter() - t0)
    lightning = statistics.median(clocks[False].steps)
    checked = statistics.median(clocks[True].steps)
    plain = statistics.median(plain_steps)
    return {
        "lightning_ms": lightning * 1e3,
        "plain_ms": plain * 1e3,
        "ratio": lightning / plain,
        "check_finite_ms": checked * 1e3,
        "check_finite_ratio": checked / lightning,
        "steps": len(clocks[False].steps),
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


def data_pipeline(args, device, step_img_s):
    """Images/s of the ImageFolder pipeline (JPEG decode + train transforms, workers) vs the model step."""
    from PIL import Image

    from lightning_frozenbn import ImageFolderDataModule

    with tempfile.TemporaryDirectory() as tmp:
        g = torch.Generator().manual_seed(0)
        side = max(args.image_size * 8 // 7, 64)
        for split in ("train", "val"):
            for c in range(4):
                folder = Path(tmp) / split / f"class{c}"
                folder.mkdir(parents=True)
                for i in range(args.data_images // 4 if split == "train" else 1):
                    base = torch.rand(3, 8, 8, generator=g)
                    img = F.interpolate(base[None], size=(side, side), mode="bilinear")[0]
                    img = (img + 0.05 * torch.randn(3, side, side, generator=g)).clamp(0, 1)
                    Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{i}.jpg", quality=90)
        dm = ImageFolderDataModule(
            tmp, image_size=args.image_size, batch_size=args.batch_size, num_workers=args.workers
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        for _ in loader:  # epoch 0 starts the (persistent) workers
            pass
        # time a whole second epoch, from the iterator's creation: prefetching cannot hide decode time
        t0, n = time.perf_counter(), 0
        for xb, _ in loader:
            n += xb.shape[0]
        elapsed = time.perf_counter() - t0
    rate = n / elapsed
    return {
        "pipeline_img_per_s": rate,
        "model_step_img_per_s": step_img_s,
        "workers": args.workers,
        "limit": "n/a" if step_img_s != step_img_s else ("input pipeline" if rate < step_img_s else "model step"),
        "images": n,
    }


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
    parser.add_argument("--sections", default="steps,saved,profile,lightning,guard,data")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--fit-precision", choices=["fp32", "bf16"])
    parser.add_argument("--workers", type=int)
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
        workers=8 if gpu else 2,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.channels_last = gpu
    args.saved_batch, args.saved_size = 8, 64
    args.data_images = 2048 if gpu else 256
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
    if "lightning" in sections:
        result["lightning"] = lightning_vs_plain(args, device, x, y)
        print("\n## Lightning Trainer.fit step vs plain PyTorch loop (ours, median per step)")
        print("(check_finite_ratio: the default NaN check's host sync, Lightning with it / without it)")
        print(
            fmt_table(
                [result["lightning"]],
                ["lightning_ms", "plain_ms", "ratio", "check_finite_ms", "check_finite_ratio", "steps"],
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
    if "data" in sections:
        result["data"] = data_pipeline(args, device, step_rate or float("nan"))
        print("\n## Input pipeline (ImageFolder: JPEG decode + train transforms) vs model step")
        print(fmt_table([result["data"]], ["pipeline_img_per_s", "model_step_img_per_s", "workers", "limit", "images"]))
    save(result)
    if "steps" in sections and args.compile:  # last: compilation takes minutes
        compiled = bench_steps(args, device, x, y, "bf16", True, VARIANTS[:4])
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
