"""Images to uint8 tensors: decoded on the DataLoader workers, or read there and decoded in batches on the GPU."""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.functional import pil_to_tensor

from lightning_frozenbn.errors import DataError

__all__ = [
    "EncodedBatch",
    "EncodedLoader",
    "collate_encoded",
    "decode_batch",
    "decode_bytes",
    "decode_file",
    "decode_stored",
    "load_rgb",
    "load_rgb_bytes",
    "normalize_uint8",
    "nvjpeg_available",
]

_JPEG_MAGIC = (0xFF, 0xD8)


_FILE_FIX = "Delete or replace this file and rerun."
_CHUNK_FIX = "Rewrite the chunks from good files (lightning-frozenbn-optimize checks each image before writing)."


def _open_rgb(source: Any, name: str, fix: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"Cannot decode image {name!r}: {err}. {fix}") from err


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB (grayscale, palette and RGBA converted), naming the file if it is broken.

    A broken file stops training with its path instead of being skipped silently: a skipped file
    changes the data without anyone knowing. Delete or replace the file and rerun.
    """
    try:
        with open(path, "rb") as f:
            return _open_rgb(f, path, _FILE_FIX)
    except OSError as err:  # cannot be opened at all
        raise DataError(f"Cannot decode image {path!r}: {err}. {_FILE_FIX}") from err


def load_rgb_bytes(data: bytes, name: str) -> Image.Image:
    """An image file's bytes held in a chunk, opened as RGB as :func:`load_rgb` opens the file."""
    return _open_rgb(io.BytesIO(data), f"{name} (in the chunks)", _CHUNK_FIX)


def decode_stored(data: bytes, name: str) -> Tensor:
    """A file's bytes as stored in a chunk, decoded as :func:`decode_file` decodes the file."""
    return decode_bytes(torch.frombuffer(bytearray(data), dtype=torch.uint8), name, streamed=True)


def decode_bytes(data: Tensor, name: str, streamed: bool = False) -> Tensor:
    """A file's bytes as a ``(3, H, W)`` uint8 RGB tensor (torchvision.io; PIL for the formats it lacks).

    ``streamed``: the bytes come from a chunk, so an error names the sample in the chunks (the file
    it was written from may not be on this machine) and says to rewrite them.
    """
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        # Formats torchvision's decoders do not read (BMP, TIFF, PPM, ...) go through PIL; bytes PIL
        # cannot read either are broken, and the error names them.
        where, fix = (f"{name} (in the chunks)", _CHUNK_FIX) if streamed else (name, _FILE_FIX)
        return pil_to_tensor(_open_rgb(io.BytesIO(data.numpy().tobytes()), where, fix))


def decode_file(path: str) -> Tensor:
    """Decode an image file to a ``(3, H, W)`` uint8 RGB tensor, exactly as PIL's ``convert("RGB")`` would.

    JPEG, PNG, GIF and WebP are decoded by ``torchvision.io`` (libjpeg-turbo / libpng: the same
    libraries PIL uses, so the pixels are identical); grayscale, palette, RGBA and CMYK images become
    RGB as under PIL. EXIF orientation is ignored, as the PIL path (and torchvision's ImageFolder)
    ignores it. A truncated or undecodable file raises :class:`DataError` naming it.
    """
    try:
        data = read_file(path)
    except (OSError, RuntimeError) as err:
        raise DataError(f"Cannot read image {path!r}: {err}. {_FILE_FIX}") from err
    return decode_bytes(data, path)


