"""A data module's splits written once into litdata chunks (local or ``s3://``): the optimize command."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_frozenbn.data.contract import ChunkEntry, LabelledDataModule
from lightning_frozenbn.data.location import LOCK, Location, WriterLock
from lightning_frozenbn.errors import DataError
from lightning_frozenbn.version import __version__

__all__ = ["FORMAT", "MANIFEST", "check_chunks", "main", "optimize_data", "read_manifest", "require_litdata"]

FORMAT = "lightning_frozenbn.chunks"
VERSION = 1
MANIFEST = "lightning_frozenbn.json"  # written last: its presence means every split is complete
PENDING = "lightning_frozenbn.pending.json"  # what is being written; an interrupted run resumes from it
INSTALL = 'pip install "lightning_frozenbn[streaming]"'


def require_litdata() -> None:
    """Import litdata or stop with the install command (it is an optional extra)."""
    try:
        import litdata  # noqa: F401
    except ImportError as err:
        raise DataError(f"Streaming needs litdata, which is not installed: {INSTALL}") from err
    # litdata uploads and downloads through obstore, whose client refuses plain-http endpoints unless
    # told otherwise; an S3-compatible store on http (MinIO in a cluster, a local test server) is a
    # deliberate choice of the URL in AWS_ENDPOINT_URL, so allow it (https endpoints are unaffected).
    from litdata.streaming import downloader

    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict):
        options.setdefault("allow_http", "true")


def read_manifest(location: Location) -> dict[str, Any]:
    """The manifest of a complete chunk folder written by this package, checked; else a :class:`DataError`."""
    location.check_reachable()
    try:
        manifest = location.read_json(MANIFEST)
    except (OSError, ValueError) as err:
        raise DataError(f"Cannot read {location.join(MANIFEST)!r}: {err}.") from err
    if manifest is None:
        pending = location.read_json(PENDING)
        why = (
            "its writing was interrupted (rerun the same optimize command: it resumes)"
            if pending is not None
            else "it was not written by `lightning-frozenbn-optimize`"
        )
        raise DataError(f"{location.url!r} is not a complete chunk folder of this package: {why}.")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(
            f"{location.url!r} holds chunks of format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this package reads {FORMAT!r} version {VERSION}. Rewrite them with this version's "
            "`lightning-frozenbn-optimize`."
        )
    return manifest


def check_chunks(location: Location, split: str) -> None:
    """Every chunk a split's index lists is there with the size the index says, or one :class:`DataError`.

    Why: litdata meets a missing or truncated chunk only when a worker reaches it, as a
    ``ChunkWaitTimeoutError`` traceback deep in a loader; checked here, when the split is opened.
    """
    index = location.read_json(f"{split}/index.json")
    if index is None:
        raise DataError(
            f"{location.join(split)!r} has no index.json: rerun `lightning-frozenbn-optimize` into a new folder."
        )
    sizes = location.sizes(split)
    for chunk in index["chunks"]:
        name, expected = chunk["filename"], int(chunk["chunk_bytes"])
        found = sizes.get(name)
        if found != expected:
            what = "is missing" if found is None else f"holds {found} bytes where the index says {expected}"
            raise DataError(
                f"Chunk {location.join(split, name)!r} {what}: the chunk folder is damaged. Delete it and rerun "
                "`lightning-frozenbn-optimize` (or write to a new output_dir)."
            )


# ---- what is written: one sample per image, its encoded bytes untouched --------------------------
def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise DataError(f"Cannot read image {path!r}: {err}. Delete or replace this file and rerun.") from err


# The sample schema, in one place: what one item of a chunk holds (read back by data/streaming.py's items).
def _row(task: str, index: int, entry: ChunkEntry) -> list:
    """An entry as the JSON-able list litdata passes to a writer (and compares when it resumes)."""
    if task == "detection":
        return [index, entry.file, json.dumps(entry.record)]
    return [index, entry.file, entry.label, entry.name]


def _classification_item(row: list) -> dict[str, Any]:
    index, path, label, name = row
    return {"index": index, "image": _read_bytes(path), "label": label, "name": name}


def _detection_item(row: list) -> dict[str, Any]:
    index, path, record = row
    return {"index": index, "image": _read_bytes(path), "record": record}


def _fingerprint(rows: list) -> str:
    """A digest of a split's source files as they are now: each file's name, size and modification time.

    With the labels or COCO records: a file changed on disk (same names, same counts) after the chunks were
    written changes it, so a rerun does not take the old chunks for complete.
    """
    digest = hashlib.sha256()
    for row in rows:
        path = row[1]
        try:
            stat = os.stat(path)
        except OSError as err:
            raise DataError(f"Cannot read image {path!r}: {err}. Delete or replace this file and rerun.") from err
        digest.update(json.dumps([*row, stat.st_size, stat.st_mtime_ns]).encode())
    return digest.hexdigest()


def _describe(data: pl.LightningDataModule, splits: list[str] | None) -> tuple[dict[str, Any], dict[str, list]]:
    """The manifest's description of ``data`` and, per split, the rows to write (in the split's order).

    Everything comes through :class:`~lightning_frozenbn.data.contract.LabelledDataModule`: a data module
    of any kind that implements it can be written; the entries are checked there (each image's header is
    read in this process, before anything is written: an error raised in litdata's writer processes left
    ``optimize`` waiting forever, litdata 0.2.76 with fork).
    """
    if not isinstance(data, LabelledDataModule):
        raise DataError(
            f"{type(data).__name__} cannot be optimized: expected a LabelledDataModule (ImageFolderDataModule, "
            "CocoDetectionDataModule, their subclasses, or your own data module implementing the contract: "
            "docs/data.md, 'Your own data module')."
        )
    data.prepare_data()
    wanted = splits or data.chunk_splits()
    rows = {split: [_row(data.task, i, entry) for i, entry in enumerate(data.chunk_entries(split))] for split in wanted}
    return {"task": data.task, **data.chunk_description()}, rows


def optimize_data(
    data: pl.LightningDataModule,
    output_dir: str,
    splits: list[str] | None = None,
    num_workers: int | None = None,
    chunk_bytes: str = "64MB",
) -> dict[str, Any]:
    """Write ``data``'s splits into litdata chunks under ``output_dir/<split>/`` and return the manifest.

    Each sample holds the image file's bytes as they are on disk (no re-encoding: the streamed pixels
    are the folder's pixels), its label (classification) or its COCO record (detection), and its index
    in the split. The class names or COCO categories go into ``lightning_frozenbn.json``, written last:
    a folder without it is incomplete and no reader takes it. An interrupted run, started again with the
    same arguments, skips the splits already written and resumes the split it was writing (litdata's
    checkpoints). A folder that holds anything else is refused, so nothing is mixed or overwritten.

    Args:
        data: a :class:`~lightning_frozenbn.data.contract.LabelledDataModule` to read (the folder and COCO
            modules, their subclasses, or your own).
        output_dir: a local folder or ``s3://bucket/prefix`` (endpoint and keys from the environment).
        splits: the splits to write; default every split the data has.
        num_workers: litdata's writer processes (default: the CPU count, at most 8).
        chunk_bytes: the size of one chunk (litdata's notation, e.g. "64MB").
    """
    require_litdata()
    location = Location(str(output_dir))
    location.check_reachable()
    description, entries = _describe(data, splits)

    spec = {
        "format": FORMAT,
        "version": VERSION,
        **description,
        "splits": {split: len(items) for split, items in entries.items()},
        "sources": {split: _fingerprint(items) for split, items in entries.items()},
        "written_by": f"lightning_frozenbn {__version__}",
    }
    with WriterLock(location):  # checks and writes by one writer at a time
        done, pending = location.read_json(MANIFEST), location.read_json(PENDING)
        if done is not None:
            if done == spec:
                print(f"{location.url}: already complete ({spec['splits']}); nothing to write.", file=sys.stderr)
                return done
            if _same_but_sources(done, spec):
                before = done.get("sources") or {}
                changed = sorted(s for s in spec["sources"] if before.get(s) != spec["sources"][s])
                raise DataError(
                    f"output_dir {location.url!r} holds chunks of this dataset, but its source files changed since "
                    f"they were written (splits {', '.join(changed)}: a file's size or modification time differs): the "
                    "chunks hold the old bytes. Delete that folder and rerun, or write to a new output_dir."
                )
            raise DataError(
                f"output_dir {location.url!r} already holds another chunked dataset ({done.get('task')}, splits "
                f"{done.get('splits')}). Choose a new output_dir, or delete that one first."
            )
        if pending is not None and pending != spec and _same_but_sources(pending, spec):
            print(
                f"{location.url}: the source files changed since the interrupted write began; writing every "
                "split again.",
                file=sys.stderr,
            )
            for split in pending.get("splits", {}):
                location.delete_folder(split)
            pending = None
            location.delete(PENDING)
        if pending is not None and pending != spec:
            raise DataError(
                f"output_dir {location.url!r} holds an interrupted write of another dataset (splits "
                f"{pending.get('splits')}). Delete it, or rerun the command that started it."
            )
        if pending is None and [e for e in location.entries() if e != LOCK]:
            raise DataError(
                f"output_dir {location.url!r} exists and holds other files "
                f"({', '.join([e for e in location.entries() if e != LOCK][:5])}): "
                "choose a new or empty folder, so that nothing is mixed with or overwrites them."
            )
        location.write_json(PENDING, spec)
        workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
        item = _classification_item if spec["task"] == "classification" else _detection_item
        # litdata sets the process-wide start method (spawn by default) and leaves it: put the caller's back
        previous = multiprocessing.get_start_method(allow_none=True)
        try:
            _write_splits(location, entries, item, workers, chunk_bytes)
        finally:
            multiprocessing.set_start_method(previous, force=True)
        location.write_json(MANIFEST, spec)
        location.delete(PENDING)
        return spec


def _same_but_sources(written: dict[str, Any], spec: dict[str, Any]) -> bool:
    """Whether a manifest describes the same dataset as ``spec`` except for the source files' fingerprints."""
    ignore = ("sources", "written_by")
    return {k: v for k, v in written.items() if k not in ignore} == {k: v for k, v in spec.items() if k not in ignore}


def _write_splits(location: Location, entries: dict[str, list], item: Any, workers: int, chunk_bytes: str) -> None:
    from litdata import optimize

    # the writers only read files: fork starts them in milliseconds where spawn re-imports torch in each
    start = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    for split, items in entries.items():
        if split == "train":
            # written in a seeded random order: litdata shuffles chunks and samples within a chunk, so
            # chunks holding one class each (folders are listed class by class) would give one-class batches
            items = [items[i] for i in torch.randperm(len(items), generator=torch.Generator().manual_seed(0))]
        # lists, not tuples: litdata compares its checkpoint's JSON with the items to resume an interrupted
        # split, and a tuple never equals its JSON list (every resume was refused as "not compatible")
        items = [list(entry) for entry in items]
        if _written(location, split) == len(items):
            continue  # finished by an earlier, interrupted run
        settings = dict(output_dir=location.join(split), chunk_bytes=chunk_bytes, reorder_files=False, verbose=False)
        settings.update(num_workers=max(1, min(workers, len(items))), start_method=start)
        try:  # an interrupted split resumes from litdata's checkpoints
            optimize(item, items, use_checkpoint=True, **settings)
        except ValueError as err:
            if (
                "checkpoint" not in str(err).lower()
            ):  # litdata: "Existing checkpoints are not compatible ...", "The number of workers in the checkpoints ..."
                raise
            # written with other settings (another --num_workers, --chunk_bytes): start this split over
            print(
                f"{location.join(split)}: the interrupted write used other settings; writing it again.", file=sys.stderr
            )
            location.delete_folder(split)
            optimize(item, items, use_checkpoint=True, **settings)
        if _written(location, split) != len(items):
            raise DataError(
                f"Writing {location.join(split)!r} ended with {_written(location, split)} of {len(items)} samples."
            )


def _written(location: Location, split: str) -> int:
    """Samples in a split's litdata index (0 if it has none yet)."""
    index = location.read_json(f"{split}/index.json")
    return sum(chunk["chunk_size"] for chunk in index["chunks"]) if index else 0


def main(args: list[str] | None = None) -> None:
    """``lightning-frozenbn-optimize``: ``--config`` a fit config (its ``data`` section is used) ``--output_dir``."""
    from jsonargparse import ActionConfigFile

    from lightning_frozenbn.parser import ConciseErrorsParser

    parser = ConciseErrorsParser(
        description="Write a data module's splits into litdata chunks (local folder or s3://) for streaming."
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="a fit config: its data section is used, the rest ignored"
    )
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=True)
    parser.add_argument("--output_dir", type=str, required=True, help="local folder or s3://bucket/prefix")
    parser.add_argument("--splits", type=list[str] | None, default=None, help="default: every split the data has")
    parser.add_argument("--num_workers", type=int | None, default=None, help="writer processes")
    parser.add_argument("--chunk_bytes", type=str, default="64MB", help="size of one chunk")
    for section in ("seed_everything", "trainer", "model", "checkpoint", "guard", "optimizer", "lr_scheduler"):
        parser.add_argument(f"--{section}", type=Any, default=None, help="a fit config's section; ignored here")
    config = parser.parse_args(args)
    try:
        data = parser.instantiate(config).data
        manifest = optimize_data(data, config.output_dir, config.splits, config.num_workers, config.chunk_bytes)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{config.output_dir}: {manifest['task']}, {manifest['splits']}")
