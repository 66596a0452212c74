"""ChunkSource: a chunk folder's checked manifest and its splits as litdata streams, resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_frozenbn.data.chunks import check_chunks, read_manifest, require_litdata
from lightning_frozenbn.data.location import Location
from lightning_frozenbn.errors import DataError

__all__ = ["ChunkSource"]


def _epoch_loader_class() -> type:
    from litdata import StreamingDataLoader

    class EpochLoader(StreamingDataLoader):
        """litdata's StreamingDataLoader whose resumed epoch ends when its last batch is handed out.

        Why: after ``load_state_dict`` litdata replays from the saved position until its generator is
        exhausted, but Lightning stops iterating once it has the epoch's last batch; the flag stays set
        and the *next* epoch replays the finished one's (empty) remainder: a mid-epoch resume loses a
        whole epoch without a message (litdata 0.2.76 with Lightning 2.6; tests/data/test_streaming.py).
        Here an iteration that reached the epoch's end clears the flag before the next one starts.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._start = 0
            self._epoch_done = False

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            super().load_state_dict(obj)
            self._start = int(obj.get("num_samples_yielded", 0)) // int(self.batch_size or 1)
            self._epoch_done = False

        def __iter__(self) -> Any:
            if self._epoch_done:
                self.restore = False
                self._start = 0
            self._epoch_done = False
            total = len(self)
            for position, batch in enumerate(super().__iter__(), start=self._start + 1):
                self._epoch_done = position >= total
                yield batch
            self._start = 0

    return EpochLoader


def _dataset_class() -> type:
    from litdata import StreamingDataset

    class Samples(StreamingDataset):
        """A chunked split; each item goes through ``convert(item)``."""

        def __init__(self, input_dir: str, convert: Any, cache_dir: str | None, **kwargs: Any) -> None:
            super().__init__(input_dir=input_dir, cache_dir=cache_dir, **kwargs)
            self.convert = convert

        def __getitem__(self, index: Any) -> Any:
            return self.convert(super().__getitem__(index))

    return Samples


class ChunkSource:
    """The chunks of one data module: where they are, what the manifest says, each split as a stream.

    litdata shards the samples over ranks, nodes and workers (no DistributedSampler), shuffles anew
    each epoch from the seed, and keeps downloaded chunks of a remote store in ``cache_dir`` up to
    ``max_cache_size``. The training loader's position is kept for the checkpoint (:meth:`state_dict`).

    Args:
        root: the chunk folder (local path or ``s3://bucket/prefix``).
        task: the task the chunks must have been written for ("classification" or "detection").
        cache_dir: where chunks of a remote store are cached (default: litdata's).
        max_cache_size: the cache's size limit (litdata's notation, e.g. "50GB").
        loader_args: ``batch_size``, ``num_workers``, ``pin_memory`` of every loader.
    """

    def __init__(
        self, root: str, task: str, cache_dir: str | None, max_cache_size: str, loader_args: dict[str, Any]
    ) -> None:
        require_litdata()
        self.location = Location(str(root))
        self.task = task
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size
        self.loader_args = loader_args
        self._manifest: dict[str, Any] | None = None
        self._train_loader: Any = None
        self._resume_state: dict[str, Any] | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        """The chunk folder's manifest (read once, checked for format, version and task)."""
        if self._manifest is None:
            manifest = read_manifest(self.location)
            if manifest.get("task") != self.task:
                raise DataError(
                    f"{self.location.url!r} holds {manifest.get('task')} chunks, not {self.task}: point "
                    f"`data.init_args.root` at chunks written from a {self.task} data module."
                )
            self._manifest = manifest
        return self._manifest

    def augment(self, key: str, given: Any, default: Any) -> Any:
        """An augmentation setting: ``given`` unless None, else the written data module's, else ``default``."""
        return self.manifest.get("augment", {}).get(key, default) if given is None else given

    def open(self, split: str, convert: Callable[[dict[str, Any]], Any], train: bool, seed: int) -> Any:
        """The split as a litdata dataset whose items go through ``convert`` (its chunks checked first)."""
        if split not in self.manifest["splits"]:
            raise DataError(
                f"{self.location.url!r} has no {split!r} split (it has {sorted(self.manifest['splits'])}): "
                f"write it with `lightning-frozenbn-optimize --splits [..., {split}]`."
            )
        check_chunks(self.location, split)  # a missing or truncated chunk: one line now, not a loader timeout later
        cache = None if self.cache_dir is None else str(Path(self.cache_dir) / split)
        return _dataset_class()(
            self.location.join(split),
            convert,
            cache,
            shuffle=train,
            drop_last=train,
            seed=seed,
            max_cache_size=self.max_cache_size,
        )

    def train_stream(self, dataset: Any, **kwargs: Any) -> Any:
        """The training loader, at the position a checkpoint saved if one was loaded."""
        loader = _epoch_loader_class()(dataset, drop_last=True, **self.loader_args, **kwargs)
        if self._resume_state is not None:
            loader.load_state_dict(self._resume_state)
            self._resume_state = None
        self._train_loader = loader
        return loader

    def eval_stream(self, dataset: Any, **kwargs: Any) -> Any:
        """A validation or test loader (every sample, in the written order per rank)."""
        return _epoch_loader_class()(dataset, drop_last=False, **self.loader_args, **kwargs)

    def calibration_stream(self, train: Any, seed: int, **kwargs: Any) -> Any:
        """A new stream of the training split with the training items, for ``calibrate_bn`` alone.

        Why: the training stream's position is what a checkpoint saves for an exact mid-epoch resume.
        Calibrating from it moved litdata's counters, so the saved position was off by the
        calibration's batches and a resumed epoch had a step too many.
        """
        fresh = self.open("train", train.convert, True, seed)
        return _epoch_loader_class()(fresh, drop_last=True, **self.loader_args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (litdata's state), saved in every checkpoint with the data module.

        Why here as well as in the fit loop's state: Lightning restores the loop's copy only when it
        builds the training loader after the checkpoint is read, but a module that asks for
        ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` (any per-step schedule, ours
        included) makes Lightning build the loader before that, and the loop's copy is then never applied:
        the resumed epoch starts over (Lightning 2.6). The data module's state is read first.
        """
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved position for the next training loader."""
        self._resume_state = state_dict.get("train_loader")
