"""NVIDIA DALI input pipelines: decoding fused with the crop, on the GPU or DALI's CPU (``decode_device: dali``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_frozenbn.data.sampling import EpochShuffleSampler
from lightning_frozenbn.errors import DataError

__all__ = ["DaliLoader", "DaliTransform", "require_dali"]

INSTALL = 'pip install "lightning_frozenbn[dali]"'


def require_dali() -> None:
    """Import DALI or stop with one line naming the install command (it is an optional extra)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as err:
        raise DataError(
            f"decode_device='dali' needs NVIDIA DALI, which is not installed here ({err}): {INSTALL}, or use "
            "decode_device 'cpu' or 'cuda'."
        ) from err


@dataclass(frozen=True)
class DaliTransform:
    """What the pipeline does to each image: the data module's transform, in DALI's operators.

    Training: ``decoders.image_random_crop`` (region-of-interest decoding: only the crop's part of a
    JPEG is decoded, by the GPU's hardware decoder where it has one) drawing area and aspect ratio as
    ``RandomResizedCrop`` does, then a resize to ``image_size`` and an optional flip. Evaluation: the
    shorter side resized to ``eval_resize`` with the longer side computed as torchvision's ``Resize``
    computes it (integer sizes, no sub-pixel scale) and the centre crop at torchvision's offsets, so
    the crop matches the uint8 path within one intensity level (``tests/data/test_dali.py``). EXIF
    orientation is ignored, as on the other paths. Normalised with the ImageNet statistics.
    """

    image_size: int
    eval_resize: int
    min_scale: float
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _pipeline(
    files: list[str],
    labels: list[int],
    transform: DaliTransform,
    augment: bool,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    seed: int,
    channels_last: bool,
) -> Any:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali.pipeline import Pipeline

    size = transform.image_size
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    decode_on = "cpu" if device_id is None else "mixed"
    with pipe:
        # the order is the caller's (a permutation per epoch, sharded per rank): no shuffle here
        jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="reader")
        if augment:
            image = fn.decoders.image_random_crop(
                jpegs,
                device=decode_on,
                output_type=types.RGB,
                random_area=[transform.min_scale, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=10,
                adjust_orientation=False,
            )
            image = fn.resize(image, resize_x=size, resize_y=size, antialias=True, interp_type=types.INTERP_LINEAR)
            mirror = fn.random.coin_flip(probability=0.5) if transform.hflip else 0
        else:
            image = fn.decoders.image(jpegs, device=decode_on, output_type=types.RGB, adjust_orientation=False)
            shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT)
            height, width = shape[0], shape[1]
            short = dmath.min(height, width)
            # torchvision's Resize(eval_resize): shorter side exact, longer side int(eval_resize * long / short)
            rh = dmath.floor(transform.eval_resize * height / short)
            rw = dmath.floor(transform.eval_resize * width / short)
            image = fn.resize(
                image, resize_x=rw, resize_y=rh, antialias=True, interp_type=types.INTERP_LINEAR, subpixel_scale=False
            )
            # torchvision's CenterCrop offset: round((resized - size) / 2), rounding half to even
            top, left = (_half_even(dmath, resized - size) for resized in (rh, rw))
            image = fn.slice(
                image,
                fn.stack(top, left),
                [float(size), float(size)],
                axes=[0, 1],
                normalized_anchor=False,
                normalized_shape=False,
            )
            mirror = 0
        image = fn.crop_mirror_normalize(
            image,
            mirror=mirror,
            mean=[255 * m for m in transform.mean],
            std=[255 * s for s in transform.std],
            dtype=types.FLOAT,
            output_layout="HWC" if channels_last else "CHW",
        )
        pipe.set_outputs(image, label)
    pipe.build()
    return pipe


def _half_even(dmath: Any, k: Any) -> Any:
    """``round(k / 2)`` with Python's rounding (half to even) in DALI arithmetic: ``m + (m % 2) * (k % 2)``."""
    m = dmath.floor(k / 2)
    return m + (m - 2 * dmath.floor(m / 2)) * (k - 2 * dmath.floor(k / 2))


class DaliLoader:
    """Batches ``[images, labels]`` from a DALI pipeline, as Lightning expects of a loader.

    ``train`` shuffles per epoch and drops the last partial batch; ``augment`` (default: ``train``) takes
    the random crop and flip, else the evaluation transform. It has a length (batches per rank), a
    ``sampler`` whose ``set_epoch`` Lightning calls at each
    epoch, and a fresh pipeline per epoch over that epoch's files: a permutation drawn from
    ``seed + epoch`` (the order :class:`~lightning_frozenbn.data.sampling.EpochShuffleSampler` gives, so a run
    resumed at an epoch sees that epoch's order), cut to a multiple of ``world_size x batch_size`` when
    dropping the last batch and dealt to the ranks as DistributedSampler deals them: every sample once
    per epoch across the ranks. Why not DALI's own ``shard_id``/``random_shuffle``: its shuffle is a
    buffer of nearby samples, not a permutation, and ``shuffle_after_epoch`` leaves the first epoch in
    folder order (class by class). Images arrive normalised, float32, on the pipeline's device (the
    GPU for ``device_id``), laid out channels_last when asked; labels are int64.
    """

    def __init__(
        self,
        files: list[str],
        labels: list[int],
        transform: DaliTransform,
        *,
        train: bool,
        batch_size: int,
        augment: bool | None = None,
        num_threads: int = 4,
        device_id: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        require_dali()
        self.files = list(files)
        self.labels = list(labels)
        self.transform = transform
        self.train = train
        self.augment = train if augment is None else augment
        self.batch_size = batch_size
        self.num_threads = max(1, num_threads)
        self.device_id = device_id
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.channels_last = channels_last
        self.sampler = EpochShuffleSampler(len(self.files), seed)
        self.batch_sampler = None  # Lightning reads both attributes of anything with a sampler

    def _indices(self) -> list[int]:
        """This rank's samples of the current epoch, in order."""
        order = list(self.sampler) if self.train else list(range(len(self.files)))
        if self.train:  # drop the tail: every rank gets the same number of full batches
            keep = len(order) // (self.world_size * self.batch_size) * self.world_size * self.batch_size
            order = order[:keep]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches per rank, counted without drawing the epoch's permutation."""
        if self.train:
            return len(self.files) // (self.world_size * self.batch_size)
        n = len(range(self.rank, len(self.files), self.world_size))
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        indices = self._indices()
        if not indices:
            return
        pipe = _pipeline(
            [self.files[i] for i in indices],
            [self.labels[i] for i in indices],
            self.transform,
            self.augment,
            self.batch_size,
            self.num_threads,
            self.device_id,
            self.seed + 1000 * self.sampler.epoch + self.rank,
            self.channels_last,
        )
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        iterator = DALIGenericIterator(pipe, ["image", "label"], reader_name="reader", last_batch_policy=policy)
        try:
            for out in iterator:
                image, label = out[0]["image"], out[0]["label"]
                if self.channels_last:  # HWC from the pipeline: an NCHW view with channels_last strides
                    image = image.permute(0, 3, 1, 2)
                yield [image, label.reshape(-1).to(torch.int64)]
        finally:
            del iterator, pipe
