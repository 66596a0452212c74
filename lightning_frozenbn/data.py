"""ImageFolderDataModule: class folders of images on disk, decoded to uint8 and normalised on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from lightning_frozenbn.dali import DaliLoader, DaliTransform, require_dali
from lightning_frozenbn.decode import (
    DataError,
    EncodedBatch,
    EncodedLoader,
    collate_encoded,
    decode_batch,
    decode_file,
    load_rgb,
    normalize_uint8,
    nvjpeg_available,
)

__all__ = ["EpochShuffleSampler", "ImageFolderDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# One source for each choice: the CLI shows the Literal, the checks and the docs test read its values.
Decoder = Literal["tensor", "pil"]
DecodeDevice = Literal["cpu", "cuda", "dali"]
DECODERS: tuple[str, ...] = get_args(Decoder)
DECODE_DEVICES: tuple[str, ...] = get_args(DecodeDevice)


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch``: the order survives a resume.

    PyTorch's RandomSampler draws from a generator that restarts with the DataLoader, so a run
    resumed at epoch 3 would see epoch 0's order again. Lightning calls ``set_epoch`` on samplers
    that have it (as it does for DistributedSampler), so here epoch *k* has the same order whether
    the run was interrupted or not.
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _visible_image(path: str | Path, root: str | Path) -> bool:
    """An image file by its extension, with no hidden part (``.ipynb_checkpoints/``, ``._x.jpg``) below ``root``."""
    parts = Path(path).relative_to(root).parts
    return str(path).lower().endswith(IMG_EXTENSIONS) and not any(p.startswith(".") for p in parts)


class _ImageFolder(ImageFolder):
    """torchvision's ImageFolder minus hidden entries (``.ipynb_checkpoints/``, macOS ``._x.jpg`` files).

    torchvision counts a hidden folder as a class: labels would then disagree with ``num_classes``
    (which skips it) and with the other splits; a hidden ``._x.jpg`` is not an image at all.
    """

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = _class_dirs(Path(directory))
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(
        directory: str | Path,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Any = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        def visible_image(path: str) -> bool:
            return _visible_image(path, directory)

        return ImageFolder.make_dataset(directory, class_to_idx, None, visible_image, allow_empty)


def why_not_a_folder(path: Path) -> str:
    """``"does not exist"`` or ``"is a file, not a folder"``: a file given as a folder is not "missing"."""
    return "is a file, not a folder" if path.exists() else "does not exist"


def predict_files(root: Path) -> list[str]:
    """Every visible image file under ``predict_root``, recursively, in sorted path order (never empty)."""
    if not root.is_dir():
        raise DataError(f"predict_root {str(root)!r} {why_not_a_folder(root)}: point it at a folder of images.")
    files = [str(p) for p in sorted(root.rglob("*")) if p.is_file() and _visible_image(p, root)]
    if not files:
        raise DataError(f"predict_root {str(root)!r} holds no images (extensions: {', '.join(IMG_EXTENSIONS)}).")
    return files


class _UnlabelledImages(Dataset):
    """Every visible image file under ``root``, recursively, in sorted path order; labels are -1."""

    def __init__(self, root: Path, classes: list[str], loader: Any, transform: Any) -> None:
        self.samples = [(file, -1) for file in predict_files(root)]
        self.classes, self.loader, self.transform = classes, loader, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        sample = self.loader(path)
        return (sample if self.transform is None else self.transform(sample)), target


class ImageFolderDataModule(pl.LightningDataModule):
    """Images in ``root/train/<class>/``, ``root/val/<class>/`` and optionally ``root/test/<class>/``.

    ImageNet-style transforms and normalisation (the statistics the pretrained weights expect):
    random-resized crop (+ optional horizontal flip) for training; resize to ``image_size / 0.875`` and
    centre crop for evaluation. The folder layout is checked before any training starts.

    By default (``decode="tensor"``) the workers decode with ``torchvision.io`` and crop uint8 tensors
    with ``transforms.v2``; the uint8 batches are pinned, sent to the device and only there converted
    to float and normalised (:meth:`on_after_batch_transfer`), in channels_last when the model's
    convolutions are. That is the same function as the PIL path (same decoded pixels, same crop
    sampling, resized values within one intensity level) at about half the worker time and a quarter
    of the bytes per batch. Batches from :meth:`train_dataloader` used outside a Trainer are uint8:
    pass them through :meth:`normalize`. ``decode="pil"`` keeps the classic PIL + ``ToTensor`` path.

    With ``decode_device="cuda"`` the workers only read the files and plan the crops; JPEGs are then
    decoded in batches on the GPU (nvJPEG), cropped, resized and normalised there. Use it when the CPU
    workers cannot keep up with the GPU; where CUDA or nvJPEG is missing it falls back to the workers,
    with a warning saying why.

    Args:
        root: dataset root holding the split folders.
        image_size: crop size fed to the network.
        batch_size: per-device batch size.
        num_workers: DataLoader worker processes (persistent when > 0).
        min_scale: smallest crop area fraction of RandomResizedCrop.
        hflip: random horizontal flips for training (off for data where left/right matters, e.g. digits).
        pin_memory: pin host memory; None = when CUDA is available.
        predict_split: the split ``predict`` runs on.
        augment: random crops/flips for training; off = the eval transform (exactly reproducible runs).
        seed: seed of the per-epoch shuffle order (see :class:`EpochShuffleSampler`).
        decode: "tensor" (torchvision.io + uint8 transforms, normalised on the device) or "pil".
        decode_device: "cpu" (decode on the workers) or "cuda" (batched nvJPEG decode on the GPU).
        predict_root: a folder of new, unlabelled images (searched recursively, no class folders) that
            ``predict`` runs on instead of ``predict_split``.
        eval_resize: the shorter side evaluation images are resized to before the centre crop. Default
            ``round(image_size / 0.875)``; the CLI sets it from a torchvision weight's preset
            (``IMAGENET1K_V2``: 232 for 224), see :func:`lightning_frozenbn.backbone.eval_resize_for`.
        class_names: the class names in label order. Default: the train split's folder names. The CLI
            sets them from the checkpoint given with ``--ckpt_path`` (stored there at fit time), so a
            machine without the training data can still predict with named classes.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 4,
        min_scale: float = 0.08,
        hflip: bool = True,
        pin_memory: bool | None = None,
        predict_split: str = "val",
        augment: bool = True,
        seed: int = 0,
        decode: Decoder = "tensor",
        decode_device: DecodeDevice = "cpu",
        predict_root: str | Path | None = None,
        class_names: list[str] | None = None,
        eval_resize: int | None = None,
    ) -> None:
        super().__init__()
        if eval_resize is not None and (isinstance(eval_resize, bool) or not isinstance(eval_resize, int)):
            raise DataError(f"eval_resize={eval_resize!r} is invalid: expected an integer >= image_size, or null.")
        if class_names is not None and (len(set(class_names)) != len(class_names) or len(class_names) < 2):
            raise DataError(
                f"class_names={class_names!r} is invalid: expected at least two distinct names, in label order."
            )
        if decode not in DECODERS:
            raise DataError(
                f"decode={decode!r} is invalid: expected one of {DECODERS} ('tensor' = torchvision.io decode "
                "with normalisation on the device, 'pil' = the PIL + ToTensor path)."
            )
        if decode_device not in DECODE_DEVICES:
            raise DataError(
                f"decode_device={decode_device!r} is invalid: expected one of {DECODE_DEVICES} "
                "('cpu' = decode on the DataLoader workers, 'cuda' = batched nvJPEG decode on the GPU, "
                "'dali' = NVIDIA DALI pipelines)."
            )
        if decode == "pil" and decode_device != "cpu":
            raise DataError(
                f"decode='pil' with decode_device={decode_device!r} is contradictory: PIL decodes on the CPU "
                "workers. Use decode='tensor' with it, or decode_device='cpu' to keep PIL."
            )
        if decode_device == "dali":
            require_dali()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise DataError(f"image_size={image_size!r} is invalid: expected an integer >= 8 (e.g. 224).")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1.")
        if not 0 < min_scale <= 1:
            raise DataError(f"min_scale={min_scale!r} is invalid: expected a fraction in (0, 1].")
        self.root = Path(root)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.min_scale, self.hflip, self.predict_split = min_scale, hflip, predict_split
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.augment, self.seed = augment, seed
        self.decode, self.decode_device = decode, decode_device
        if eval_resize is not None and eval_resize < image_size:
            raise DataError(
                f"eval_resize={eval_resize} is smaller than image_size={image_size}: the centre crop would not fit."
            )
        self.eval_resize = round(image_size / 0.875) if eval_resize is None else eval_resize
        self.predict_root = None if predict_root is None else Path(predict_root)
        self.class_names = None if class_names is None else list(class_names)
        self.datasets: dict[str, Dataset] = {}
        self._gpu_decode: bool | None = None  # decided at setup, when the trainer's device is known
        self._mean, self._std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)

    @property
    def num_classes(self) -> int:
        """Number of class folders in the train split (linked into the model by the CLI)."""
        classes = self.classes
        if len(classes) < 2:
            raise DataError(
                f"{str(self.root / 'train')!r} has one class folder ({classes[0]!r}): a classifier needs at "
                "least two. Put each class's images in its own folder under train/ and val/."
            )
        return len(classes)

    @property
    def classes(self) -> list[str]:
        """Class names, in label order: ``class_names`` when given, else the train split's folders."""
        if self.class_names is not None:
            return self.class_names
        if self.predict_root is not None and not (self.root / "train").is_dir():
            raise DataError(
                "predict_root needs the class names and there is no train split to read them from: run "
                "`predict` with --ckpt_path of a checkpoint trained by this package (it stores them), or set "
                "`data.init_args.class_names`."
            )
        return self._check_split("train")

    def _check_split(self, split: str) -> list[str]:
        if not self.root.is_dir():
            raise DataError(
                f"Data root {str(self.root)!r} {why_not_a_folder(self.root)}. Set `data.root` (or "
                "`data.init_args.root`) to a folder holding train/<class>/ and val/<class>/ image folders."
            )
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataError(
                f"Split folder {str(split_dir)!r} is missing: expected {split}/<class>/ under {str(self.root)!r}."
            )
        classes = _class_dirs(split_dir)
        if not classes:
            raise DataError(
                f"{str(split_dir)!r} has no class folders: put each class's images in {split}/<class name>/."
            )
        for name in classes:
            if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (split_dir / name).iterdir() if f.is_file()):
                raise DataError(
                    f"Class folder {str(split_dir / name)!r} holds no images "
                    f"(extensions: {', '.join(IMG_EXTENSIONS)}). "
                    "Add images or remove the folder from every split."
                )
        return classes

    def _transform(self, train: bool) -> T.Compose | v2.Compose:
        augment = train and self.augment
        size = self.image_size
        if self.decode == "pil":
            normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
            if augment:
                flip = [T.RandomHorizontalFlip()] if self.hflip else []
                return T.Compose([T.RandomResizedCrop(size, scale=(self.min_scale, 1.0)), *flip, *normalize])
            return T.Compose([T.Resize(self.eval_resize), T.CenterCrop(size), *normalize])
        # uint8 in, uint8 out: the same sampling as above (v2 draws the same random numbers in the same order)
        if augment:
            flip = [v2.RandomHorizontalFlip()] if self.hflip else []
            return v2.Compose([v2.RandomResizedCrop(size, scale=(self.min_scale, 1.0), antialias=True), *flip])
        return v2.Compose([v2.Resize(self.eval_resize, antialias=True), v2.CenterCrop(size)])

    def _dataset(self, split: str, train: bool) -> _ImageFolder:
        classes = self._check_split(split)
        train_classes = self.classes if split != "train" or self.class_names is not None else classes
        if classes != train_classes:
            only_train = sorted(set(train_classes) - set(classes))
            only_here = sorted(set(classes) - set(train_classes))
            if self.class_names is not None:  # given, or from the checkpoint: the model's classes
                raise DataError(
                    f"Split {split!r} has other classes than the model (class_names / the checkpoint): only in "
                    f"the model: {only_train or 'none'}; only in {split}: {only_here or 'none'}. Point "
                    "`data.init_args.root` at data with the model's class folders."
                )
            raise DataError(
                f"Split {split!r} and 'train' have different classes (only in train: {only_train or 'none'}; "
                f"only in {split}: {only_here or 'none'}). Labels are folder indices, so every split needs "
                "the same class folders."
            )
        loader, transform = self._file_reader(train)
        return _ImageFolder(str(self.root / split), transform=transform, loader=loader)

    def _file_reader(self, train: bool) -> tuple[Any, Any]:
        """How a file becomes a sample: (loader, transform) for the decode path in use."""
        if self._use_gpu_decode():  # bytes and a crop plan; decoded on the device
            augment = train and self.augment
            return EncodedLoader(self.image_size, augment, self.min_scale, self.hflip, self.eval_resize), None
        return (load_rgb if self.decode == "pil" else decode_file), self._transform(train)

    def _use_gpu_decode(self) -> bool:
        if self._gpu_decode is None:
            self._gpu_decode = False
            if self.decode_device == "cuda":
                trainer = self.trainer
                device = trainer.strategy.root_device if trainer is not None else torch.device("cuda")
                reason = "the trainer runs on the CPU" if device.type != "cuda" else nvjpeg_available(device)
                if reason is None:
                    self._gpu_decode = True
                else:
                    rank_zero_warn(
                        f"decode_device='cuda' but {reason}: decoding on the CPU workers instead "
                        "(same images; set `data.decode_device: cpu` to silence this)."
                    )
        return self._gpu_decode

    def normalize(self, x: Tensor, channels_last: bool = False) -> Tensor:
        """Float, ImageNet-normalised batch from a uint8 one (float batches are returned unchanged)."""
        if x.dtype != torch.uint8:
            return x
        return normalize_uint8(x, self._mean, self._std, channels_last)

    def _channels_last(self) -> bool:
        # lay the batch out as the model's first convolution is laid out (any model, not only ours)
        model = self.trainer.lightning_module if self.trainer is not None else None
        weight = next((p for p in model.parameters() if p.dim() == 4), None) if model is not None else None
        return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and weight.shape[-1] > 1

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Decode an :class:`EncodedBatch` on ``device`` (``decode_device="cuda"``); move anything else."""
        if isinstance(batch, EncodedBatch):
            x = decode_batch(batch, device, self.image_size, self._mean, self._std, self._channels_last())
            return [x, batch.target.to(device, non_blocking=True)]
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Convert uint8 images to normalised float on the device (the workers send uint8)."""
        images = batch[0] if isinstance(batch, (list, tuple)) and batch else None
        if isinstance(images, Tensor) and images.dtype == torch.uint8:
            return [self.normalize(batch[0], self._channels_last()), *batch[1:]]
        return batch

    def setup(self, stage: str) -> None:
        """Index the split folders (checked for layout and class agreement)."""
        if stage == "fit":
            self.datasets["train"] = self._dataset("train", train=True)
        if stage in ("fit", "validate"):
            self.datasets["val"] = self._dataset("val", train=False)
        if stage == "test":
            self.datasets["test"] = self._dataset("test", train=False)
        if stage == "predict":
            if self.predict_root is None:
                self.datasets["predict"] = self._dataset(self.predict_split, train=False)
            else:
                self.datasets["predict"] = self._unlabelled(self.predict_root)

    def _unlabelled(self, root: Path) -> _UnlabelledImages:
        return _UnlabelledImages(root, self.classes, *self._file_reader(train=False))

    def _loader(self, split: str, shuffle: bool) -> DataLoader | DaliLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        dataset = self.datasets[split]
        if self.decode_device == "dali" and split != "predict":  # predict: the workers (the writer needs indices)
            return self._dali_loader(dataset, train=shuffle)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(dataset) > self.batch_size,
            collate_fn=collate_encoded if self._use_gpu_decode() else None,
        )

    def _dali_loader(self, dataset: _ImageFolder, train: bool) -> DaliLoader:
        """The split's files and labels through a DALI pipeline: on the trainer's GPU, else DALI's CPU backend."""
        trainer = self.trainer  # outside a Trainer: the GPU if there is one, as decode_device="cuda" does
        device = trainer.strategy.root_device if trainer is not None else torch.device("cuda", 0)
        if device.type == "cuda" and not torch.cuda.is_available():
            device = torch.device("cpu")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        transform = DaliTransform(
            self.image_size, self.eval_resize, self.min_scale, self.hflip and self.augment, IMAGENET_MEAN, IMAGENET_STD
        )
        return DaliLoader(
            [path for path, _ in dataset.samples],
            [label for _, label in dataset.samples],
            transform,
            train=train,
            augment=train and self.augment,
            batch_size=self.batch_size,
            num_threads=self.num_workers,
            device_id=(device.index or 0) if device.type == "cuda" else None,
            rank=rank,
            world_size=world,
            seed=self.seed,
            channels_last=self._channels_last(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (last partial batch dropped)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in file order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in file order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of ``predict_split``, in file order (the prediction writer relies on it)."""
        return self._loader("predict", shuffle=False)
