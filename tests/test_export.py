"""Export: frozen BN folded away in what is written (counted), checked against eager on the spot, bad input one line."""

from __future__ import annotations

import collections
import csv

import pytest
import torch
from helpers import ROOT, make_tree, randomize_bn

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install 'lightning_frozenbn[export]'")
pytest.importorskip("onnxruntime")

from lightning_frozenbn import FrozenBNClassifier  # noqa: E402
from lightning_frozenbn.cli import detect_main, main  # noqa: E402
from lightning_frozenbn.export import (  # noqa: E402
    ExportError,
    ExportMismatch,
    check_onnx,
    deployable,
    export_onnx,
    read_metadata,
)

NORMALISING = {"BatchNormalization", "Mul", "Sub", "Div", "InstanceNormalization"}


def _ops(path):
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_every_frozen_bn_is_folded_into_its_convolution_in_the_onnx_graph(tmp_path, fold):
    model = randomize_bn(FrozenBNClassifier(num_classes=3, arch="resnet18", fold=fold, freeze_at=5)).eval()
    x = torch.randn(2, 3, 64, 64)
    path = export_onnx(deployable(model), x, tmp_path / "m.onnx", {"class_names": ["a", "b", "c"]})
    ops = _ops(path)
    # resnet18: 20 convolutions (BN folded in), 8 residual adds, no normalisation arithmetic at all
    assert ops["Conv"] == 20 and ops["Add"] == 8 and not NORMALISING & set(ops), ops
    assert read_metadata(path) == {"class_names": ["a", "b", "c"]}
    with torch.no_grad():
        eager = model(x)
    diffs = check_onnx(path, model, [x, x[:1]])  # random statistics: a fold without its scale would show
    assert max(diffs) < 1e-4 and eager.abs().max() > 1


def test_trainable_bn_is_exported_in_eval_mode_with_its_running_statistics(tmp_path):
    model = randomize_bn(FrozenBNClassifier(num_classes=3, arch="resnet18", norm="train", freeze_at=2))
    x = torch.randn(4, 3, 64, 64)
    model.train()
    with torch.no_grad():
        batch_stats = model(x)  # what a train-mode BatchNorm would compute: the batch's statistics
    path = export_onnx(deployable(model), x, tmp_path / "m.onnx", {})
    assert max(check_onnx(path, model.eval(), [x, x[:1]])) < 1e-4  # eval: the running statistics
    with torch.no_grad():
        assert (model(x) - batch_stats).abs().max() > 1e-2  # so the check above could tell the two apart
    # layer2..4's 15 trainable BN: the exporter's optimiser fuses eval-mode BN into the convolutions too
    assert _ops(path)["Conv"] == 20 and "BatchNormalization" not in _ops(path)


def test_the_check_catches_a_file_that_computes_something_else(tmp_path):
    model = randomize_bn(FrozenBNClassifier(num_classes=3, arch="resnet18"), seed=0).eval()
    other = randomize_bn(FrozenBNClassifier(num_classes=3, arch="resnet18"), seed=1).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.backbone.bn1.running_var.mul_(1.01)  # one statistic 1% off: the kind of slip a bad fold makes
    x = torch.randn(2, 3, 64, 64)
    path = export_onnx(deployable(other), x, tmp_path / "m.onnx", {})
    with pytest.raises(ExportMismatch, match=r"ONNX output at input \(2, 3, 64, 64\) differs from the eager model"):
        check_onnx(path, model, [x])


@pytest.fixture(scope="module")
def quickstart_checkpoint(tmp_path_factory):
    """A classifier fitted for a few steps through the CLI on the quickstart's digits (32 px)."""
    root = tmp_path_factory.mktemp("qs")
    main([
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--data.init_args.root", str(root / "digits"), "--data.init_args.num_workers", "0",
        "--trainer.default_root_dir", str(root / "run"), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--model.init_args.calibrate_bn", "2",
    ])  # fmt: skip
    return root, root / "run" / "checkpoints" / "last.ckpt"


