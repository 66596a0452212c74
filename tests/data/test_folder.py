from pathlib import Path

import pytest
import torch
from helpers import make_tree, requires_gpu
from PIL import Image

from lightning_frozenbn import DataError, ImageFolderDataModule
from lightning_frozenbn.backbone import IMAGENET_MEAN, IMAGENET_STD


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    root = make_tree(tmp_path)
    Image.new("L", (40, 40), 128).save(root / "train" / "cat" / "gray.png")
    Image.new("RGBA", (40, 40), (1, 2, 3, 4)).save(root / "train" / "dog" / "rgba.png")
    dm = ImageFolderDataModule(root, image_size=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    for i in range(len(dm.datasets["train"])):
        assert dm.datasets["train"][i][0].shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda r: r / "nowhere", "Data root '.*nowhere' does not exist"),
        (lambda r: (__import__("shutil").rmtree(r / "val"), r)[1], "Split folder '.*val' is missing"),
        (lambda r: ([__import__("shutil").rmtree(d) for d in (r / "train").iterdir()], r)[1], "has no class folders"),
        (
            lambda r: ([f.unlink() for f in (r / "train" / "dog").iterdir()], r)[1],
            "Class folder '.*dog' holds no images",
        ),
        (lambda r: (__import__("shutil").rmtree(r / "val" / "dog"), r)[1], r"only in train: \['dog'\]"),
    ],
    ids=["missing-root", "missing-split", "no-classes", "empty-class", "class-missing-in-val"],
)
def test_layout_errors_are_clear(tmp_path, damage, match):
    root = damage(make_tree(tmp_path / "data"))
    dm = ImageFolderDataModule(root, image_size=32, num_workers=0)
    with pytest.raises(DataError, match=match):
        dm.setup("fit")


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    root = make_tree(tmp_path)
    for split in ("train", "val"):  # a notebook's checkpoint folder and a macOS resource fork
        (root / split / ".ipynb_checkpoints").mkdir()
        Image.new("RGB", (40, 40)).save(root / split / ".ipynb_checkpoints" / "x.png")
        (root / split / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    dm = ImageFolderDataModule(root, image_size=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"]
    for split in ("train", "val"):
        ds = dm.datasets[split]
        assert ds.classes == ["cat", "dog"] and sorted({label for _, label in ds.samples}) == [0, 1]
        assert len(ds) == 6 and not any("/." in path for path, _ in ds.samples)
    next(iter(dm.train_dataloader()))  # and no undecodable ._ file in the batches


def test_an_undecodable_image_is_named(tmp_path):
    root = make_tree(tmp_path)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG but not really")
    dm = ImageFolderDataModule(root, image_size=32, batch_size=64, num_workers=0)
    dm.setup("fit")
    with pytest.raises(DataError, match=r"Cannot decode image '.*broken.png'"):
        next(iter(dm.train_dataloader()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size=0 is invalid"),
        ({"batch_size": 0}, "batch_size=0 is invalid"),
        ({"num_workers": -1}, r"num_workers=-1 is invalid: expected an integer >= 0"),
        ({"min_scale": 1.5}, "min_scale=1.5 is invalid"),
    ],
)
def test_bad_data_arguments(tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        ImageFolderDataModule(tmp_path, **kwargs)


# ---- the uint8 decode path (decode="tensor"), its GPU variant, and the PIL path it replaces ----------


def photo_tree(root, n=4, size=(120, 90), splits=("train", "val")):
    """Real photographs (crops of scikit-learn's two sample photos) as JPEG quality 90, two classes."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china, flower: 427 x 640 RGB
    g = torch.Generator().manual_seed(1)
    for split in splits:
        for c, photo in enumerate(photos):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                top = int(torch.randint(0, photo.shape[0] - size[1] * 3, (1,), generator=g))
                left = int(torch.randint(0, photo.shape[1] - size[0] * 3, (1,), generator=g))
                crop = Image.fromarray(photo[top : top + size[1] * 3, left : left + size[0] * 3])
                if i % 2:  # portrait and landscape
                    crop = crop.transpose(Image.Transpose.ROTATE_90)
                crop.resize((crop.size[0] // 3, crop.size[1] // 3)).save(folder / f"{i}.jpg", quality=90)
    return root


def one_level(std=IMAGENET_STD):
    return 1.0 / 255.0 / min(std) + 1e-5  # one intensity level after normalisation


def test_every_format_decodes_to_the_pixels_pil_gives(tmp_path):
    from torchvision.transforms.functional import pil_to_tensor

    from lightning_frozenbn.data.decode import decode_file, load_rgb

    photo = Image.open(photo_tree(tmp_path / "p", n=1, splits=("train",)) / "train" / "class1" / "0.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    cases = {
        "rgb.jpg": (photo, {"quality": 90}),
        "rgb.png": (photo, {}),
        "gray.jpg": (photo.convert("L"), {"quality": 90}),
        "gray.png": (photo.convert("L"), {}),
        "rgba.png": (photo.convert("RGBA"), {}),
        "palette.png": (photo.convert("P"), {}),
        "cmyk.jpg": (photo.convert("CMYK"), {"quality": 90}),
        "exif-rotated.jpg": (photo, {"quality": 90, "exif": exif.tobytes()}),
        "rgb.bmp": (photo, {}),  # not a torchvision.io format: PIL decodes it
    }
    for name, (image, kwargs) in cases.items():
        image.save(tmp_path / name, **kwargs)
        ours, pil = decode_file(str(tmp_path / name)), pil_to_tensor(load_rgb(str(tmp_path / name)))
        assert ours.dtype == torch.uint8 and ours.shape == (3, 90, 120), name
        assert torch.equal(ours, pil), name  # same libraries underneath: identical pixels, EXIF ignored by both


@pytest.mark.parametrize("decode_device", ["cpu", "batched"])
def test_a_truncated_jpeg_is_named(tmp_path, decode_device):
    from lightning_frozenbn.data.decode import EncodedLoader, collate_encoded, decode_batch

    root = photo_tree(tmp_path, n=2)
    bad = root / "train" / "class0" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:-600])
    if decode_device == "cpu":
        dm = ImageFolderDataModule(root, image_size=32, batch_size=8, num_workers=0, augment=False)
        dm.setup("fit")
        with pytest.raises(DataError, match=r"Cannot decode image '.*class0/1.jpg'.*truncated"):
            next(iter(dm.train_dataloader()))
    else:  # the GPU path's logic, run on the CPU: the batched decoder fails, the culprit is named
        load = EncodedLoader(32, train=False)
        batch = collate_encoded([(load(str(p)), 0) for p in sorted(root.rglob("*.jpg"))])
        with pytest.raises(DataError, match=r"Cannot decode image '.*class0/1.jpg'"):
            decode_batch(batch, "cpu", 32, torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD))


def _batches(root, split, decode, seed=0, **kwargs):
    dm = ImageFolderDataModule(root, batch_size=64, num_workers=0, decode=decode, **kwargs)
    dm.setup("fit")
    torch.manual_seed(seed)
    ds = dm.datasets[split]
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return dm, images


@pytest.mark.parametrize("image_size", [32, 57])
def test_eval_images_equal_the_pil_path_within_one_level(tmp_path, image_size):
    root = photo_tree(tmp_path)
    dm, ours = _batches(root, "val", "tensor", image_size=image_size)
    _, pil = _batches(root, "val", "pil", image_size=image_size)
    assert ours.dtype == torch.uint8 and pil.dtype == torch.float32
    normalised = dm.normalize(ours)
    assert normalised.dtype == torch.float32 and normalised.shape == pil.shape == (8, 3, image_size, image_size)
    diff = (normalised - pil).abs()
    assert diff.max() <= one_level()
    assert (diff > 1e-4).float().mean() < 0.02  # almost every value is exact, not merely within a level


def test_train_augmentation_is_the_pil_paths_under_the_same_seed(tmp_path):
    root = photo_tree(tmp_path)
    kwargs = dict(image_size=48, min_scale=0.2, hflip=True)
    dm, ours = _batches(root, "train", "tensor", seed=3, **kwargs)
    _, pil = _batches(root, "train", "pil", seed=3, **kwargs)
    diff = (dm.normalize(ours) - pil).abs()
    assert diff.max() <= one_level()  # same crops and flips drawn, same resize, within one rounding
    _, other_seed = _batches(root, "train", "pil", seed=4, **kwargs)
    assert (dm.normalize(ours) - other_seed).abs().max() > 0.5  # the crops are random, not fixed


@pytest.mark.parametrize("train", [True, False])
def test_gpu_decode_logic_on_the_cpu_matches_the_worker_path(tmp_path, train):
    """decode_device='cuda' splits the work: workers read bytes and plan crops, the device decodes and crops."""
    from lightning_frozenbn.data.decode import EncodedLoader, collate_encoded, decode_batch

    root = photo_tree(tmp_path)
    Image.open(root / "train" / "class0" / "0.jpg").save(root / "train" / "class0" / "extra.png")
    dm, ours = _batches(root, "train", "tensor", seed=5, image_size=40, augment=train)
    load = EncodedLoader(40, train=train, min_scale=0.08, hflip=True)
    torch.manual_seed(5)
    samples = [(load(path), label) for path, label in dm.datasets["train"].samples]
    batch = collate_encoded(samples)
    assert batch.data[0].dtype == torch.uint8 and batch.data[0].dim() == 1  # bytes, not pixels
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    decoded = decode_batch(batch, "cpu", 40, mean, std, channels_last=True)
    assert decoded.is_contiguous(memory_format=torch.channels_last) and decoded.dtype == torch.float32
    assert torch.equal(batch.target, torch.tensor([label for _, label in dm.datasets["train"].samples]))
    assert (decoded - dm.normalize(ours)).abs().max() <= 1.5 * one_level()  # float resize vs uint8 resize


def test_gpu_decode_batches_cross_worker_processes(tmp_path):
    """decode_device='cuda' workers send file bytes to the main process: they must pickle through the queue."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from lightning_frozenbn.data.decode import EncodedBatch, EncodedLoader, collate_encoded

    root = photo_tree(tmp_path, n=3)
    dataset = ImageFolder(str(root / "val"), loader=EncodedLoader(32, train=False))
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_encoded, timeout=20)
    batches = list(loader)
    assert all(isinstance(b, EncodedBatch) for b in batches) and sum(len(b.paths) for b in batches) == 6
    files = [p for b in batches for p in b.paths]
    assert files == [path for path, _ in dataset.samples]
    assert all(
        torch.equal(d, torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8))
        for b in batches
        for d, p in zip(b.data, b.paths)
    )


class _Recorder(__import__("lightning_frozenbn").FrozenBNClassifier):
    seen: list = []

    def training_step(self, batch, batch_idx):
        type(self).seen.append(batch[0].detach().clone())
        return super().training_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        type(self).seen.append(batch[0].detach().clone())
        return super().predict_step(batch, batch_idx, dataloader_idx)


@pytest.mark.parametrize("channels_last", [True, False])
def test_uint8_batches_reach_the_model_normalised_in_its_layout(tmp_path, channels_last):
    from helpers import quiet_trainer

    root = photo_tree(tmp_path / "data")
    batches = {}
    for decode in ("tensor", "pil"):
        _Recorder.seen = []
        model = _Recorder(num_classes=2, arch="resnet18", channels_last=channels_last)
        dm = ImageFolderDataModule(root, image_size=32, batch_size=8, num_workers=0, decode=decode, augment=False)
        trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
        trainer.fit(model, datamodule=dm)
        trainer.predict(model, datamodule=dm)
        batches[decode] = list(_Recorder.seen)
    for ours, pil in zip(batches["tensor"], batches["pil"], strict=True):
        assert ours.dtype == torch.float32 and ours.shape == pil.shape == (8, 3, 32, 32)
        assert ours.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert (ours - pil).abs().max() <= one_level()


def test_gpu_decode_without_cuda_falls_back_to_the_workers_with_a_warning(tmp_path):
    from helpers import quiet_trainer

    root = photo_tree(tmp_path / "data", n=2)
    dm = ImageFolderDataModule(root, image_size=32, batch_size=4, num_workers=0, decode_device="cuda", augment=False)
    model = _Recorder(num_classes=2, arch="resnet18")
    _Recorder.seen = []
    with pytest.warns(UserWarning, match="decode_device='cuda' but the trainer runs on the CPU: decoding on the CPU"):
        quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, datamodule=dm)
    assert _Recorder.seen and _Recorder.seen[0].dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decode": "opencv"}, r"decode='opencv' is invalid: expected one of \('tensor', 'pil'\)"),
        ({"decode_device": "tpu"}, r"decode_device='tpu' is invalid: expected one of \('cpu', 'cuda', 'dali'\)"),
        ({"decode": "pil", "decode_device": "cuda"}, "contradictory: PIL decodes on the CPU"),
        ({"decode": "pil", "decode_device": "dali"}, "decode='pil' with decode_device='dali' is contradictory"),
    ],
)
def test_bad_decode_arguments(tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        ImageFolderDataModule(tmp_path, **kwargs)


@pytest.mark.gpu
@requires_gpu
def test_nvjpeg_batch_decode_matches_the_cpu_workers(tmp_path):
    from lightning_frozenbn.data.decode import EncodedLoader, collate_encoded, decode_batch, nvjpeg_available

    assert nvjpeg_available() is None
    root = photo_tree(tmp_path)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for train in (True, False):
        load = EncodedLoader(40, train=train)
        torch.manual_seed(0)
        batch = collate_encoded([(load(str(p)), 0) for p in sorted(root.rglob("*.jpg"))])
        gpu = decode_batch(batch, "cuda", 40, mean, std, channels_last=True)
        cpu = decode_batch(batch, "cpu", 40, mean, std, channels_last=True)
        assert gpu.device.type == "cuda" and gpu.is_contiguous(memory_format=torch.channels_last)
        diff = (gpu.cpu() - cpu).abs()
        # nvJPEG's chroma upsampling differs from libjpeg-turbo's: on an H100 (torchvision 0.26) the
        # mean difference was 0.8 intensity levels and the largest 20 levels, at sharp colour edges
        assert diff.mean() <= one_level() and diff.max() <= 32 * one_level()


@pytest.mark.gpu
@requires_gpu
def test_fit_with_gpu_decode(tmp_path):
    from lightning.pytorch import Trainer

    root = photo_tree(tmp_path / "data")
    _Recorder.seen = []
    model = _Recorder(num_classes=2, arch="resnet18", channels_last=True)
    dm = ImageFolderDataModule(root, image_size=32, batch_size=8, num_workers=2, decode_device="cuda")
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="gpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=1,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=dm)
    assert dm._gpu_decode is True
    x = _Recorder.seen[0]
    assert x.device.type == "cuda" and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert -2.2 < x.min() and x.max() < 2.7  # ImageNet-normalised range


def test_predict_root_reads_any_folder_of_images_in_a_stable_order(tmp_path):
    new = tmp_path / "new_images"
    for rel in ("b/2.png", "a/x/1.jpg", "0.png", ".hidden/3.png", "a/._4.jpg"):
        (new / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (10, 200, 30)).save(new / rel, format="PNG" if rel.endswith("png") else "JPEG")
    (new / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(
        tmp_path / "no_training_data",
        image_size=32,
        batch_size=2,
        num_workers=0,
        predict_root=new,
        class_names=["cat", "dog"],
    )
    dm.setup("predict")
    ds = dm.datasets["predict"]
    assert [p for p, _ in ds.samples] == [str(new / r) for r in ("0.png", "a/x/1.jpg", "b/2.png")]
    assert ds.classes == ["cat", "dog"] and dm.num_classes == 2
    x, y = next(iter(dm.predict_dataloader()))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [-1, -1]
    with pytest.raises(DataError, match="predict_root needs the class names"):
        _ = ImageFolderDataModule(tmp_path / "no_training_data", predict_root=new).num_classes
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        ImageFolderDataModule(tmp_path, predict_root=tmp_path / "empty", class_names=["a", "b"]).setup("predict")
    with pytest.raises(DataError, match="class_names=\\['a'\\] is invalid"):
        ImageFolderDataModule(tmp_path, class_names=["a"])
    other = make_tree(tmp_path / "other", classes=("cat", "fox"))  # test data with other classes than the model
    with pytest.raises(DataError, match=r"other classes than the model .*only in the model: \['dog'\]"):
        ImageFolderDataModule(other, class_names=["cat", "dog"]).setup("validate")


# ---- data order: a new order every epoch, the same order after a resume, disjoint ranks ------------------
def order_tree(root, n=12):
    """``n`` solid-colour training images (channel 0 = 20 * i): each sample is known by its colour."""
    for i in range(n):
        folder = root / "train" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (36, 36), (20 * i, 7, 7)).save(folder / f"{i}.png")
    make_tree(root, splits=("val",), classes=("a", "b"), n=1)
    return root


class _OrderRecorder(__import__("lightning").pytorch.LightningModule):
    """Writes the samples it trains on, per epoch and rank, to ``out/rank<r>.json``."""

    def __init__(self, out):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.out, self.seen = Path(out), {}

    def training_step(self, batch, batch_idx):
        images = batch[0]  # normalised on the device by the data module
        colour = (images[:, 0].mean((1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        self.seen.setdefault(str(self.current_epoch), []).extend((colour / 20).round().int().tolist())
        return (self.w * images.float().mean()).sum()

    def on_train_epoch_end(self):
        import json

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _orders(tmp_path, run, epochs, ckpt_path=None, **trainer_kwargs):
    import json

    from helpers import quiet_trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = ImageFolderDataModule(order_tree(tmp_path / "data"), image_size=32, batch_size=2, num_workers=0, augment=False)
    model = _OrderRecorder(tmp_path / run)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=epochs,
        limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / run / "ckpt", save_last=True)],
        enable_checkpointing=True,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in (tmp_path / run).glob("rank*.json")}


def test_every_epoch_has_its_own_order_and_a_resumed_run_continues_it(tmp_path):
    whole = _orders(tmp_path, "whole", 3)[0]
    assert [sorted(whole[e]) for e in "012"] == [list(range(12))] * 3  # every sample once per epoch
    assert len({tuple(whole[e]) for e in "012"}) == 3  # a new order every epoch (not the same seed each time)
    _orders(tmp_path, "first", 2)
    resumed = _orders(tmp_path, "resumed", 3, ckpt_path=tmp_path / "first" / "ckpt" / "last.ckpt")[0]
    assert list(resumed) == ["2"] and resumed["2"] == whole["2"]  # neither repeats epoch 0's order nor skips


@pytest.mark.slow
def test_two_ranks_see_disjoint_samples_and_together_all_of_them(tmp_path):
    from helpers import DDP_IN_PYTEST

    ranks = _orders(tmp_path, "ddp", 2, strategy=DDP_IN_PYTEST, devices=2)
    assert sorted(ranks) == [0, 1]
    for epoch in "01":
        zero, one = ranks[0][epoch], ranks[1][epoch]
        assert len(zero) == len(one) == 6 and not set(zero) & set(one), (epoch, zero, one)
    assert ranks[0]["0"] != ranks[0]["1"]  # and each rank's share changes between epochs
