import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import DDP_IN_PYTEST, quiet_trainer, randomize_bn, tiny_loader
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning, ModelCheckpoint
from torch import nn
from torch.multiprocessing import ProcessRaisedException

from lightning_frozenbn import FrozenBNClassifier, FrozenModuleGuard, FrozenStateViolation, find_frozen_modules
from lightning_frozenbn.guard import fingerprint


def trainer(tmp_path, callbacks, **kwargs):
    return quiet_trainer(tmp_path, callbacks=callbacks, **{"max_epochs": 2, **kwargs})


class SmallCNN(pl.LightningModule):
    """Not ours: a plain LightningModule with a frozen conv + nn.BatchNorm2d feature block."""

    def __init__(self, functional_bn: bool = False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.features.requires_grad_(False)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        self.functional_bn = functional_bn

    def forward(self, x):
        if self.functional_bn:  # a user forward that passes its own mode to the frozen BN's buffers
            bn = self.features[1]
            h = F.batch_norm(self.features[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training)
            return self.classifier(F.relu(h))
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        self.train()  # user code flipping everything back to train mode mid-step
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_guard_on_a_module_that_is_not_ours_keeps_bn_stats(tmp_path):
    model = SmallCNN()
    before = model.features[1].running_mean.clone()
    guard = FrozenModuleGuard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.features.eval()  # eval before fit: the guard must not trigger Lightning's warning
        trainer(tmp_path, [guard]).fit(model, tiny_loader())
    assert not [w for w in caught if "eval mode at the start of training" in str(w.message)]
    assert guard.epochs_verified == 2
    assert "features.1.running_mean" in guard.frozen_tensor_names
    assert torch.equal(model.features[1].running_mean, before)


def test_find_frozen_modules_picks_maximal_frozen_submodules():
    model = FrozenBNClassifier(num_classes=4, arch="resnet18", freeze_at=2, fold=False)
    found = find_frozen_modules(model)
    assert {"backbone.conv1", "backbone.bn1", "backbone.layer1"} <= set(found)
    assert "backbone.layer2.0.bn1" in found and "backbone.layer2" not in found
    assert not any(name.startswith("backbone.layer1.") for name in found)


class FlipBit(Callback):
    def __init__(self, name):
        self.name = name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 0:
            t = dict(pl_module.named_parameters(), **dict(pl_module.named_buffers()))[self.name]
            with torch.no_grad():
                t.view(-1)[:1].view(torch.int32).bitwise_xor_(1)  # one flipped mantissa bit


class Unfreeze(Callback):
    """A callback that switches a frozen weight back on while the optimizer holds all parameters."""

    def on_train_epoch_start(self, trainer, pl_module):
        pl_module.features.requires_grad_(True)


@pytest.mark.parametrize(
    ("make_model", "fault", "tensor"),
    [
        (
            lambda: FrozenBNClassifier(num_classes=4, arch="resnet18"),
            FlipBit("backbone.layer1.0.conv1.weight"),
            "backbone.layer1.0.conv1.weight",
        ),
        (
            lambda: FrozenBNClassifier(num_classes=4, arch="resnet18"),
            FlipBit("backbone.layer3.1.bn2.running_var"),
            "backbone.layer3.1.bn2.running_var",
        ),
        (lambda: SmallCNN(functional_bn=True), None, "features.1.running_mean"),
        (lambda: SmallCNN(), Unfreeze(), "features.0.weight"),
    ],
    ids=["flipped-bit-param", "flipped-bit-buffer", "bn-stats-moved", "optimizer-touched-frozen"],
)
def test_every_injected_fault_is_caught_and_named(tmp_path, make_model, fault, tensor):
    callbacks = [FrozenModuleGuard()] + ([fault] if fault else [])
    with pytest.raises(
        FrozenStateViolation, match=rf"rank 0: {tensor}: \d+ of \d+ elements changed, max \|diff\| = "
    ) as err:
        trainer(tmp_path, callbacks).fit(make_model(), tiny_loader())
    if isinstance(fault, Unfreeze):  # the flag itself is reported too, not only its consequence
        assert f"rank 0: {tensor}: requires_grad was switched back on" in str(err.value)


class SwitchOn(Callback):
    """Turns requires_grad back on for one frozen weight; our module's optimizer does not hold it, so it never moves."""

    def __init__(self, name):
        self.name = name

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.get_parameter(self.name).requires_grad_(True)


def test_requires_grad_switched_on_is_a_violation_even_if_nothing_moved(tmp_path):
    model = FrozenBNClassifier(num_classes=4, arch="resnet18")
    before = model.backbone.conv1.weight.detach().clone()
    with pytest.raises(
        FrozenStateViolation, match="at epoch 1:\n  rank 0: backbone.conv1.weight: requires_grad was switched back on\n"
    ):
        trainer(tmp_path, [FrozenModuleGuard(), SwitchOn("backbone.conv1.weight")]).fit(model, tiny_loader())
    assert torch.equal(model.backbone.conv1.weight, before)


class ManyFaults(Callback):
    """At epoch 1: a flipped bit in a frozen weight and in a frozen BN buffer, and a frozen weight switched on."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 0:
            with torch.no_grad():
                for t in (pl_module.backbone.layer1[0].conv1.weight, pl_module.backbone.layer2[0].bn1.running_var):
                    t.view(-1)[:1].view(torch.int32).bitwise_xor_(1)
            pl_module.backbone.conv1.weight.requires_grad_(True)


FAULTED = ("backbone.layer1.0.conv1.weight", "backbone.layer2.0.bn1.running_var", "backbone.conv1.weight")


def test_restore_puts_parameters_buffers_and_flags_back(tmp_path):
    model = FrozenBNClassifier(num_classes=4, arch="resnet18")
    randomize_bn(model)
    original = {
        n: t.detach().clone()
        for n, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
        if n in FAULTED
    }
    guard = FrozenModuleGuard(on_violation="restore")
    with pytest.warns(UserWarning, match="Restored the reference values") as record:
        trainer(tmp_path, [guard, ManyFaults()], max_epochs=3).fit(model, tiny_loader())
    message = "\n".join(str(w.message) for w in record)
    assert all(name in message for name in FAULTED)
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, value in original.items():
        assert torch.equal(live[name], value), name
    assert not model.backbone.conv1.weight.requires_grad
    assert guard.epochs_verified == 2  # epochs 0 and 2; epoch 1 was restored, not verified


def test_warn_reports_and_changes_nothing(tmp_path):
    model = FrozenBNClassifier(num_classes=4, arch="resnet18")
    randomize_bn(model)
    guard = FrozenModuleGuard(on_violation="warn")
    t = trainer(tmp_path, [guard, ManyFaults()], max_epochs=3)
    with pytest.warns(UserWarning, match="frozen state changed at epoch 1") as record:
        t.fit(model, tiny_loader())
    assert t.current_epoch == 3  # training went on to the end
    # the changes stay (warn restores nothing) and stay reported: the reference is not moved to them
    assert sum("frozen state changed at epoch" in str(w.message) for w in record) == 2
    assert not any("Restored" in str(w.message) for w in record)
    assert model.backbone.conv1.weight.requires_grad
    changed = guard._ledger.records["backbone.layer1.0.conv1.weight"].reference
    assert not torch.equal(model.backbone.layer1[0].conv1.weight, changed)
    assert guard.epochs_verified == 1


def test_guard_state_survives_resume_and_catches_changed_weights(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = FrozenBNClassifier(num_classes=4, arch="resnet18")
    guard = FrozenModuleGuard()
    trainer(tmp_path, [guard, ckpt], max_epochs=1, enable_checkpointing=True).fit(model, tiny_loader())
    state = torch.load(ckpt.last_model_path, weights_only=True)
    guard_state = next(v for k, v in state["callbacks"].items() if k.startswith("FrozenModuleGuard"))
    assert guard_state["epochs_verified"] == 1 and "backbone.conv1.weight" in guard_state["reference_checksums"]
    # resume cleanly: verified against the ORIGINAL reference, epoch count continues
    guard2 = FrozenModuleGuard()
    trainer(tmp_path, [guard2], max_epochs=2).fit(
        FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader(), ckpt_path=ckpt.last_model_path
    )
    assert guard2.epochs_verified == 2
    # tamper with a frozen weight inside the checkpoint: the resume is refused and names it
    state["state_dict"]["backbone.layer1.1.bn1.running_mean"] += 1e-3
    torch.save(state, tmp_path / "tampered.ckpt")
    # (the model as built still holds the original values, so the report is element by element)
    with pytest.raises(
        FrozenStateViolation,
        match=r"at the start of training:\n  rank 0: backbone.layer1.1.bn1.running_mean: 64 of 64 elements changed",
    ):
        trainer(tmp_path, [FrozenModuleGuard()], max_epochs=2).fit(
            FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader(), ckpt_path=tmp_path / "tampered.ckpt"
        )


def test_bad_guard_arguments(tmp_path):
    with pytest.raises(ValueError, match="on_violation='ignore'.*'raise', 'warn' or 'restore'"):
        FrozenModuleGuard(on_violation="ignore")
    with pytest.raises(ValueError, match="expected a list of submodule names"):
        FrozenModuleGuard(modules="backbone.layer1")
    model = FrozenBNClassifier(num_classes=4, arch="resnet18")
    guard = FrozenModuleGuard(modules=["backbone.layr1"])  # our module has a configure_model: refused once it ran
    with pytest.raises(ValueError, match="'backbone.layr1', which is not a submodule.*Close matches: backbone.layer1"):
        quiet_trainer(tmp_path, callbacks=[guard], max_steps=1).fit(model, tiny_loader())
    assert model.global_step == 0
    with pytest.raises(ValueError, match="'backbone.layer3', but it has \\d+ trainable parameters"):
        FrozenModuleGuard(modules=["backbone.layer3"]).setup(None, model, "fit")
    with pytest.raises(ValueError, match="'backbone.relu', which has no parameters or buffers"):
        FrozenModuleGuard(modules=["backbone.relu"]).setup(None, model, "fit")


def test_explicit_modules_are_guarded(tmp_path):
    guard = FrozenModuleGuard(modules=["backbone.layer1"])
    trainer(tmp_path, [guard], max_epochs=1).fit(FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader())
    assert guard.frozen_tensor_names and all(n.startswith("backbone.layer1.") for n in guard.frozen_tensor_names)
    # a fault inside a named module is caught; one in a frozen module left out of `modules` is not the guard's
    with pytest.raises(
        FrozenStateViolation, match="rank 0: backbone.layer1.1.bn2.running_mean: 1 of 64 elements changed"
    ):
        trainer(
            tmp_path, [FrozenModuleGuard(modules=["backbone.layer1"]), FlipBit("backbone.layer1.1.bn2.running_mean")]
        ).fit(FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader())
    guard = FrozenModuleGuard(modules=["backbone.layer1"])
    trainer(tmp_path, [guard, FlipBit("backbone.conv1.weight")]).fit(
        FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader()
    )
    assert guard.epochs_verified == 2


class RankFault(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_rank == 1 and trainer.current_epoch == 0:
            with torch.no_grad():
                pl_module.backbone.layer1[0].bn1.running_mean.add_(1.0)


class RankEndFault(Callback):
    """Rank 1 alone moves a frozen tensor after the last epoch check, as an on_train_end copy would."""

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.backbone.layer1[0].bn1.running_mean.add_(1.0)


class RankStartsDifferent(Callback):
    """Listed before the guard: rank 1's frozen state differs from rank 0's before the reference is taken.

    A frozen parameter, not a buffer: DDP broadcasts buffers from rank 0 at every forward by default."""

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.backbone.conv1.weight.view(-1)[:1].view(torch.int32).bitwise_xor_(1)


def _guard_state(ckpt):
    state = torch.load(Path(ckpt.dirpath) / "last.ckpt", weights_only=True)  # rank 0 wrote it
    return next(v for k, v in state["callbacks"].items() if k.startswith("FrozenModuleGuard"))


@pytest.mark.slow
@pytest.mark.timeout(400, method="thread")  # a hang fails the test instead of hanging CI
def test_ddp_two_processes_guard_passes_catches_restores_and_warns(tmp_path):
    def ddp(callbacks, **kwargs):
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}", save_last=True)
        t = trainer(
            tmp_path, [*callbacks, ckpt], strategy=DDP_IN_PYTEST, devices=2, enable_checkpointing=True, **kwargs
        )
        t.fit(FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader())
        return ckpt

    # clean run: both epochs verified on both ranks (rank 0's guard state, written into the checkpoint)
    assert _guard_state(ddp([FrozenModuleGuard()]))["epochs_verified"] == 2
    # the launcher re-raises the first failing rank's error; that every rank stopped shows as no hang
    with pytest.raises(
        (FrozenStateViolation, ProcessRaisedException),
        match=r"rank 1: backbone.layer1.0.bn1.running_mean: 64 of 64 elements changed(.|\n)*rank 1 holds a different frozen state than rank 0",
    ):
        ddp([RankFault(), FrozenModuleGuard()])
    # restore: rank 1's change is undone, and epoch 1 is verified identical on both ranks again
    assert _guard_state(ddp([RankFault(), FrozenModuleGuard(on_violation="restore")]))["epochs_verified"] == 1
    # warn: epoch 0 is reported and the run goes on to its end on both ranks (epoch 1 may verify again:
    # DDP's default broadcast_buffers copies rank 0's buffers over rank 1's at the next forward)
    warned = ddp([RankFault(), FrozenModuleGuard(on_violation="warn")])
    assert torch.load(Path(warned.dirpath) / "last.ckpt", weights_only=True)["epoch"] == 1
    assert _guard_state(warned)["epochs_verified"] <= 1
    # after the last epoch: each rank checks its own tensors at on_fit_end (no collective that close to exit)
    with pytest.raises(
        (FrozenStateViolation, ProcessRaisedException),
        match=r"at the end of fit(.|\n)*rank 1: backbone.layer1.0.bn1.running_mean: 64 of 64 elements changed",
    ):
        ddp([RankEndFault(), FrozenModuleGuard()])
    # check_ranks=False: each rank proves its own state against its own reference, no cross-rank compare
    # (the same start with check_ranks=True is the "holds a different frozen state" report above)
    assert _guard_state(ddp([RankStartsDifferent(), FrozenModuleGuard(check_ranks=False)]))["epochs_verified"] == 2


def _tampered_checkpoint(tmp_path, name, delta=1e-3):
    """Fit one epoch, then write a copy of last.ckpt with one frozen tensor changed."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    torch.manual_seed(0)
    trainer(tmp_path, [FrozenModuleGuard(), ckpt], max_epochs=1, enable_checkpointing=True).fit(
        FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader()
    )
    state = torch.load(ckpt.last_model_path, weights_only=True)
    original = state["state_dict"][name].clone()
    state["state_dict"][name] += delta
    torch.save(state, tmp_path / "tampered.ckpt")
    return original


def test_restore_after_a_tampered_resume_brings_back_the_original_values(tmp_path):
    """The checkpoint holds checksums only; the model as built before the checkpoint is loaded into it
    still holds the original frozen values, so restore really restores them (it used to copy the
    tampered values onto themselves and call that restored)."""
    name = "backbone.layer1.1.bn1.running_mean"
    original = _tampered_checkpoint(tmp_path, name)
    torch.manual_seed(0)  # the same initial weights as the first fit
    model = FrozenBNClassifier(num_classes=4, arch="resnet18")
    guard = FrozenModuleGuard(on_violation="restore")
    with pytest.warns(
        UserWarning, match=rf"at the start of training:\n  rank 0: {name}: 64 of 64 elements changed(.|\n)*Restored"
    ):
        trainer(tmp_path, [guard], max_epochs=2).fit(model, tiny_loader(), ckpt_path=tmp_path / "tampered.ckpt")
    assert torch.equal(model.get_buffer(name), original)
    assert guard.epochs_verified == 2  # epoch 0 from the first fit, epoch 1 after the restore


def test_restore_refuses_when_the_original_values_exist_nowhere(tmp_path):
    name = "backbone.layer1.0.conv1.weight"
    _tampered_checkpoint(tmp_path, name)
    torch.manual_seed(123)  # other initial weights: the original frozen conv weights are gone
    model = FrozenBNClassifier(num_classes=4, arch="resnet18")
    with pytest.raises(
        FrozenStateViolation,
        match=rf"{name}: differs from the original frozen reference(.|\n)*cannot be restored(.|\n)*cannot restore values that no longer exist",
    ):
        trainer(tmp_path, [FrozenModuleGuard(on_violation="restore")], max_epochs=2).fit(
            model, tiny_loader(), ckpt_path=tmp_path / "tampered.ckpt"
        )
    # warn mode says the same and goes on
    torch.manual_seed(123)
    with pytest.warns(
        UserWarning, match=rf"{name}: differs from the original frozen reference(.|\n)*cannot be restored"
    ):
        trainer(tmp_path, [FrozenModuleGuard(on_violation="warn")], max_epochs=2).fit(
            FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader(), ckpt_path=tmp_path / "tampered.ckpt"
        )


class DropoutNet(pl.LightningModule):
    """A frozen block with Dropout and no BN, then a trainable head; training_step calls self.train()."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5))
        self.frozen.requires_grad_(False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
        self.dropout_modes = []
        self.frozen[1].register_forward_hook(lambda m, a, o: self.dropout_modes.append(m.training))

    def forward(self, x):
        return self.head(self.frozen(x))

    def training_step(self, batch, batch_idx):
        self.train()
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_dropout_inside_a_frozen_module_runs_in_eval_and_hooks_go_at_teardown(tmp_path):
    model = DropoutNet()
    guard = FrozenModuleGuard()
    trainer(tmp_path, [guard], max_epochs=1).fit(model, tiny_loader())
    assert model.dropout_modes and not any(model.dropout_modes)
    assert not guard._eval.hooked and not model.frozen[1]._forward_pre_hooks  # removed at teardown
    model.train()
    model(torch.randn(1, 3, 8, 8))
    assert model.dropout_modes[-1] is True  # after fit the module is the user's again


class Buffers(pl.LightningModule):
    """A frozen block holding a buffer with NaN, +0.0 and -0.0: the guard compares bits, not values."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(3, 4)
        self.frozen.register_buffer("table", torch.tensor([float("nan"), 0.0, -0.0, 1.0]))
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.frozen(x.mean(dim=(2, 3))) + self.frozen.table.nan_to_num())

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


class Edit(Callback):
    def __init__(self, edit):
        self.edit = edit

    def on_train_epoch_end(self, trainer, pl_module):
        with torch.no_grad():
            self.edit(pl_module)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (None, None),  # NaN stays NaN: no false alarm
        (
            lambda m: m.frozen.table[1].neg_(),
            r"frozen.table: 1 of 4 elements changed, max \|diff\| = 0",
        ),  # +0.0 -> -0.0
        (
            lambda m: m.frozen.table[2].neg_(),
            r"frozen.table: 1 of 4 elements changed, max \|diff\| = 0",
        ),  # -0.0 -> +0.0
        (lambda m: m.frozen.table[3].copy_(float("nan")), r"frozen.table: 1 of 4 elements changed, max \|diff\| = inf"),
        (
            lambda m: setattr(m.frozen.weight, "data", m.frozen.weight.data.double()),
            r"frozen.weight: shape/dtype changed \(4, 3\) torch.float32 -> \(4, 3\) torch.float64",
        ),
        (
            lambda m: setattr(m.frozen.table, "data", m.frozen.table.data[:3]),
            r"frozen.table: shape/dtype changed \(4,\) torch.float32 -> \(3,\) torch.float32",
        ),
    ],
    ids=["nan-unchanged", "plus-to-minus-zero", "minus-to-plus-zero", "value-to-nan", "dtype", "shape"],
)
def test_bitwise_comparison_nan_signed_zero_shape_and_dtype(tmp_path, edit, match):
    guard = FrozenModuleGuard()
    t = trainer(tmp_path, ([Edit(edit)] if edit else []) + [guard], max_epochs=1)  # the edit runs before the check
    if match is None:
        t.fit(Buffers(), tiny_loader())
        assert guard.epochs_verified == 1 and "frozen.table" in guard.frozen_tensor_names
    else:
        with pytest.raises(FrozenStateViolation, match=match):
            t.fit(Buffers(), tiny_loader())


