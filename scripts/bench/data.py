"""Section "data": the input pipeline on real JPEG photographs, and Trainer.fit on them."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.clock import _bench_trainer, _StepClock
from bench.table import fmt_table
from lightning_frozenbn import FrozenBNClassifier


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
    "DALI, CPU backend": dict(decode="tensor", decode_device="dali", dali_cpu=True),
    "DALI on the GPU": dict(decode="tensor", decode_device="dali"),
}


def _available(name, device):
    """GPU pipelines only on CUDA; DALI only where it is installed."""
    if "GPU" in name and device.type != "cuda":
        return False
    if "DALI" in name:
        import importlib.util

        return importlib.util.find_spec("nvidia.dali") is not None
    return True


def _photo_datamodule(root, args, workers, image_size, batch_size, repeat=1, dali_cpu=False, **kwargs):
    """The package's ImageFolderDataModule; ``repeat`` > 1 makes an epoch go over the files several times."""
    from torch.utils.data import ConcatDataset

    from lightning_frozenbn import ImageFolderDataModule

    class Repeated(ImageFolderDataModule):
        def setup(self, stage):
            super().setup(stage)
            train = self.datasets.get("train")
            if repeat > 1 and train is not None and not isinstance(train, ConcatDataset):
                if self.decode_device == "dali":  # DALI reads the file list
                    if len(train.samples) == len(train.imgs):
                        train.samples = train.samples * repeat
                else:
                    self.datasets["train"] = ConcatDataset([train] * repeat)

        def make_loader(self, split, dataset, shuffle):
            loader = super().make_loader(split, dataset, shuffle)
            if dali_cpu and self.decode_device == "dali" and hasattr(loader, "device_id"):
                loader.device_id = None  # DALI's CPU backend, also on a GPU machine
            return loader

    return Repeated(root, image_size=image_size, batch_size=batch_size, num_workers=workers, **kwargs)


def pipeline_rates(args, device, root):
    """Images/s delivered to the device, normalised, by each pipeline and worker count (train transform).

    Counts what the model would receive: batches from the DataLoader, moved to the device and, for
    our pipeline, normalised there (as the Trainer's transfer hooks do). Each run takes
    ``max(16, 6 x workers)`` batches of ``--pipeline-batch`` images; the rate is over the batches after
    each worker's first one (worker start-up excluded); median of interleaved rounds.
    """
    pipelines = [p for p in PIPELINES if _available(p, device)]
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
        if "stock" not in name and _available(name, device) and not (device.type == "cuda" and kwargs.get("dali_cpu")):
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


def run(ctx):
    data = data_section(ctx.args, ctx.device, lambda d: ctx.save({**ctx.result, "data": d}))
    step_rate = next(
        (
            r["img_per_s"]
            for r in ctx.result.get("steps", [])
            if r["variant"] == "ours (folded)" and r["precision"] == ctx.args.fit_precision and not r["compiled"]
        ),
        None,
    )
    if step_rate:
        data["model_step_img_per_s"] = step_rate
    return data


def report(ctx, data):
    a = ctx.args
    out = [
        f"## Input pipeline on {data['photos']} real photos ({data['photo_size']}), train transform to "
        f"{a.data_image_size} px, batch {a.pipeline_batch}: images/s delivered to the device, normalised",
        fmt_table(data["pipelines"], ["pipeline", "workers", "img_per_s", "img_per_s_per_worker", "vs_stock"]),
    ]
    if data.get("fit"):
        out += [
            f"\n## Trainer.fit on those JPEGs ({a.workers} workers) vs on in-memory tensors ({a.arch}, "
            f"{a.image_size} px, {a.fit_precision}, steady time per step; vs_synthetic_speed 1.0 = data costs nothing)",
            fmt_table(data["fit"], ["data", "workers", "ms_per_step", "img_per_s", "vs_synthetic_speed", "runs"]),
        ]
    return "\n".join(out)
