"""ConciseErrorsParser in a project's own LightningCLI: a typo is one line naming the key, not a union dump."""

import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, DemoModel

from lightning_frozenbn import ConciseErrorsParser


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--model.init_args.out_dimm", "3"],
            "error: model.init_args (lightning.pytorch.demos.boring_classes.DemoModel): Option 'out_dimm' is not "
            "accepted. Did you mean 'out_dim'?",
        ),
        (
            ["--model.init_args.out_dim", "three"],
            "error: model.init_args.out_dim (lightning.pytorch.demos.boring_classes.DemoModel): Expected type int. "
            "Got value: three",
        ),
        (["--trainer.precision", "bf17"], "error: trainer.precision: expected type int or one of ["),
        (["--trainer.max_epocs", "3"], "error: unrecognized arguments: --trainer.max_epocs 3. Did you mean"),
    ],
    ids=["unknown-key", "wrong-type", "trainer-flag", "unknown-trainer-flag"],
)
def test_a_bad_value_is_one_line_naming_the_key(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(
            DemoModel,
            BoringDataModule,
            subclass_mode_model=True,
            parser_class=ConciseErrorsParser,
            args=["fit", "--model=lightning.pytorch.demos.boring_classes.DemoModel", *args],
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Union subtypes" not in err and "Given value" not in err, err
    usage, tip, error = err.strip().splitlines()[-3:]
    assert usage.endswith("fit [options]") and tip.startswith("tip:") and error.startswith("error:")
    assert "[--trainer.max_epochs" not in err  # the full usage (every Trainer flag) is in --help, not here