def test_fingerprint_changes_with_one_flipped_bit_and_signed_zero():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1000, generator=g), torch.randn(3, 4, generator=g).double(), torch.arange(7)]
    base = fingerprint(tensors)
    assert base.shape == (3, 2) and base.dtype == torch.int64
    for i, t in enumerate(tensors):
        for position in (0, t.numel() // 2, t.numel() - 1):
            for bit in (0, 13, t.element_size() * 8 - 1):  # lowest mantissa bit, a middle bit, the sign bit
                flipped = t.clone()
                ints = flipped.view(-1).view({4: torch.int32, 8: torch.int64}[t.element_size()])
                ints[position] ^= 1 << bit if bit < 63 else -(1 << 63)
                new = fingerprint([*tensors[:i], flipped, *tensors[i + 1 :]])
                assert new[i, 0] != base[i, 0], (i, position, bit)  # the bit sum always moves
                assert torch.equal(new[:i], base[:i]) and torch.equal(new[i + 1 :], base[i + 1 :])
    assert not torch.equal(fingerprint([torch.tensor([0.0])]), fingerprint([torch.tensor([-0.0])]))
    assert torch.equal(fingerprint([torch.tensor([float("nan")])]), fingerprint([torch.tensor([float("nan")])]))


def test_norm_eval_statistics_are_guarded(tmp_path):
    model = FrozenBNClassifier(num_classes=4, arch="resnet18", norm="eval")
    guard = FrozenModuleGuard()
    trainer(tmp_path, [guard], max_epochs=1).fit(model, tiny_loader())
    assert "backbone.layer3.0.bn1.running_var" in guard.frozen_tensor_names
    assert "backbone.layer3.0.bn1.weight" not in guard.frozen_tensor_names  # the affine map trains
    with pytest.raises(
        FrozenStateViolation, match=r"rank 0: backbone.layer3.0.bn1.running_var: 1 of 256 elements changed"
    ):
        trainer(tmp_path, [FrozenModuleGuard(), FlipBit("backbone.layer3.0.bn1.running_var")]).fit(
            FrozenBNClassifier(num_classes=4, arch="resnet18", norm="eval"), tiny_loader()
        )


# ---- deliberate unfreezing: BaseFinetuning, release(), protect() ----------------------------------
class FinetuneNet(pl.LightningModule):
    """The shape of Lightning's transfer-learning example: a `backbone` unfrozen by a BaseFinetuning
    callback, a `stem` the user froze for good, a trainable head. The optimizer takes trainable
    parameters only, as BaseFinetuning requires."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.stem.requires_grad_(False)
        self.backbone = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        randomize_bn(self)

    def forward(self, x):
        return self.head(self.backbone(self.stem(x)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.05, momentum=0.9)


class Milestones(BaseFinetuning):
    """A BaseFinetuning subclass as users write them: the backbone unfrozen in two steps."""

    def __init__(self, train_bn):
        super().__init__()
        self.train_bn = train_bn

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.backbone, train_bn=self.train_bn)

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.backbone[:3], optimizer, train_bn=self.train_bn)
        if epoch == 2:
            self.unfreeze_and_add_param_group(pl_module.backbone[3:], optimizer, train_bn=self.train_bn)


@pytest.mark.parametrize("guard_first", [True, False], ids=["guard-first", "guard-last"])
@pytest.mark.parametrize("train_bn", [True, False], ids=["train_bn", "no-train_bn"])
@pytest.mark.parametrize("kind", ["BackboneFinetuning", "Milestones"])
def test_basefinetuning_unfreezing_releases_and_the_rest_stays_verified(tmp_path, caplog, kind, train_bn, guard_first):
    model = FinetuneNet()
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    finetuning = (
        BackboneFinetuning(unfreeze_backbone_at_epoch=1, train_bn=train_bn)
        if kind == "BackboneFinetuning"
        else Milestones(train_bn)
    )
    guard = FrozenModuleGuard()
    callbacks = [guard, finetuning] if guard_first else [finetuning, guard]
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer(tmp_path, callbacks, max_epochs=3).fit(model, tiny_loader(n=32, batch_size=8))
    assert guard.epochs_verified == 3  # no violation, and what stays frozen was verified every epoch
    state = model.state_dict()
    for name in ("backbone.0.weight", "backbone.3.weight"):  # unfrozen parts trained
        assert not torch.equal(state[name], start[name]), name
    for name in ("stem.0.weight", "stem.1.running_mean", "stem.1.running_var"):  # frozen for good: untouched
        assert torch.equal(state[name], start[name]), name
        assert name in guard.frozen_tensor_names
    released = set(guard.released_tensor_names)
    assert {"backbone.0.weight", "backbone.3.weight"} <= released
    releases = [r.getMessage() for r in caplog.records if "released" in r.getMessage()]
    assert releases and all(f"{type(finetuning).__name__} released" in m for m in releases)
    assert any("at epoch 1" in m and "verified bit-identical for 1 epochs" in m for m in releases)
    if kind == "Milestones" and not train_bn:
        # freeze(train_bn=False): BN frozen with track_running_stats=False, guarded and in eval throughout;
        # unfreeze(train_bn=False) switches BN parameters on but gives them to no optimizer: they stay frozen
        assert (
            "backbone.1.weight" in guard.frozen_tensor_names and "backbone.4.running_var" in guard.frozen_tensor_names
        )
        for name in ("backbone.1.weight", "backbone.1.running_mean", "backbone.4.running_var"):
            assert torch.equal(state[name], start[name]), name
        report = next(r.getMessage() for r in caplog.records if "guarding" in r.getMessage())
        assert "2 frozen BatchNorm layers have track_running_stats=False" in report
        assert "under the guard they run in eval mode with their running statistics" in report
    else:
        # freeze(train_bn=True), and BackboneFinetuning always (it freezes with the default, Lightning
        # #20629): BN trains from the start, so it is never frozen, never guarded, and its statistics move
        assert not any(n.startswith(("backbone.1.", "backbone.4.")) for n in guard.frozen_tensor_names + list(released))
        assert not torch.equal(state["backbone.1.running_mean"], start["backbone.1.running_mean"])


class BNLater(Milestones):
    """Frozen with train_bn=False (BN guarded, in eval), unfrozen with train_bn=True at epoch 1."""

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, train_bn=True)


class RecordStats(Callback):
    def __init__(self):
        self.means = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.means[trainer.current_epoch] = pl_module.backbone[1].running_mean.clone()


def test_a_bn_unfrozen_with_train_bn_is_released_with_its_statistics_and_trains(tmp_path):
    model = FinetuneNet()
    start = model.backbone[1].running_mean.clone()
    guard, stats = FrozenModuleGuard(), RecordStats()
    trainer(tmp_path, [guard, BNLater(train_bn=False), stats], max_epochs=2).fit(model, tiny_loader(n=32, batch_size=8))
    assert guard.epochs_verified == 2
    released = set(guard.released_tensor_names)
    assert {"backbone.1.weight", "backbone.1.running_mean", "backbone.1.num_batches_tracked"} <= released
    assert torch.equal(stats.means[0], start)  # guarded in eval during epoch 0: statistics did not move
    assert not torch.equal(stats.means[1], start)  # released: back in train mode, statistics update again
    assert model.backbone[1].training and model.backbone[1].track_running_stats


class SwitchOnMidEpoch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            pl_module.stem[0].weight.requires_grad_(True)


def test_an_accidental_unfreeze_beside_basefinetuning_is_still_a_violation(tmp_path):
    with pytest.raises(
        FrozenStateViolation, match=r"at epoch 1:\n  rank 0: stem.0.weight: requires_grad was switched back on"
    ):
        trainer(
            tmp_path,
            [FrozenModuleGuard(), BackboneFinetuning(unfreeze_backbone_at_epoch=1), SwitchOnMidEpoch()],
            max_epochs=3,
        ).fit(FinetuneNet(), tiny_loader(n=32, batch_size=8))


def test_resume_after_a_release_keeps_the_released_set_and_the_original_reference(tmp_path, caplog):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    guard = FrozenModuleGuard()
    model = FinetuneNet()
    stem = model.stem[0].weight.detach().clone()
    trainer(
        tmp_path,
        [guard, BackboneFinetuning(unfreeze_backbone_at_epoch=1), ckpt],
        max_epochs=2,
        enable_checkpointing=True,
    ).fit(model, tiny_loader(n=32, batch_size=8))
    saved = _guard_state(ckpt)
    assert set(saved["released"]) == set(guard.released_tensor_names) and "backbone.0.weight" in saved["released"]
    assert "backbone.0.weight" not in saved["reference_checksums"] and "stem.0.weight" in saved["reference_checksums"]
    guard2 = FrozenModuleGuard()
    resumed = FinetuneNet()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [guard2, BackboneFinetuning(unfreeze_backbone_at_epoch=1)], max_epochs=4).fit(
            resumed, tiny_loader(n=32, batch_size=8), ckpt_path=Path(ckpt.dirpath) / "last.ckpt"
        )
    assert guard2.epochs_verified == 4
    assert set(guard2.released_tensor_names) == set(guard.released_tensor_names)
    assert not any(n.startswith("backbone.0") for n in guard2.frozen_tensor_names)  # not re-guarded
    assert "stem.0.weight" in guard2.frozen_tensor_names and torch.equal(resumed.stem[0].weight, stem)
    # the released backbone trains after the resume as it did before (BaseFinetuning alone froze it again):
    # the resumed run ends where the uninterrupted one does
    assert "4 parameters released before the resume (backbone.0, backbone.3 (2 modules))" in caplog.text
    torch.manual_seed(0)  # as the first model was built (the autouse fixture's seed)
    whole = FinetuneNet()
    assert torch.equal(whole.stem[0].weight, stem)
    trainer(
        tmp_path / "whole", [FrozenModuleGuard(), BackboneFinetuning(unfreeze_backbone_at_epoch=1)], max_epochs=4
    ).fit(whole, tiny_loader(n=32, batch_size=8))
    assert not torch.equal(resumed.backbone[0].weight, model.backbone[0].weight)  # it trained after the resume
    for (name, a), b in zip(resumed.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class ReleaseAndProtect(Callback):
    """User code: unfreeze the stem at epoch 1 (release first), freeze the head at epoch 2 (protect after)."""

    def __init__(self, guard, tamper=False):
        self.guard, self.tamper = guard, tamper

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.guard.release("stem")
            pl_module.stem.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": list(pl_module.stem.parameters())})
        if trainer.current_epoch == 2:
            pl_module.head.requires_grad_(False)
            self.guard.protect("head")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.tamper and trainer.current_epoch == 2 and batch_idx == 0:
            with torch.no_grad():
                pl_module.head[2].bias.add_(1.0)


def test_release_and_protect_from_user_code(tmp_path, caplog):
    model = FinetuneNet()
    stem = model.stem[0].weight.detach().clone()
    guard = FrozenModuleGuard()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer(tmp_path, [guard, ReleaseAndProtect(guard)], max_epochs=3).fit(model, tiny_loader(n=32, batch_size=8))
    assert guard.epochs_verified == 3
    assert not torch.equal(model.stem[0].weight, stem) and model.stem[1].training  # trains, BN back in train mode
    assert "head.2.weight" in guard.frozen_tensor_names and "stem.0.weight" in guard.released_tensor_names
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "user code released 7 tensors at epoch 1" in messages and "now guarding head" in messages
    guard = FrozenModuleGuard()
    with pytest.raises(FrozenStateViolation, match=r"at epoch 2:\n  rank 0: head.2.bias: 4 of 4 elements changed"):
        trainer(tmp_path, [guard, ReleaseAndProtect(guard, tamper=True)], max_epochs=3).fit(
            FinetuneNet(), tiny_loader(n=32, batch_size=8)
        )
    with pytest.raises(ValueError, match=r"release\('hed'\): no guarded tensor(.|\n)*Close matches: head"):
        guard.release("hed")
    with pytest.raises(ValueError, match=r"release\('stem'\): no guarded tensor(.|\n)*released at epoch 1"):
        guard.release("stem")


class ChangeAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.stem[1].running_var.mul_(2)


def test_every_n_train_steps_reports_a_mid_epoch_change_at_the_next_check(tmp_path):
    with pytest.raises(
        FrozenStateViolation, match=r"at global step 4 \(epoch 0, batch 3\):\n  rank 0: stem.1.running_var: 4 of 4"
    ):
        trainer(tmp_path, [ChangeAtStep(3), FrozenModuleGuard(every_n_train_steps=2)], max_epochs=1).fit(
            FinetuneNet(), tiny_loader(n=64, batch_size=4)
        )


class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(3, 8, 8, generator=g), torch.randint(0, 4, (), generator=g)


def test_an_endless_epoch_is_verified_at_its_last_step(tmp_path, caplog):
    """An IterableDataset without end, stopped by max_steps: the final state is proven at the last step
    (Lightning 2.6 still runs the epoch-end hook there; on_fit_end verifies again in any case), and a
    change made in that very last step is caught."""
    guard = FrozenModuleGuard()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer(tmp_path, [guard], max_epochs=-1, max_steps=5).fit(
            FinetuneNet(), torch.utils.data.DataLoader(Endless(), batch_size=4)
        )
    assert guard._last_verified_step == 5
    assert [r.getMessage() for r in caplog.records if "bit-identical" in r.getMessage()][-1].endswith("on rank 0.")
    with pytest.raises(FrozenStateViolation, match="stem.1.running_var: 4 of 4 elements changed"):
        trainer(tmp_path, [ChangeAtStep(5), FrozenModuleGuard()], max_epochs=-1, max_steps=5).fit(
            FinetuneNet(), torch.utils.data.DataLoader(Endless(), batch_size=4)
        )


def test_sharded_strategies_are_refused_at_setup():
    """Lightning refuses FSDP on a CPU-only Trainer, so the guard's setup gets the strategy it would see on a
    GPU machine through a stand-in trainer (nothing of the guard is replaced)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    with pytest.raises(ValueError, match=r"does not support FSDPStrategy(.|\n)*use DDP"):
        FrozenModuleGuard().setup(SimpleNamespace(strategy=FSDPStrategy()), FinetuneNet(), "fit")
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # its __init__ needs the deepspeed package
    with pytest.raises(ValueError, match=r"does not support DeepSpeedStrategy"):
        FrozenModuleGuard().setup(SimpleNamespace(strategy=deepspeed), FinetuneNet(), "fit")


@pytest.mark.slow
@pytest.mark.timeout(300, method="thread")
def test_ddp_basefinetuning_release_agrees_on_all_ranks(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(
        tmp_path,
        [FrozenModuleGuard(), BackboneFinetuning(unfreeze_backbone_at_epoch=1), ckpt],
        strategy=DDP_IN_PYTEST,
        devices=2,
        enable_checkpointing=True,
    ).fit(FinetuneNet(), tiny_loader(n=32, batch_size=4))
    state = _guard_state(ckpt)
    assert state["epochs_verified"] == 2 and "backbone.0.weight" in state["released"]


class Wrapped(pl.LightningModule):
    """Someone else's project: a timm or torchvision model with its library's own frozen BN, in a plain module."""

    def __init__(self, library):
        super().__init__()
        if library == "timm":
            timm = pytest.importorskip("timm")
            from timm.utils.model import freeze_batch_norm_2d

            self.model = freeze_batch_norm_2d(timm.create_model("efficientnet_b0", pretrained=False, num_classes=4))
        else:
            import torchvision
            from torchvision.ops.misc import FrozenBatchNorm2d

            self.model = torchvision.models.resnet18(weights=None, num_classes=4, norm_layer=FrozenBatchNorm2d)
        randomize_bn(self.model)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class MoveStats(Callback):
    def __init__(self, name):
        self.name = name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            pl_module.get_buffer(self.name).mul_(1.5)


@pytest.mark.parametrize(
    ("library", "layers", "tensor"),
    [("timm", 49, "model.blocks.1.0.bn2.running_var"), ("torchvision", 20, "model.layer3.0.bn1.running_var")],
)
def test_other_libraries_frozen_bn_is_guarded(tmp_path, library, layers, tensor):
    """Convolutions trainable, every BN frozen by the library's own class: the guard finds the frozen
    BN layers by what they are (timm's FrozenBatchNormAct2d is not torchvision's class)."""
    guard = FrozenModuleGuard()
    trainer(tmp_path, [guard], max_epochs=1, limit_train_batches=1).fit(Wrapped(library), tiny_loader(n=4))
    assert len(guard.frozen_tensor_names) == 4 * layers and tensor in guard.frozen_tensor_names
    with pytest.raises(FrozenStateViolation, match=rf"rank 0: {tensor}: \d+ of \d+ elements changed"):
        trainer(tmp_path, [FrozenModuleGuard(), MoveStats(tensor)], max_epochs=1, limit_train_batches=1).fit(
            Wrapped(library), tiny_loader(n=4)
        )


# ---- patterns from Lightning's own tests (issue 21): a release means train like the rest ---------------
class DropoutBackbone(pl.LightningModule):
    """Lightning's finetuning test model: a backbone (Linear, ReLU, Dropout) that BackboneFinetuning unfreezes."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 4)
        self.modes = {}  # epoch -> (backbone.training, dropout.training) seen inside training_step

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0].flatten(1)[:, :8]), batch[1])
        self.modes[self.current_epoch] = (self.backbone.training, self.backbone[2].training)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)


@pytest.mark.parametrize("guard_first", [True, False], ids=["guard-first", "guard-last"])
def test_a_released_backbone_and_its_dropout_train_after_the_release(tmp_path, caplog, guard_first):
    model, guard = DropoutBackbone(), FrozenModuleGuard()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    callbacks = [guard, finetuning] if guard_first else [finetuning, guard]
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer(tmp_path, callbacks, max_epochs=3).fit(model, tiny_loader(n=8))
    assert model.modes[0] == (False, False)  # frozen: the whole backbone, Dropout included, in eval
    assert model.modes[1] == (True, True) and model.modes[2] == (True, True)  # released: trains like the rest
    assert not model.backbone[2]._forward_pre_hooks
    report = next(r.getMessage() for r in caplog.records if "guarding" in r.getMessage())
    assert "forced to eval mode: 1 fully frozen subtrees (4 modules): backbone" in report


class AllFrozenAtStart(BaseFinetuning):
    """Lightning's test_base_finetuning_internal_optimizer_metadata pattern: every parameter frozen at start."""

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.layer, train_bn=False)

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 0:
            self.unfreeze_and_add_param_group(pl_module.layer[3], optimizer)
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.layer[:2], optimizer)  # Linear + BatchNorm1d, train_bn


class WholeModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
        self.modes, self.means = {}, {}

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        self.modes[self.current_epoch] = (self.training, self.layer.training, self.layer[1].training)
        return F.cross_entropy(self(batch[0].flatten(1)[:, :8]), batch[1])

    def on_train_epoch_end(self):
        self.means[self.current_epoch] = self.layer[1].running_mean.clone()

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer[3].parameters(), lr=0.1)


@pytest.mark.parametrize("guard_first", [True, False], ids=["guard-first", "guard-last"])
def test_the_lightning_module_is_never_put_in_eval_and_a_released_bn_trains(tmp_path, guard_first):
    model, guard = WholeModel(), FrozenModuleGuard()
    start = model.layer[1].running_mean.clone()
    callbacks = [guard, AllFrozenAtStart()] if guard_first else [AllFrozenAtStart(), guard]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The provided params to be frozen already")
        trainer(tmp_path, callbacks, max_epochs=3).fit(model, tiny_loader(n=8))
    assert model.modes[0] == (True, True, False)  # the root and the released head's container train; BN guarded
    assert model.modes[1] == (True, True, True) and model.modes[2] == (True, True, True)
    assert torch.equal(model.means[0], start)  # guarded in epoch 0
    assert not torch.equal(model.means[1], start)  # released with train_bn: its statistics move
    assert guard.frozen_tensor_names == [] and "layer.1.running_mean" in guard.released_tensor_names