def normalize_uint8(x: Tensor, mean: Tensor, std: Tensor, channels_last: bool = False) -> Tensor:
    """``(x / 255 - mean) / std`` as float32, from a uint8 ``(N, 3, H, W)`` batch.

    Done on the device after the transfer: the workers then pin and copy a quarter of the bytes
    (uint8 instead of float32), and the conversion costs the GPU microseconds instead of the
    workers milliseconds. With ``channels_last`` the result is laid out as the model's convolutions
    want it, so the model does not copy it again.
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return _normalize_(x.float(), mean, std)


def _normalize_(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    # (x - 255 mean) / (255 std) == (x / 255 - mean) / std, in place: two passes, no temporaries
    # (faster on CPU than one out-of-place addcmul with broadcast operands: the data benchmark section)
    shift = (255.0 * mean).to(x.device, torch.float32).view(1, -1, 1, 1)
    scale = (1.0 / (255.0 * std)).to(x.device, torch.float32).view(1, -1, 1, 1)
    return x.sub_(shift).mul_(scale)


class EncodedBatch(NamedTuple):
    """A batch of undecoded files, for decoding on the GPU (see :func:`decode_batch`).

    Attributes:
        data: each file's bytes, a 1-D uint8 CPU tensor (nvJPEG reads them from host memory).
        boxes: ``(N, 7)`` int64: crop top, left, height, width; resize height, width; flip (0/1).
        target: class indices.
        paths: the files, so that a broken one can be named.
    """

    data: list[Tensor]
    boxes: Tensor
    target: Tensor
    paths: list[str]


def _resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    # torchvision's Resize(size): the shorter side becomes ``size``, the longer keeps the aspect ratio
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


class EncodedLoader:
    """Reads a file's bytes and plans its crop on a worker, without decoding it.

    The plan draws from torch's RNG in the same order as ``RandomResizedCrop`` + ``RandomHorizontalFlip``
    do, so a seeded run crops the same boxes whichever side decodes. The image size comes from the
    file header (PIL reads only the header here).

    Args:
        image_size: the crop fed to the network.
        train: random-resized crop (+ flip) when True; resize to ``eval_resize`` and centre crop when False.
        min_scale: smallest crop area fraction.
        hflip: random horizontal flips (training only).
        eval_resize: the evaluation resize (default ``round(image_size / 0.875)``).
    """

    def __init__(
        self, image_size: int, train: bool, min_scale: float = 0.08, hflip: bool = True, eval_resize: int | None = None
    ) -> None:
        self.image_size = image_size
        self.train = train
        self.min_scale = min_scale
        self.hflip = hflip
        self.eval_resize = round(image_size / 0.875) if eval_resize is None else eval_resize

    def __call__(self, path: str) -> tuple[Tensor, Tensor, str]:
        """Return ``(bytes, box, path)`` for one file."""
        try:
            # a plain tensor from the bytes: torchvision.io.read_file's tensor cannot always be sent
            # from a worker to the main process (its storage has no shareable file descriptor)
            with open(path, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            with Image.open(path) as img:
                width, height = img.size
        except (UnidentifiedImageError, OSError, RuntimeError) as err:
            raise DataError(f"Cannot decode image {path!r}: {err}. Delete or replace this file and rerun.") from err
        if self.train:
            shape = torch.empty(1, 1, 1).expand(3, height, width)  # a size, no pixels
            top, left, h, w = RandomResizedCrop.get_params(shape, (self.min_scale, 1.0), (3 / 4, 4 / 3))
            flip = int(self.hflip and bool(torch.rand(1) < 0.5))
            box = (top, left, h, w, self.image_size, self.image_size, flip)
        else:
            rh, rw = _resized_size(height, width, self.eval_resize)
            box = (0, 0, height, width, rh, rw, 0)
        return data, torch.tensor(box, dtype=torch.int64), path


def collate_encoded(items: list[tuple[tuple[Tensor, Tensor, str], int]]) -> EncodedBatch:
    """Collate ``((bytes, box, path), label)`` samples into an :class:`EncodedBatch`."""
    return EncodedBatch(
        data=[item[0][0] for item in items],
        boxes=torch.stack([item[0][1] for item in items]),
        target=torch.tensor([item[1] for item in items], dtype=torch.int64),
        paths=[item[0][2] for item in items],
    )


def _decode_all(batch: EncodedBatch, device: torch.device) -> list[Tensor]:
    jpeg = [i for i, d in enumerate(batch.data) if d.numel() > 2 and tuple(d[:2].tolist()) == _JPEG_MAGIC]
    images: list[Tensor | None] = [None] * len(batch.data)
    if jpeg:
        try:
            decoded = decode_jpeg([batch.data[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as err:
            for i in jpeg:  # find the file that broke the batch; the CPU decoder names the problem
                try:
                    decode_image(batch.data[i], mode=ImageReadMode.RGB)
                except RuntimeError as cpu_err:
                    raise DataError(
                        f"Cannot decode image {batch.paths[i]!r}: {cpu_err}. Delete or replace this file and rerun."
                    ) from err
            raise
        for i, image in zip(jpeg, decoded):
            images[i] = image
    for i, image in enumerate(images):
        if image is None:  # PNG and the rest: decoded on the CPU, still cropped on the device
            images[i] = decode_bytes(batch.data[i], batch.paths[i]).to(device, non_blocking=True)
    return images  # type: ignore[return-value]


def decode_batch(
    batch: EncodedBatch,
    device: torch.device | str,
    image_size: int,
    mean: Tensor,
    std: Tensor,
    channels_last: bool = False,
) -> Tensor:
    """Decode, crop, resize, flip and normalise an :class:`EncodedBatch` on ``device``.

    JPEG files go to ``torchvision.io.decode_jpeg`` as one list (nvJPEG's batched decode on CUDA);
    other formats are decoded on the CPU and moved. Each image is then cropped to its box, resized
    (bilinear, antialiased: torchvision's ``Resize``), centre-cropped to ``image_size``, flipped,
    and normalised into one float32 batch. The result matches the worker path within one intensity
    level (the worker path rounds to uint8 after resizing; this one keeps the float).

    Returns:
        The normalised ``(N, 3, image_size, image_size)`` float32 batch on ``device``.
    """
    device = torch.device(device)
    images = _decode_all(batch, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(len(images), 3, image_size, image_size, device=device, memory_format=memory_format)
    for i, (image, box) in enumerate(zip(images, batch.boxes.tolist())):
        top, left, h, w, rh, rw, flip = box
        crop = image[None, :, top : top + h, left : left + w].float()
        if (rh, rw) != (h, w):
            crop = F.interpolate(crop, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        ct, cl = int(round((rh - image_size) / 2.0)), int(round((rw - image_size) / 2.0))
        crop = crop[:, :, ct : ct + image_size, cl : cl + image_size]
        out[i] = crop[0].flip(-1) if flip else crop[0]
    return _normalize_(out.clamp_(0, 255), mean, std)


def nvjpeg_available(device: torch.device | str = "cuda") -> str | None:
    """Return None when ``decode_jpeg(..., device=device)`` works here, else the reason it does not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, NotImplementedError) as err:
        return f"torchvision's GPU JPEG decoder (nvJPEG) failed: {err}"
    return None