def _export_args(root, ckpt, out, *extra):
    return [
        "export", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--data.init_args.root", str(root / "digits"), "--data.init_args.num_workers", "0",
        "--trainer.default_root_dir", str(root / "export-run"),
        "--ckpt_path", str(ckpt), "--output", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_the_export_command_writes_onnx_and_pt2_checked_on_the_validation_digits(quickstart_checkpoint, capsys):
    root, ckpt = quickstart_checkpoint
    out = root / "exported"
    main(_export_args(root, ckpt, out))
    printed = capsys.readouterr().out
    for name, fmt in (("model.onnx", "onnx"), ("model.pt2", "pt2")):
        line = next(line for line in printed.splitlines() if line.startswith(str(out / name)))
        assert f"{fmt}, every frozen BN folded; checked against eager at (32, 3, 32, 32) and (1, 3, 32, 32)" in line
    assert read_metadata(out / "model.onnx")["class_names"] == [str(d) for d in range(10)]
    assert not NORMALISING & set(_ops(out / "model.onnx"))
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt2"]  # nothing else, no temporary files
    program = torch.export.load(str(out / "model.pt2")).module()
    model = FrozenBNClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    x = torch.randn(5, 3, 32, 32)  # a batch size the check did not use: the batch is dynamic
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_export_mistakes_are_one_line_and_leave_nothing_half_written(quickstart_checkpoint, capsys, tmp_path):
    root, ckpt = quickstart_checkpoint
    (tmp_path / "a_file").write_text("not a folder")
    cases = {
        "output-is-a-file": (_export_args(root, ckpt, tmp_path / "a_file"), "is a file, not a folder"),
        "bad-opset": (_export_args(root, ckpt, tmp_path / "opset", "--opset", "5"), "ONNX export failed at opset 5"),
        "missing-checkpoint": (_export_args(root, tmp_path / "gone.ckpt", tmp_path / "gone"), "gone.ckpt"),
    }
    for name, (args, expected) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert exit_info.value.code == 2 and len(err) == 1 and expected in err[0], (name, err)
    assert not list((tmp_path / "opset").glob("*.onnx"))  # the failed export wrote nothing
    with pytest.raises(SystemExit) as exit_info:  # a classifier checkpoint given to the detector's command
        detect_main(
            ["export", "--config", str(ROOT / "configs" / "detection_quickstart.yaml"), "--ckpt_path", str(ckpt)]
        )
    assert exit_info.value.code == 2 and "checkpoint of FrozenBNClassifier" in capsys.readouterr().err


@pytest.mark.slow
def test_export_ckpt_path_last_is_the_runs_last_checkpoint_as_for_fit_and_predict(quickstart_checkpoint, capsys):
    root, ckpt = quickstart_checkpoint
    out = root / "exported-last"
    main(_export_args(root, "last", out, "--formats", "[onnx]", "--trainer.default_root_dir", str(root / "run")))
    assert f"{out / 'model.onnx'}: onnx, every frozen BN folded; checked" in capsys.readouterr().out
    assert read_metadata(out / "model.onnx")["checkpoint"] == str(ckpt)  # the run's last.ckpt, resolved
    with pytest.raises(SystemExit) as exit_info:  # no fit in this process: nothing is "best" yet
        main(_export_args(root, "best", root / "exported-best"))
    assert exit_info.value.code == 2 and "--ckpt_path best names no file before a fit" in capsys.readouterr().err


def test_a_detector_asked_for_a_torch_export_program_is_told_why_in_one_line(tmp_path):
    from lightning_frozenbn import FrozenBNDetector
    from lightning_frozenbn.trainer import ExportingTrainer

    trainer = ExportingTrainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    with pytest.raises(ExportError, match=r"data-dependent sizes after the RPN's NMS. Use --formats \[onnx\]"):
        trainer.export(FrozenBNDetector(3, arch="resnet18", weights=None), output=str(tmp_path), formats=["pt2"])
    assert not list(tmp_path.iterdir())  # refused before anything was written


def _predict_args(root, out, *extra):
    return [
        "predict", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--data.init_args.root", str(root / "digits"), "--data.init_args.num_workers", "0",
        "--trainer.default_root_dir", str(root / "predict-run"), "--trainer.enable_progress_bar", "false",
        "--prediction_writer.output", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_predict_from_the_exported_file_writes_the_eager_predictions(quickstart_checkpoint, capsys, tmp_path):
    """`predict --exported model.onnx` runs the file in onnxruntime through the same data and CSV writer:
    the same rows as `predict --ckpt_path` (probabilities within 1e-5)."""
    root, ckpt = quickstart_checkpoint
    out = root / "exported-for-predict"
    main(_export_args(root, ckpt, out, "--formats", "[onnx]"))
    eager, exported = tmp_path / "eager.csv", tmp_path / "exported.csv"
    main(_predict_args(root, eager, "--ckpt_path", str(ckpt)))
    main(_predict_args(root, exported, "--exported", str(out / "model.onnx"), "--model.init_args.weights", "DEFAULT"))
    # weights DEFAULT would download ImageNet weights: with --exported the model's weights are not read (offline)
    rows, onnx_rows = list(csv.DictReader(eager.open())), list(csv.DictReader(exported.open()))
    assert len(rows) == len(onnx_rows) > 50 and len({r["predicted_class"] for r in rows}) > 3
    for row, got in zip(rows, onnx_rows):
        assert (got["file"], got["predicted_class"]) == (row["file"], row["predicted_class"])
        assert float(got["probability"]) == pytest.approx(float(row["probability"]), abs=1e-5)
    capsys.readouterr()
    cases = {  # each refused in one line, before a run is created
        "both": (["--exported", str(out / "model.onnx"), "--ckpt_path", str(ckpt)], "both name the model: give one"),
        "missing": (["--exported", str(tmp_path / "gone.onnx")], "gone.onnx': no such file"),
        "not-onnx": (["--exported", str(eager)], "is not an ONNX file"),
    }
    for name, (extra, expected) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(_predict_args(root, tmp_path / f"{name}.csv", *extra))
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert exit_info.value.code == 2 and len(err) == 1 and expected in err[0], (name, err)
        assert not (tmp_path / f"{name}.csv").exists()
    with pytest.raises(SystemExit) as exit_info:  # a classifier's file given to the detector's command
        detect_main(["predict", "--config", str(ROOT / "configs" / "detection_quickstart.yaml"),
                     "--exported", str(out / "model.onnx")])  # fmt: skip
    assert exit_info.value.code == 2
    assert (
        "holds a classification model, not detection: run it with `lightning-frozenbn predict`"
        in capsys.readouterr().err
    )


def test_predict_from_a_file_exported_with_other_class_names_is_refused(tmp_path):
    from lightning_frozenbn.data import ImageFolderDataModule
    from lightning_frozenbn.trainer import ExportingTrainer

    make_tree(tmp_path / "data", classes=("cat", "dog"))
    model = FrozenBNClassifier(num_classes=2, arch="resnet18", weights=None).eval()
    path = export_onnx(deployable(model), torch.randn(1, 3, 32, 32), tmp_path / "m.onnx",
                       {"task": "classification", "class_names": ["dog", "cat"]})  # fmt: skip
    data = ImageFolderDataModule(root=str(tmp_path / "data"), image_size=32, num_workers=0)
    trainer = ExportingTrainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    with pytest.raises(ExportError, match=r"exported with the classes \['dog', 'cat'\], the data has \['cat', 'dog'\]"):
        trainer.predict(model, datamodule=data, exported=str(path))


@pytest.mark.parametrize(
    "option", [["--formats", "[onnx]"], ["--formats", "[pt2]"], ["--opset", "18"], ["--check", "false"]]
)
def test_every_documented_export_option_is_parsed_by_the_cli(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--config", str(ROOT / "configs" / "quickstart.yaml"), *option, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    value = option[1].strip("[]")
    assert f"{option[0][2:]}:" in (printed := capsys.readouterr().out) and value in printed


def test_predict_keeps_every_argument_of_lightnings_predict():
    """The CLI's `predict` options are this signature: an argument Lightning adds must not be dropped (the
    override once lost `weights_only`, and `predict --ckpt_path` stopped parsing)."""
    import inspect

    from lightning.pytorch import Trainer

    from lightning_frozenbn.trainer import ExportingTrainer

    ours, theirs = inspect.signature(ExportingTrainer.predict), inspect.signature(Trainer.predict)
    assert list(ours.parameters)[: len(theirs.parameters)] == list(theirs.parameters)
    assert [p.default for p in ours.parameters.values()][: len(theirs.parameters)] == [
        p.default for p in theirs.parameters.values()
    ]
    assert "exported" in ours.parameters


def test_predict_exported_is_parsed_by_the_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["predict", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--exported", "m.onnx", "--print_config"]
        )
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    assert "exported: m.onnx" in capsys.readouterr().out