@pytest.mark.parametrize("guard_first", [True, False], ids=["guard-first", "guard-last"])
def test_lightnings_ema_copying_into_frozen_tensors_at_train_end_is_reported(tmp_path, guard_first):
    """EMAWeightAveraging copies its average into the model in on_train_end, after the last epoch check:
    0.9 * x + 0.1 * x is not x in floating point, so frozen tensors move. The guard has the last word."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    ema = EMAWeightAveraging(decay=0.9)
    guard = FrozenModuleGuard()
    callbacks = [guard, ema] if guard_first else [ema, guard]
    with pytest.raises(FrozenStateViolation, match=r"at the end of fit \(global step 8.*\n  rank 0: stem\.0\.weight: "):
        trainer(tmp_path, callbacks, max_epochs=2).fit(FinetuneNet(), tiny_loader(n=16))
    assert guard.epochs_verified == 2  # every epoch-end check passed: only the copy at train end moved them


def test_eval_subtrees_are_the_largest_fully_guarded_ones_below_the_root():
    from lightning_frozenbn import eval_subtrees

    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout()),  # 0: all guarded
        nn.Sequential(nn.Conv2d(4, 4, 3), nn.Dropout(), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())),  # 1: conv trains
        nn.Dropout(),  # 2: no tensor, beside trainable layers
    )
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert list(eval_subtrees(model, names)) == ["0", "1"]  # never the root, even when everything is guarded
    partly = {n for n in names if not n.startswith("1.0.")}
    assert list(eval_subtrees(model, partly)) == ["0", "1.2"]  # not 1 (its conv), not 1.1 (a Dropout alone)
    assert list(eval_subtrees(model, partly - {"0.1.running_var"})) == ["0.0", "1.2"]


class Ones(pl.LightningModule):
    """A frozen Linear of ones (checksums computable by hand) and a trainable head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(2, 2)
        with torch.no_grad():
            self.stem.weight.fill_(1.0), self.stem.bias.fill_(1.0)
        self.stem.requires_grad_(False)
        self.head = nn.Linear(2, 4)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.head(self.stem(batch[0].flatten(1)[:, :2])), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_a_guard_state_in_the_layout_earlier_versions_wrote_resumes():
    """The state dict as the guard wrote it before it became a package, built literally: checksums of
    float32 ones (bits 0x3F800000) are [n * bits, bits * (1 + 2 + ... + n)]."""
    one = 0x3F800000
    written = {
        "reference_checksums": {"stem.weight": [4 * one, 10 * one], "stem.bias": [2 * one, 3 * one]},
        "epochs_verified": 2,
        "released": {"head.weight": 1},
        "protected": {},
    }
    guard = FrozenModuleGuard()
    guard.load_state_dict(written)
    trainer(None, [guard], max_epochs=1, default_root_dir=None).fit(Ones(), tiny_loader())
    assert guard.epochs_verified == 3 and guard.released_tensor_names == ["head.weight"]
    assert guard.state_dict() == {**written, "epochs_verified": 3}  # the same layout comes back out
    tampered = {**written, "reference_checksums": {**written["reference_checksums"], "stem.bias": [2 * one, 4 * one]}}
    guard = FrozenModuleGuard()
    guard.load_state_dict(tampered)
    with pytest.raises(FrozenStateViolation, match="stem.bias: differs from the original frozen reference"):
        trainer(None, [guard], max_epochs=1, default_root_dir=None).fit(Ones(), tiny_loader())
