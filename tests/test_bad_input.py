"""Bad-input suite: every user mistake gets a non-zero exit, a message naming the value and the fix,
no traceback and not buried under jsonargparse's union dump, and leaves the files of an earlier run untouched.

| #  | where      | mistake                                            | expected message names            |
|----|------------|----------------------------------------------------|-----------------------------------|
| 1  | config     | unknown key `model.init_args.archh`                | the key + "Did you mean 'arch'"   |
| 2  | config     | wrong type `freeze_at: two`                        | freeze_at and the value           |
| 3  | config     | config file that does not exist                    | the path                          |
| 4  | config     | YAML syntax error                                  | the file / parse error            |
| 5  | config     | arch typo `resnet05`                               | value + "Did you mean 'resnet50'" |
| 6  | config     | norm typo `frozn`                                  | value + valid choices             |
| 7  | config     | `freeze_at: 7`                                     | value + range 0..5                |
| 8  | config     | `num_classes` written by hand                      | the key + "Remove it"             |
| 9  | config     | `calibrate_bn: -1`                                 | value + ">= 0"                    |
| 10 | config     | `backbone_lr_mult: -1`                             | value + ">= 0"                    |
| 11 | config     | invalid trainer precision `bf17`                   | the value + accepted ones         |
| 12 | CLI flags  | unknown subcommand `train`                         | the choice list                   |
| 13 | CLI flags  | unknown trainer flag `--trainer.max_epocs`         | the flag + "Did you mean"         |
| 14 | callback   | guard `on_violation: ignore`                       | value + raise/warn/restore        |
| 15 | callback   | guard `modules` naming a missing module            | name + close match                |
| 16 | callback   | guard `modules` naming a trainable module          | name + "Freeze it first"          |
| 17 | callback   | guard `modules` naming a module with no tensors    | name + "nothing frozen"           |
| 18 | data       | data root does not exist                           | the path + data.root              |
| 19 | data       | split folder `val` missing                         | the path                          |
| 20 | data       | train split with no class folders                  | the path                          |
| 21 | data       | a class folder with no images                      | the folder                        |
| 22 | data       | a class present in train but not in val            | the class                         |
| 23 | data       | `image_size: 0`                                    | the value                         |
| 24 | data       | `batch_size: 0`                                    | the value                         |
| 25 | data       | digits `val_fraction: 1.5`                         | the value                         |
| 26 | images     | an image file that cannot be decoded               | the file + "Delete or replace"    |
| 27 | weights    | weights file that does not exist                   | the path                          |
| 28 | weights    | weights file that is not a state dict              | the path + torch.save hint        |
| 29 | weights    | weights of another arch                            | missing keys + `arch`             |
| 30 | weights    | torchvision weight name unknown for the arch       | value + valid names               |
| 31 | weights    | a pickle that would run code                       | "Refused" (marker never created)  |
| 32 | checkpoint | `ckpt_path` that does not exist                    | the path                          |
| 33 | checkpoint | truncated checkpoint                               | the path + "truncated"            |
| 34 | checkpoint | checkpoint trained with another num_classes        | both class counts                 |
| 35 | checkpoint | a checkpoint pickle that would run code            | "Refused" (marker never created)  |
| 36 | optimizer  | negative learning rate                             | the value + the key to fix        |
| 37 | data       | a dataset with a single class folder               | the folder + "at least two"       |
| 38 | checkpoint | `--ckpt_path last` finds a truncated last.ckpt     | the path + "truncated"            |
| 39 | command    | the detector's config given to the classifier's    | `lightning-frozenbn-detect`       |
| 40 | config     | unknown top-level YAML key `trainr:`               | "Did you mean 'trainer...'"       |
| 41 | data       | data root that is a file                           | the path + "is a file"            |
| 42 | data       | digits root that is a file (it was renamed aside)  | the path + "nothing ... replaced" |
| 43 | weights    | torchvision weights, no internet and no cache      | the URL, the cache path, a file   |
| 44 | weights    | the detection quickstart before the classifier's   | the command that writes the file  |

A mistake in the checkpoint is found before the run starts: it leaves no new logger version behind.
"""

import shutil

import pytest
import torch
import torchvision
from helpers import (
    ROOT,  # noqa: E402
    write_evil_pickle,
)
from PIL import Image

