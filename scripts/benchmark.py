"""Side-by-side benchmark of the frozen-BN recipe: ours (folded) vs the peers a user would pick instead.

Everything runs in ONE process, interleaved round by round, and reports medians of many steps and
ratios, so machine noise hits every variant alike. Prints tables and writes a JSON file.

    python scripts/benchmark.py                       # CPU defaults: resnet50, batch 16, 64 px (< 5 min)
    python scripts/benchmark.py --device cuda         # H100 recipe sizes: batch 256, 224 px, + torch.compile

Sections: step time and peak memory per variant (fp32 and bf16 autocast; eager, and compiled on
CUDA, where ours runs the fused epilogue and is also timed with it off); bytes autograd saves for backward in one forward
(deterministic: the memory figure that holds on a noisy CPU); a per-op profile of ours vs the
strongest peer; the input pipeline on real photographs (stock PIL path vs ours per worker count,
nvJPEG on CUDA) and ``Trainer.fit`` on those JPEGs vs in-memory tensors (``data``); Lightning
``Trainer.fit`` step vs a plain PyTorch loop (and the cost of the NaN check, every step or deferred);
the FrozenModuleGuard's overhead; the Faster R-CNN C4 training step (ours folded vs the same detector
with torchvision's FrozenBatchNorm2d vs torchvision's ``fasterrcnn_resnet50_fpn``: time and saved bytes); the
R50-FPN training step (``fpn``: ours folded and unfolded vs torchvision's model as its COCO weights build it);
the exported classifier in onnxruntime vs the eager model at batch 1 and 8 (``deploy``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sections, also when loaded from a file path

import lightning  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from bench import data, deploy, detection, fpn, guard_cost, profile, saved, steps, streaming, trainer_step  # noqa: E402

# Every section, in run order: its key in --sections and in the JSON, run(ctx) -> what the JSON holds under
# that key, report(ctx, value) -> the printed tables. Compiled step times run last (minutes of compilation).
SECTIONS = [
    ("steps", steps),
    ("saved", saved),
    ("profile", profile),
    ("data", data),
    ("lightning", trainer_step),
    ("guard", guard_cost),
    ("detection", detection),
    ("fpn", fpn),
    ("deploy", deploy),
    ("streaming", streaming),
]


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
        "--epilogue-off",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time ours with the fused epilogue off (default: on for cuda, where the epilogue is used)",
    )
    parser.add_argument("--sections", default="steps,saved,profile,lightning,guard,data,detection,fpn,deploy,streaming")
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
    parser.add_argument("--stream-images", type=int, default=512, help="photos of the streaming section")
    parser.add_argument(
        "--compile-variants",
        default="ours (folded),detectron2 FrozenBN",
        help="variants timed under torch.compile (ours: the compiler fuses the epilogue; the cuDNN path is eager-only)",
    )
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
        epilogue_off=gpu,
        fit_precision="bf16" if gpu else "fp32",
        workers=min(14, max(1, (os.cpu_count() or 2) - 2)) if gpu else 2,
        worker_counts="1,8,14" if gpu else "1,2",
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
    requested = args.sections.split(",")
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

    def save(value):  # after every section, so a run cut short by a timeout keeps what it measured
        Path(args.output).write_text(json.dumps(value, indent=2, default=str))

    ctx = SimpleNamespace(args=args, device=device, x=x, y=y, result=result, save=save)
    print(
        f"# {name}, torch {torch.__version__}, {args.arch}, batch {args.batch_size}, {args.image_size} px, freeze_at=2"
    )
    for key, section in SECTIONS:
        if key in requested:
            result[key] = section.run(ctx)
            print("\n" + section.report(ctx, result[key]))
            save(result)
    if "steps" in requested and args.compile:
        compiled = steps.run_compiled(ctx)
        result["steps"] += compiled
        print("\n" + steps.report_compiled(ctx, compiled))
        save(result)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
