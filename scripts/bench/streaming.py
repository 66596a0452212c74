"""Section "streaming": images/s from litdata chunks vs from the same JPEG files, per worker, side by side."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.data import make_photos
from bench.table import fmt_table


def _loader(kind, root, chunks, workers, args):
    from lightning_frozenbn import ImageFolderDataModule, StreamingImageDataModule

    common = dict(image_size=args.data_image_size, batch_size=args.pipeline_batch, num_workers=workers)
    if kind == "folder":
        dm = ImageFolderDataModule(root, **common)
    else:
        dm = StreamingImageDataModule(str(chunks), min_scale=0.08, hflip=True, **common)
    dm.setup("fit")
    return dm, dm.train_dataloader()


def run(ctx):
    """Interleaved rounds: for each worker count, one epoch from the files, then one from the chunks.

    The same JPEGs (``--stream-images`` photos), the same transform (random-resized crop + flip to
    ``--data-image-size``, uint8, normalised on the device), the same batch size. The rate is over the
    batches after each worker's first (start-up excluded); the medians of the rounds are compared.
    """
    from lightning_frozenbn.data.chunks import optimize_data

    args, device = ctx.args, ctx.device
    with tempfile.TemporaryDirectory() as tmp:
        root = make_photos(Path(tmp) / "photos", args.stream_images)
        from lightning_frozenbn import ImageFolderDataModule

        chunks = Path(tmp) / "chunks"
        started = time.perf_counter()
        optimize_data(ImageFolderDataModule(root), str(chunks), num_workers=max(args.worker_counts))
        optimize_s = time.perf_counter() - started
        rates = {(k, w): [] for w in args.worker_counts for k in ("folder", "chunks")}
        for _ in range(args.data_rounds):
            for workers in args.worker_counts:
                for kind in ("folder", "chunks"):
                    dm, loader = _loader(kind, root, chunks, workers, args)
                    arrivals, images = [], 0
                    for batch in loader:
                        batch = dm.on_after_batch_transfer(dm.transfer_batch_to_device(batch, device, 0), 0)
                        arrivals.append(time.perf_counter())
                        if len(arrivals) > workers:
                            images += batch[0].shape[0]
                    rates[(kind, workers)].append(images / (arrivals[-1] - arrivals[workers - 1]))
                    del dm, loader
    rows = []
    for workers in args.worker_counts:
        folder, streamed = (statistics.median(rates[(k, workers)]) for k in ("folder", "chunks"))
        rows.append(
            {
                "workers": workers,
                "folder_img_per_s_per_worker": folder / workers,
                "chunks_img_per_s_per_worker": streamed / workers,
                "chunks_vs_folder": streamed / folder,
                "rounds": {k: rates[(k, workers)] for k in ("folder", "chunks")},
            }
        )
    return {"images": args.stream_images, "optimize_s": optimize_s, "rows": rows}


def report(ctx, value):
    cols = ["workers", "folder_img_per_s_per_worker", "chunks_img_per_s_per_worker", "chunks_vs_folder"]
    head = (
        f"## Streaming: litdata chunks vs the same {value['images']} JPEG files (train transform, "
        f"{ctx.args.data_image_size} px, batch {ctx.args.pipeline_batch}; medians of {ctx.args.data_rounds} rounds; "
        f"writing the chunks took {value['optimize_s']:.1f} s)"
    )
    return head + "\n" + fmt_table(value["rows"], cols)