from lightning_frozenbn.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_input")
    from lightning_frozenbn import DigitsDataModule

    DigitsDataModule(root=base / "digits").prepare_data()
    # a small ImageFolder tree to break in different ways
    for split in ("train", "val"):
        for c in ("a", "b"):
            (base / "tree" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 40), (i * 60, 10, 10)).save(base / "tree" / split / c / f"{i}.png")
    torch.save(torchvision.models.resnet18().state_dict(), base / "r18.pth")
    torch.save([1, 2, 3], base / "list.pth")
    write_evil_pickle(base / "evil.pth", base / "pwned", key="w")
    write_evil_pickle(base / "evil.ckpt", base / "pwned")
    (base / "broken.yaml").write_text("model:\n  init_args: [unclosed\n")
    (base / "trainr.yaml").write_text("trainr:\n  max_epochs: 1\n")
    (base / "notes.txt").write_text("a file of the user's, given as the digits root")
    (base / "fresh" / "configs").mkdir(parents=True)  # a new checkout: the configs, no runs/ yet
    shutil.copy(ROOT / "configs" / "quickstart.yaml", base / "fresh" / "configs")
    # an earlier run whose files must survive every failed command
    earlier = base / "run" / "csv" / "version_0"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "metrics.csv").write_text("epoch,val/acc\n0,0.5\n")
    torch.save(
        {
            "epoch": 0,
            "state_dict": {"classifier.weight": torch.zeros(4, 512)},
            "hyper_parameters": {"num_classes": 4, "arch": "resnet18"},
        },
        earlier / "checkpoints" / "last.ckpt",
    )
    data = (earlier / "checkpoints" / "last.ckpt").read_bytes()
    (base / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (base / "run" / "checkpoints").mkdir()  # where `--ckpt_path last` looks (the CLI's checkpoint folder)
    (base / "run" / "checkpoints" / "last.ckpt").write_bytes(data[: len(data) // 2])
    return base


def tree_variant(world, name, damage):
    root = world / name
    if not root.exists():
        shutil.copytree(world / "tree", root)
        damage(root)
    return str(root)


def snapshot(world):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((world / "run").rglob("*")) if p.is_file()}


def case(world, name):
    """Return (extra args, regexes the message must contain) for one mistake."""
    imagefolder = ["--data.class_path", "lightning_frozenbn.ImageFolderDataModule"]
    cases = {
        "unknown-key": (["--model.init_args.archh", "resnet18"], ["model.init_args.*'archh'", "Did you mean 'arch'"]),
        "wrong-type": (["--model.init_args.freeze_at", "two"], ["model.init_args.freeze_at", "type int", "two"]),
        "missing-config": (["--config", str(world / "nope.yaml")], ["nope.yaml"]),
        "yaml-syntax": (["--config", str(world / "broken.yaml")], ["broken.yaml|parse|unclosed|expected"]),
        "arch-typo": (["--model.init_args.arch", "resnet05"], ["'resnet05'", "Did you mean 'resnet50'"]),
        "norm-typo": (["--model.init_args.norm", "frozn"], ["model.init_args.norm", "one of \\['frozen'", "frozn"]),
        "freeze-at-range": (["--model.init_args.freeze_at", "7"], ["freeze_at=7", "0..5"]),
        "num-classes-by-hand": (["--model.init_args.num_classes", "3"], ["num_classes", "Remove it"]),
        "calibrate-negative": (["--model.init_args.calibrate_bn", "-1"], ["calibrate_bn=-1", ">= 0"]),
        "lr-mult-negative": (["--model.init_args.backbone_lr_mult", "-1"], ["backbone_lr_mult=-1", ">= 0"]),
        "bad-precision": (["--trainer.precision", "bf17"], ["trainer.precision", "'bf16-mixed'", "bf17"]),
        "bad-subcommand": (["train"], ["train", "fit"]),
        "unknown-trainer-flag": (["--trainer.max_epocs", "3"], ["max_epocs", "Did you mean '--trainer.max_epochs'"]),
        "guard-on-violation": (
            ["--guard.init_args.on_violation", "ignore"],
            ["guard.init_args.on_violation", "ignore", "raise"],
        ),
        "guard-missing-module": (
            ["--guard.init_args.modules", "[backbone.layr1]"],
            ["backbone.layr1", "backbone.layer1"],
        ),
        "guard-trainable-module": (
            ["--guard.init_args.modules", "[backbone.layer3]"],
            ["backbone.layer3", "Freeze it first"],
        ),
        "guard-empty-module": (["--guard.init_args.modules", "[backbone.relu]"], ["backbone.relu", "nothing frozen"]),
        "data-root-missing": (
            [*imagefolder, "--data.init_args.root", str(world / "nowhere")],
            ["nowhere", "data.root"],
        ),
        "split-missing": (
            [*imagefolder, "--data.init_args.root", tree_variant(world, "noval", lambda r: shutil.rmtree(r / "val"))],
            ["val' is missing"],
        ),
        "no-classes": (
            [
                *imagefolder,
                "--data.init_args.root",
                tree_variant(world, "noclass", lambda r: [shutil.rmtree(d) for d in (r / "train").iterdir()]),
            ],
            ["no class folders"],
        ),
        "empty-class": (
            [
                *imagefolder,
                "--data.init_args.root",
                tree_variant(world, "emptyclass", lambda r: [f.unlink() for f in (r / "train" / "b").iterdir()]),
            ],
            ["'.*b' holds no images"],
        ),
        "class-not-in-val": (
            [
                *imagefolder,
                "--data.init_args.root",
                tree_variant(world, "valmissing", lambda r: shutil.rmtree(r / "val" / "b")),
            ],
            [r"only in train: \['b'\]"],
        ),
        "image-size-zero": (["--data.init_args.image_size", "0"], ["image_size=0"]),
        "batch-size-zero": (["--data.init_args.batch_size", "0"], ["batch_size=0"]),
        "val-fraction": (["--data.init_args.val_fraction", "1.5"], ["val_fraction=1.5"]),
        "undecodable-image": (
            [
                *imagefolder,
                "--data.init_args.root",
                tree_variant(world, "broken", lambda r: (r / "train" / "a" / "zz.png").write_bytes(b"not a png")),
                "--data.init_args.batch_size",
                "16",
                "--data.init_args.num_workers",  # raised in a worker process: still one line, no traceback
                "1",
            ],
            ["zz.png", "Delete or replace"],
        ),
        "weights-missing": (["--model.init_args.weights", str(world / "none.pth")], ["none.pth", "does not exist"]),
        "weights-not-state-dict": (["--model.init_args.weights", str(world / "list.pth")], ["list.pth", "torch.save"]),
        "weights-wrong-arch": (
            ["--model.init_args.arch", "resnet50", "--model.init_args.weights", str(world / "r18.pth")],
            ["missing", "arch"],
        ),
        "weights-bad-name": (["--model.init_args.weights", "IMAGENET1K_V3"], ["IMAGENET1K_V3", "IMAGENET1K_V1"]),
        "weights-evil": (["--model.init_args.weights", str(world / "evil.pth")], ["Refused"]),
        "ckpt-missing": (["--ckpt_path", str(world / "gone.ckpt")], ["gone.ckpt", "does not exist"]),
        "ckpt-truncated": (["--ckpt_path", str(world / "truncated.ckpt")], ["truncated.ckpt", "truncated or corrupt"]),
        "ckpt-last-truncated": (["--ckpt_path", "last"], ["checkpoints/last.ckpt", "truncated or corrupt"]),
        "ckpt-other-classes": (
            ["--ckpt_path", str(world / "run" / "csv" / "version_0" / "checkpoints" / "last.ckpt")],
            ["num_classes=4", "10 classes"],
        ),
        "ckpt-evil": (["--ckpt_path", str(world / "evil.ckpt")], ["Refused"]),
        "negative-lr": (
            ["--model.init_args.optimizer.init_args.lr", "-0.1"],
            ["Invalid learning rate: -0.1", "model.init_args.optimizer.init_args"],
        ),
        "detector-config": (
            ["--config", str(ROOT / "configs" / "detection_quickstart.yaml")],
            ["FrozenBNDetector is for the `lightning-frozenbn-detect` command", "lightning-frozenbn-detect fit"],
        ),
        "yaml-top-level-typo": (
            ["--config", str(world / "trainr.yaml")],
            ["'trainr.max_epochs'", "'trainer.max_epochs'"],
        ),
        "data-root-a-file": (
            [*imagefolder, "--data.init_args.root", str(world / "list.pth")],
            ["list.pth' is a file, not a folder", "data.root"],
        ),
        "digits-root-a-file": (
            ["--data.init_args.root", str(world / "notes.txt")],
            ["notes.txt': it is a file", "nothing of yours is replaced"],
        ),
        "weights-offline": (
            ["--model.init_args.weights", "IMAGENET1K_V1"],
            ["Downloading torchvision's ResNet18_Weights.IMAGENET1K_V1 weights failed", "https://download.pytorch.org"]
            + [r"th/hub/checkpoints/resnet18-\w+\.pth", "TORCH_HOME", "pass that file as `weights`"],
        ),
        "weights-before-quickstart": (
            ["--model.init_args.weights", "runs/quickstart/checkpoints/last.ckpt"],
            ["last.ckpt' does not exist", "written by `lightning-frozenbn fit --config configs/quickstart.yaml`"],
        ),
        "single-class": (
            [
                *imagefolder,
                "--data.init_args.root",
                tree_variant(world, "oneclass", lambda r: [shutil.rmtree(r / s / "b") for s in ("train", "val")]),
            ],
            ["one class folder \\('a'\\)", "at least two"],
        ),
    }
    return cases[name]


CASES = [
    "unknown-key",
    "wrong-type",
    "missing-config",
    "yaml-syntax",
    "arch-typo",
    "norm-typo",
    "freeze-at-range",
    "num-classes-by-hand",
    "calibrate-negative",
    "lr-mult-negative",
    "bad-precision",
    "bad-subcommand",
    "unknown-trainer-flag",
    "guard-on-violation",
    "guard-missing-module",
    "guard-trainable-module",
    "guard-empty-module",
    "data-root-missing",
    "split-missing",
    "no-classes",
    "empty-class",
    "class-not-in-val",
    "image-size-zero",
    "batch-size-zero",
    "val-fraction",
    "undecodable-image",
    "weights-missing",
    "weights-not-state-dict",
    "weights-wrong-arch",
    "weights-bad-name",
    "weights-evil",
    "ckpt-missing",
    "ckpt-truncated",
    "ckpt-last-truncated",
    "ckpt-other-classes",
    "ckpt-evil",
    "negative-lr",
    "single-class",
    "detector-config",
    "yaml-top-level-typo",
    "data-root-a-file",
    "digits-root-a-file",
    "weights-offline",
    "weights-before-quickstart",
]


@pytest.mark.parametrize("name", CASES)
def test_user_mistake(world, name, capsys, monkeypatch):
    import re

    if name == "weights-offline":  # an offline node: nothing cached, and the download refused at once
        monkeypatch.setenv("TORCH_HOME", str(world / "th"))
        for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(proxy, "http://127.0.0.1:9")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
    if name == "weights-before-quickstart":
        monkeypatch.chdir(world / "fresh")

    extra, patterns = case(world, name)
    before = snapshot(world)
    base = [
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--data.init_args.root",
        str(world / "digits"),
        "--data.init_args.num_workers",
        "0",
        "--trainer.default_root_dir",
        str(world / "run"),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--model.init_args.calibrate_bn",
        "0",
    ]
    args = extra if name == "bad-subcommand" else ["fit", *base, *extra]
    with pytest.raises(SystemExit) as exit_info:  # any other exception type would be a traceback
        main(args)
    assert exit_info.value.code == 2  # a usage or input mistake; 1 is a run stopped by a runtime check
    err = capsys.readouterr().err
    for pattern in patterns:
        assert re.search(pattern, err), f"{pattern!r} not in: {err[-1500:]}"
    assert "Traceback" not in err
    assert "Union subtypes" not in err and "Given value" not in err, err[
        -1500:
    ]  # the one line, not jsonargparse's dump
    after = snapshot(world)
    assert {p: after.get(p) for p in before} == before, "a failed command modified an earlier run's files"
    if name.startswith("ckpt-"):  # refused before the run starts: no new (empty) logger version either
        assert sorted(after) == sorted(before), sorted(set(after) - set(before))
    assert not (world / "pwned").exists()
