import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import ROOT, python

from lightning_frozenbn import FrozenBNClassifier
from lightning_frozenbn.cli import detect_main, main

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
OVERLAYS = {"ddp.yaml", "multinode.yaml", "reduce_on_plateau.yaml", "ema.yaml", "streaming.yaml"}
DETECTION = {  # read by lightning-frozenbn-detect
    "detection_quickstart.yaml",
    "detection_fpn_quickstart.yaml",
    "detection_fpn.yaml",
    "fasterrcnn_c4_finetune.yaml",
}


def cli(*args, cwd, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [python(), "-m", "lightning_frozenbn", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize("config", [*CONFIGS, "detection+ddp+multinode"], ids=lambda p: getattr(p, "name", p))
def test_every_config_parses(config, capsys):
    if config == "detection+ddp+multinode":  # the overlays compose with the detection configs too
        base, name, entry = ROOT / "configs" / "fasterrcnn_c4_finetune.yaml", "multinode.yaml", detect_main
        args = ["fit", "--config", str(base), "--config", str(ROOT / "configs" / "ddp.yaml")]
        args += ["--config", str(ROOT / "configs" / "multinode.yaml")]
    elif config.name in DETECTION:
        name, entry = config.name, detect_main
        args = ["fit", "--config", str(config)]
    elif config.name in OVERLAYS:
        name, entry = config.name, main
        args = [
            "fit",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--config",
            str(ROOT / "configs" / "ddp.yaml"),
        ]
        args += ["--config", str(config)]
    else:
        name, entry = config.name, main
        args = ["fit", "--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        entry([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_frozenbn.FrozenModuleGuard" in printed
    if name == "ddp.yaml":
        assert "broadcast_buffers: false" in printed
    if name == "streaming.yaml":
        assert (
            "class_path: lightning_frozenbn.StreamingImageDataModule" in printed
            and "every_n_train_steps: 20" in printed
        )
        assert "min_scale: null" in printed  # the augmentation comes from the chunks' manifest
    if name == "ema.yaml":
        assert "class_path: lightning_frozenbn.FrozenEMA" in printed and "decay: 0.999" in printed
    if name == "reduce_on_plateau.yaml":
        assert "class_path: torch.optim.lr_scheduler.ReduceLROnPlateau" in printed
        assert "scheduler_monitor: val/loss" in printed and "factor: 0.5" in printed
    if name == "resnet50_finetune.yaml":
        assert "no_decay_norm_bias: true" in printed and "decode: tensor" in printed
    if name in DETECTION or config == "detection+ddp+multinode":
        detector = "FrozenBNFPNDetector" if "fpn" in name else "FrozenBNDetector"
        assert f"class_path: lightning_frozenbn.{detector}" in printed and "monitor: val/map" in printed
        assert "output: detections.json" in printed  # predict writes a COCO results file
    if config == "detection+ddp+multinode":
        assert "broadcast_buffers: false" in printed and "num_nodes: 2" in printed
    if name == "detection_fpn.yaml":  # torchvision's COCO weights, with the eps they were trained with
        assert "weights: FasterRCNN_ResNet50_FPN_Weights.COCO_V1" in printed and "bn_eps: null" in printed


def quickstart_args(tmp_path, *extra):
    return [
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--data.init_args.root",
        str(tmp_path / "digits"),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def predict(tmp_path, ckpt, *extra):
    """`predict` with the quickstart config from ``ckpt``, writing tmp_path/pred.csv (per rank under DDP)."""
    args = [*quickstart_args(tmp_path, *extra), "--ckpt_path", str(ckpt)]
    return cli("predict", *args, "--prediction_writer.output", str(tmp_path / "pred.csv"), cwd=tmp_path)


def in_process(capsys, *args):
    """The console command's ``main`` in this process (a new process costs ~10 s of imports here)."""
    capsys.readouterr()
    main(list(args))
    return capsys.readouterr().out


@pytest.mark.slow
def test_fit_validate_test_predict_from_one_config(tmp_path, capsys, monkeypatch):
    """fit and the resume in their own processes (a resume starts from nothing but the files); validate,
    test and predict through the same console ``main`` in this process."""
    weights = tmp_path / "initial.pth"  # a local weights file that later "stays on the training machine"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    fit_args = ["--trainer.limit_train_batches", "8", "--model.init_args.calibrate_bn", "4"]
    fit = cli(
        "fit",
        *quickstart_args(tmp_path, "--trainer.max_epochs", "1", "--model.init_args.weights", str(weights), *fit_args),
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "bit-identical at epoch 0" in fit.stderr + fit.stdout
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"  # one folder per run directory, not per logger version
    assert last.is_file()
    # checkpoints are self-contained: restoring never reads the initial weights file
    weights.unlink()
    assert torch.load(last, weights_only=True)["initial_weights"] == str(weights)
    # `--ckpt_path last` resumes the previous run of this run directory (epoch 1 of 2)
    resumed = cli(
        "fit", *quickstart_args(tmp_path, "--trainer.max_epochs", "2", *fit_args), "--ckpt_path", "last", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # ... and appends to that run's metrics: one metrics.csv holding both epochs, no second version
    files = sorted((tmp_path / "run" / "csv").rglob("metrics.csv"))
    assert [f.parent.name for f in files] == ["version_0"]
    assert [int(float(r["epoch"])) for r in csv.DictReader(open(files[0])) if r.get("val/acc")] == [0, 1]
    if (tmp_path / "run" / "tensorboard").is_dir():  # TensorBoard (installed by the dev extra) continues it too
        assert [p.name for p in (tmp_path / "run" / "tensorboard").iterdir()] == ["version_0"]
    assert f"Resuming from {last} (saved at epoch 0" in resumed.stderr + resumed.stdout
    assert torch.load(last, weights_only=True)["epoch"] == 1
    metrics = next((tmp_path / "run").rglob("metrics.csv"))
    assert f"last checkpoint: {last.relative_to(tmp_path)}" in fit.stdout or str(last) in fit.stdout
    assert "val/acc" in metrics.read_text()
    # the checkpoint holds what rebuilds the model, and the guard's reference checksums
    state = torch.load(last, weights_only=True)
    assert any(k.startswith("FrozenModuleGuard") for k in state["callbacks"])
    monkeypatch.chdir(tmp_path)
    assert "val/acc" in in_process(capsys, "validate", *quickstart_args(tmp_path), "--ckpt_path", str(last))
    shutil.copytree(tmp_path / "digits" / "val", tmp_path / "digits" / "test")  # the digits set has no test split
    test = in_process(capsys, "test", *quickstart_args(tmp_path), "--ckpt_path", str(last))
    assert "test/acc" in test and "test/acc_top5" in test
    args = [
        *quickstart_args(tmp_path),
        "--ckpt_path",
        str(last),
        "--prediction_writer.output",
        str(tmp_path / "pred.csv"),
    ]
    in_process(capsys, "predict", *args)
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert len(rows) == len(list((tmp_path / "digits" / "val").rglob("*.png")))
    assert rows[0]["file"].endswith(".png") and rows[0]["predicted_class"] in {str(d) for d in range(10)}
    assert 0 < float(rows[0]["probability"]) <= 1
    # new, unlabelled images on a machine without the training data: names come from the checkpoint
    new = tmp_path / "new_images" / "batch1"
    new.mkdir(parents=True)
    for png in sorted((tmp_path / "digits" / "val" / "7").glob("*.png"))[:3]:
        shutil.copy(png, new / png.name)
    shutil.rmtree(tmp_path / "digits")
    in_process(
        capsys,
        "predict",
        *quickstart_args(tmp_path),
        "--data.class_path",
        "lightning_frozenbn.ImageFolderDataModule",
        "--data.init_args.predict_root",
        str(tmp_path / "new_images"),
        "--ckpt_path",
        str(last),
        "--prediction_writer.output",
        str(tmp_path / "new.csv"),
    )
    rows = list(csv.DictReader(open(tmp_path / "new.csv")))
    assert [r["file"] for r in rows] == [str(p) for p in sorted(new.glob("*.png"))]
    assert all(r["predicted_class"] in {str(d) for d in range(10)} for r in rows)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--model.init_args.archh", "resnet18"], "archh"),
        (["--model.init_args.arch", "resnet05"], "Unknown arch 'resnet05'. Did you mean 'resnet50'"),
        (
            [
                "--data.init_args.root",
                "no/such/folder",
                "--data.class_path",
                "lightning_frozenbn.ImageFolderDataModule",
            ],
            "Data root 'no/such/folder' does not exist",
        ),
    ],
    ids=["unknown-key", "arch-typo", "missing-data"],
)
def test_user_mistakes_exit_nonzero_without_traceback(tmp_path, capsys, monkeypatch, args, match):
    """One mistake per stage (parsing, model, data) through the console ``main``; the data mistake through
    the real console process too (~10 s of imports each). Every mistake of tests/test_bad_input.py is
    checked there, in-process."""
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", "run", *args]
    if "no/such/folder" in args:
        result = cli(*args, cwd=tmp_path, timeout=120)
        code, err = result.returncode, result.stderr
    else:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        code, err = exit_info.value.code, capsys.readouterr().err
    assert code not in (0, None)
    assert match in err, err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_multinode_fit_then_ddp_predict_on_cpu(tmp_path, capsys, monkeypatch):
    """fit: the 2-node script (two torchrun launches, gloo); predict: Lightning's own launcher, devices 2.
    Between them both ways of starting DDP from the CLI run on real processes."""
    env = {
        **os.environ,
        "RUN_DIR": str(tmp_path / "run"),
        "DATA_DIR": str(tmp_path / "digits"),
        "PYTHON": python(),
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "multinode_local.sh")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    logs = {p.name: p.read_text() for p in (tmp_path / "run").glob("node*.log")}
    assert result.returncode == 0, result.stdout[-2000:] + "".join(v[-2000:] for v in logs.values())
    assert set(logs) == {"node0.log", "node1.log"}
    assert "bit-identical at epoch 0 on all 2 ranks" in logs["node0.log"]
    # torchrun's agents log (and exit 0 from) a race of their own exit barrier: node 0's agent holds the
    # store and may close it before node 1's agent reads the barrier's last key; our processes' lines only
    ours = {
        k: "\n".join(ln for ln in v.splitlines() if "elastic/agent/server/api.py" not in ln) for k, v in logs.items()
    }
    assert all("Traceback" not in text for text in ours.values())
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs["node0.log"]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs["node1.log"]  # node 1's process joined as the second rank
    assert "bit-identical at the start of training on all 2 ranks" in logs["node0.log"]
    # predict under DDP: the ranks' rows gathered into one file, in the order one process writes them
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    pred = predict(tmp_path, last, "--config", str(ROOT / "configs" / "ddp.yaml"), "--trainer.devices", "2")
    assert pred.returncode == 0, (pred.stdout + pred.stderr)[-3000:]
    assert not list(tmp_path.glob("pred.rank*.csv"))
    ddp_rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    monkeypatch.chdir(tmp_path)
    single = [*quickstart_args(tmp_path), "--ckpt_path", str(last), "--prediction_writer.output", "one.csv"]
    in_process(capsys, "predict", *single)
    one_rows = list(csv.DictReader(open(tmp_path / "one.csv")))
    assert len(one_rows) == len(list((tmp_path / "digits" / "val").rglob("*.png")))  # each file once
    assert [(r["file"], r["predicted_class"]) for r in ddp_rows] == [
        (r["file"], r["predicted_class"]) for r in one_rows
    ]
    for a, b in zip(ddp_rows, one_rows):
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-4)


def test_user_trainer_callbacks_are_kept_beside_the_guard(tmp_path):
    from lightning_frozenbn.cli import FrozenBNCLI

    cli = FrozenBNCLI(
        args=quickstart_args(
            tmp_path,
            "--trainer.callbacks+=EarlyStopping",
            "--trainer.callbacks.monitor=val/acc",
            "--trainer.callbacks.mode=max",
        ),
        run=False,
    )
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"EarlyStopping", "FrozenModuleGuard", "ResumableCheckpoint", "LearningRateMonitor"} <= names


def test_guard_null_turns_the_guard_off_and_checkpoints_are_atomic_by_default(tmp_path):
    from lightning_frozenbn.checkpoint import AtomicCheckpointIO
    from lightning_frozenbn.cli import FrozenBNCLI

    on = FrozenBNCLI(args=quickstart_args(tmp_path), run=False)
    assert any(type(c).__name__ == "FrozenModuleGuard" for c in on.trainer.callbacks)
    assert isinstance(on.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    off = FrozenBNCLI(args=quickstart_args(tmp_path, "--guard", "null"), run=False)
    assert not any(type(c).__name__ == "FrozenModuleGuard" for c in off.trainer.callbacks)


def test_the_printed_config_shows_the_loggers_and_checkpoint_io_the_run_uses(tmp_path, monkeypatch, capsys):
    """`--print_config` writes the default loggers and AtomicCheckpointIO; run from that file, the same ones."""
    from lightning_frozenbn.checkpoint import AtomicCheckpointIO
    from lightning_frozenbn.cli import FrozenBNCLI
    from lightning_frozenbn.loggers import RunCSVLogger

    for name in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed: CSV only
    with pytest.raises(SystemExit):
        FrozenBNCLI(args=[*quickstart_args(tmp_path), "--print_config"], run=False)
    printed = capsys.readouterr().out
    assert "- class_path: lightning_frozenbn.loggers.RunCSVLogger" in printed and "TensorBoard" not in printed
    assert "- class_path: lightning_frozenbn.checkpoint.AtomicCheckpointIO" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    cli = FrozenBNCLI(args=["--config", str(tmp_path / "printed.yaml")], run=False)
    assert [type(logger) for logger in cli.trainer.loggers] == [RunCSVLogger]
    assert Path(cli.trainer.logger.log_dir) == tmp_path / "run" / "csv" / "version_0"  # save_dir null: the run dir
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_tensorboard_when_installed_logs_beside_csv_in_the_run_directory(tmp_path):
    pytest.importorskip("tensorboard")  # in the dev extra
    from lightning_frozenbn.cli import FrozenBNCLI
    from lightning_frozenbn.loggers import RunCSVLogger, RunTensorBoardLogger

    cli = FrozenBNCLI(args=quickstart_args(tmp_path), run=False)
    assert [type(logger) for logger in cli.trainer.loggers] == [RunCSVLogger, RunTensorBoardLogger]
    assert Path(cli.trainer.loggers[1].log_dir) == tmp_path / "run" / "tensorboard" / "version_0"


def test_a_logger_added_on_the_command_line_extends_the_defaults(tmp_path):
    from lightning_frozenbn.cli import FrozenBNCLI

    extra = ["--trainer.logger+=test_cli.ListLogger", "--trainer.logger.save_dir", str(tmp_path / "mine")]
    cli = FrozenBNCLI(args=quickstart_args(tmp_path, *extra), run=False)
    names = [type(logger).__name__ for logger in cli.trainer.loggers]
    assert names[0] == "RunCSVLogger" and names[-1] == "ListLogger"
    assert Path(cli.trainer.loggers[0].log_dir).parent == tmp_path / "run" / "csv"


@pytest.mark.parametrize(
    ("plugin", "kept"),
    [("lightning.fabric.plugins.environments.LightningEnvironment", False), ("TorchCheckpointIO", True)],
    ids=["environment-plugin", "own-checkpoint-io"],
)
def test_a_plugin_list_keeps_atomic_checkpoints_unless_it_brings_its_own(tmp_path, plugin, kept):
    from lightning.pytorch.plugins import TorchCheckpointIO

    from lightning_frozenbn.checkpoint import AtomicCheckpointIO
    from lightning_frozenbn.cli import FrozenBNCLI

    ddp = ["--trainer.strategy", "ddp"]  # a strategy that has a cluster environment, to see the plugin used
    cli = FrozenBNCLI(args=quickstart_args(tmp_path, *ddp, "--trainer.plugins", plugin), run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is (TorchCheckpointIO if kept else AtomicCheckpointIO)
    if not kept:
        assert type(cli.trainer.strategy.cluster_environment).__name__ == "LightningEnvironment"


class ListLogger(__import__("lightning.pytorch.loggers", fromlist=["Logger"]).Logger):
    """A user's own logger (not CSV): the CLI must work with it and say where its logs went."""

    def __init__(self, save_dir: str = "."):
        super().__init__()
        self._save_dir, self.rows = save_dir, []

    name, version = "list", 0

    @property
    def save_dir(self):
        return self._save_dir

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_any_logger_is_used_and_reported(tmp_path, capsys):
    from lightning_frozenbn.cli import FrozenBNCLI

    args = ["--trainer.logger", "test_cli.ListLogger", "--trainer.logger.save_dir", str(tmp_path / "mylogs")]
    cli = FrozenBNCLI(
        args=[
            "fit",
            *quickstart_args(tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"),
            "--trainer.limit_val_batches",
            "2",
            "--model.init_args.calibrate_bn",
            "0",
            *args,
        ]
    )
    assert [type(logger).__name__ for logger in cli.trainer.loggers] == ["ListLogger"]
    assert any("val/acc" in metrics for _, metrics in cli.trainer.logger.rows)
    assert f"logs (ListLogger): {tmp_path / 'mylogs'}" in capsys.readouterr().out


class TamperingClassifier(__import__("lightning_frozenbn").FrozenBNClassifier):
    """A user model that changes a frozen BN buffer during training."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            self.backbone.layer1[0].bn1.running_mean.add_(0.5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.init_args.optimizer.init_args.lr", "1e30"], "error: Training loss is not finite at global step"),
        (
            ["--model.class_path", "test_cli.TamperingClassifier"],
            "error: FrozenModuleGuard: the frozen state changed at epoch 0:",
        ),
    ],
    ids=["nan-loss", "frozen-state-violation"],
)
def test_a_stopped_run_exits_1_with_one_error_line(tmp_path, capsys, extra, message):
    """Exit 2 is a usage/input mistake (see test_bad_input.py); exit 1 is a run stopped by a runtime check."""
    args = quickstart_args(
        tmp_path,
        "--trainer.limit_train_batches",
        "3",
        "--model.init_args.calibrate_bn",
        "0",
        "--trainer.gradient_clip_val",
        "null",
        *extra,
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), err[-2000:]


def test_eval_transform_follows_the_torchvision_weights_preset(tmp_path, monkeypatch):
    """`weights: IMAGENET1K_V2` evaluates with resize 232 for a 224 crop (scaled: 33 for 32), as torchvision did."""
    from torchvision.models._api import WeightsEnum

    from lightning_frozenbn import DigitsDataModule
    from lightning_frozenbn.cli import FrozenBNCLI

    DigitsDataModule(root=tmp_path / "digits").prepare_data()
    # offline: the "download" returns a local state dict of the right architecture
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: torchvision.models.resnet50().state_dict())
    args = [*quickstart_args(tmp_path), "--model.init_args.arch", "resnet50"]
    cli_v2 = FrozenBNCLI(args=[*args, "--model.init_args.weights", "IMAGENET1K_V2"], run=False)
    assert cli_v2.datamodule.eval_resize == 33
    assert cli_v2.datamodule._transform(train=False).transforms[0].size == [33]
    assert FrozenBNCLI(args=args, run=False).datamodule.eval_resize == 37  # random init: the classic 1/0.875


def test_enable_checkpointing_false_makes_the_commands_checkpoint_step_aside(tmp_path, caplog):
    import logging

    from lightning_frozenbn.cli import FrozenBNCLI

    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        cli = FrozenBNCLI(args=quickstart_args(tmp_path, "--trainer.enable_checkpointing", "false"), run=False)
    assert cli.trainer.checkpoint_callback is None  # was Lightning's "found ModelCheckpoint" error
    assert not any(type(c).__name__ == "ResumableCheckpoint" for c in cli.trainer.callbacks)
    assert any(type(c).__name__ == "FrozenModuleGuard" for c in cli.trainer.callbacks)
    assert "enable_checkpointing is false: no checkpoints are written" in caplog.text
    kept = FrozenBNCLI(args=quickstart_args(tmp_path), run=False)
    assert type(kept.trainer.checkpoint_callback).__name__ == "ResumableCheckpoint"


# Each documented choice: the doc row that lists it, the values the row names (the default column, the words
# between slashes and the backticked words of the segment the regex takes), and the Literal the CLI shows.
DOCUMENTED_CHOICES = [
    ("cli.md", "model.init_args.norm", r"\| `model.init_args.norm` \| (.*)", "lightning_frozenbn.backbone", "Norm"),
    ("data.md", "data.init_args.decode", r"\| `data.init_args.decode` \| (.*)", "lightning_frozenbn.data", "Decoder"),
    (
        "data.md",
        "data.init_args.decode_device",
        r"\| `data.init_args.decode_device` \| (\w+) \| `(\w+)`:.*`(\w+)`: NVIDIA DALI",
        "lightning_frozenbn.data",
        "DecodeDevice",
    ),
    (
        "cli.md",
        "guard.init_args.on_violation",
        r"`init_args.on_violation`: ([\w /]+);",
        "lightning_frozenbn.guard.policy",
        "OnViolation",
    ),
]


def _documented(doc, pattern):
    text = (ROOT / "docs" / doc).read_text()
    match = re.search(pattern, text)
    assert match, f"docs/{doc} no longer has the row {pattern!r}"
    words = set()
    for group in match.groups():
        for cell in group.split("|")[:2]:  # the default and the values/meaning columns
            words |= set(re.findall(r"`(\w+)`", cell))
            if re.fullmatch(r"\s*\w+(\s*/\s*\w+)*\s*", cell):
                words |= {w.strip() for w in cell.split("/")}
    return words


@pytest.mark.parametrize(("doc", "key", "pattern", "module", "literal"), DOCUMENTED_CHOICES, ids=lambda v: str(v))
def test_every_documented_choice_is_accepted_by_the_cli_parser(doc, key, pattern, module, literal, capsys):
    import importlib
    import typing

    choices = set(typing.get_args(getattr(importlib.import_module(module), literal)))
    documented = _documented(doc, pattern) - {"null", "true", "false"}
    assert documented == choices, f"docs/{doc} lists {sorted(documented)} for {key}; the CLI accepts {sorted(choices)}"
    for value in sorted(documented):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--{key}={value}", "--print_config"])
        assert exit_info.value.code in (0, None), f"--{key}={value} refused: {capsys.readouterr().err}"
        assert f"{key.rsplit('.', 1)[1]}: {value}" in capsys.readouterr().out


class KwargsClassifier(FrozenBNClassifier):
    """docs/research.md's shape: a subclass that passes the base's arguments through ``**kwargs``."""

    def __init__(self, num_classes: int, scale: float = 16.0, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.scale = scale


def test_run_settings_reach_a_kwargs_subclass_resumed_from_its_checkpoint(tmp_path, capsys, caplog):
    import logging

    model = ["--model.class_path", f"{__name__}.KwargsClassifier", "--trainer.limit_val_batches=1"]
    in_process(
        capsys, "fit", *quickstart_args(tmp_path, *model, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2")
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.INFO):
        in_process(
            capsys,
            "validate",
            *quickstart_args(tmp_path, *model, "--model.init_args.fold=false"),
            "--ckpt_path",
            str(ckpt),
        )
    assert "Using fold=False from the command line or config, not the checkpoint's True" in caplog.text


def test_each_documented_config_writes_under_its_own_run_folder(capsys):
    """Configs that share a folder resume each other's last.ckpt (`--ckpt_path last`): a cosine run's
    checkpoint loaded into a ReduceLROnPlateau run crashed, a file run's into the streaming run."""
    configs = ROOT / "configs"
    runs = {
        "quickstart": (main, ["quickstart.yaml"]),
        "resnet50_finetune": (main, ["resnet50_finetune.yaml"]),
        "detection_quickstart": (detect_main, ["detection_quickstart.yaml"]),
        "fasterrcnn_c4_finetune": (detect_main, ["fasterrcnn_c4_finetune.yaml"]),
        **{
            overlay: (main, ["quickstart.yaml", f"{overlay}.yaml"])
            for overlay in ("streaming", "ema", "reduce_on_plateau")
        },
    }
    folders = {}
    for name, (entry, files) in runs.items():
        args = [a for f in files for a in ("--config", str(configs / f))]
        with pytest.raises(SystemExit):
            entry(["fit", *args, "--print_config"])
        folders[name] = re.search(r"^  default_root_dir: (\S+)$", capsys.readouterr().out, re.M).group(1)
    assert len(set(folders.values())) == len(folders), folders
