"""decode_device='dali': DALI's CPU backend here (the GPU path is gpu-marked), checked against the uint8 path."""

import sys

import pytest
import torch
from helpers import quiet_trainer

pytest.importorskip("nvidia.dali", reason="the dali extra is not installed: pip install 'lightning_frozenbn[dali]'")

from bench.data import make_photos  # noqa: E402

from lightning_frozenbn import DataError, FrozenBNClassifier, ImageFolderDataModule  # noqa: E402
from lightning_frozenbn.backbone import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from lightning_frozenbn.data.dali import DaliLoader, DaliTransform  # noqa: E402


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """16 training and 4 validation photos (160 x 120, landscape and portrait) in 4 classes, as JPEG."""
    return make_photos(tmp_path_factory.mktemp("dali") / "photos", 16, size=(160, 120))


def denormalize(x):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return x * std + mean


@pytest.mark.parametrize("image_size", [32, 48, 64])  # 48: an odd margin (55 - 48), where the rounding matters
def test_evaluation_batches_match_the_uint8_path_within_one_level(photos, image_size):
    dali = ImageFolderDataModule(photos, image_size=image_size, batch_size=3, num_workers=1, decode_device="dali")
    files = ImageFolderDataModule(photos, image_size=image_size, num_workers=0)
    dali.setup("fit")
    files.setup("fit")
    loader = dali.val_dataloader()
    assert isinstance(loader, DaliLoader) and len(loader) == 2  # 4 images, batches of 3, the last partial
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.shape == (4, 3, image_size, image_size) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [y for _, y in files.datasets["val"].samples]
    reference = torch.stack([files.datasets["val"][i][0] for i in range(4)]).float()
    assert (denormalize(images) - reference).abs().max() <= 1.001


def test_training_batches_have_the_train_transforms_shape_and_range(photos):
    dm = ImageFolderDataModule(photos, image_size=48, batch_size=4, num_workers=2, decode_device="dali", min_scale=0.3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    pixels = denormalize(torch.cat([b[0] for b in batches]))
    assert pixels.shape == (16, 3, 48, 48) and pixels.min() >= -0.01 and pixels.max() <= 255.01
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted(y for _, y in dm.datasets["train"].samples)


def test_two_ranks_see_every_sample_once_per_epoch_and_epochs_differ(photos):
    files = [str(p) for p in sorted(photos.rglob("train/*/*.jpg"))]
    transform = DaliTransform(32, 37, 0.5, True, IMAGENET_MEAN, IMAGENET_STD)

    def epoch(rank, number):
        loader = DaliLoader(files, list(range(16)), transform, train=True, batch_size=2, rank=rank, world_size=2)
        loader.sampler.set_epoch(number)  # what Lightning calls
        assert len(loader) == 4
        return [i for batch in loader for i in batch[1].tolist()]  # the labels are the sample indices here

    first = [epoch(0, 0), epoch(1, 0)]
    assert not set(first[0]) & set(first[1]) and sorted(first[0] + first[1]) == list(range(16))
    second = [epoch(0, 1), epoch(1, 1)]
    assert sorted(second[0] + second[1]) == list(range(16)) and second != first
    assert epoch(0, 1) == second[0]  # the order of an epoch is a function of (seed, epoch): a resume repeats it


def test_trainer_fit_on_dali_batches(photos, tmp_path):
    dm = ImageFolderDataModule(photos, image_size=32, batch_size=4, num_workers=1, decode_device="dali")
    model = FrozenBNClassifier(num_classes=4, arch="resnet18")
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, dm)
    assert trainer.global_step == 6 and "val/acc" in trainer.callback_metrics


def test_missing_dali_is_one_line_with_the_install_command(photos, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as where it is not installed
    with pytest.raises(
        DataError, match=r'needs NVIDIA DALI, which is not installed .*pip install "lightning_frozenbn\[dali\]"'
    ):
        ImageFolderDataModule(photos, decode_device="dali")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_batches_arrive_on_the_device_channels_last_and_close_to_the_uint8_path(photos):
    dali = ImageFolderDataModule(photos, image_size=48, batch_size=4, num_workers=2, decode_device="dali")
    files = ImageFolderDataModule(photos, image_size=48, num_workers=0)
    dali.setup("fit")
    files.setup("fit")
    loader = dali.val_dataloader()
    loader.channels_last = True
    images, labels = next(iter(loader))
    assert images.is_cuda and images.shape == (4, 3, 48, 48)
    assert images.is_contiguous(memory_format=torch.channels_last)
    reference = torch.stack([files.datasets["val"][i][0] for i in range(4)]).float()
    # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: close, not within one level everywhere
    assert (denormalize(images.cpu()) - reference).abs().mean() < 1.5
    assert labels.tolist() == [y for _, y in files.datasets["val"].samples]
    train = list(dali.train_dataloader())
    assert len(train) == 4 and all(b[0].is_cuda for b in train)
