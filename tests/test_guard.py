import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer, tiny_loader
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.multiprocessing import ProcessRaisedException

from lightning_frozenbn import FrozenBNClassifier, FrozenModuleGuard, FrozenStateViolation, find_frozen_modules


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
    with pytest.raises(FrozenStateViolation, match=rf"rank 0: {tensor}: \d+ of \d+ elements changed, max \|diff\| = "):
        trainer(tmp_path, callbacks).fit(make_model(), tiny_loader())


def test_restore_puts_reference_values_back_and_warn_goes_on(tmp_path):
    model = FrozenBNClassifier(num_classes=4, arch="resnet18")
    original = model.backbone.layer1[0].conv1.weight.detach().clone()
    guard = FrozenModuleGuard(on_violation="restore")
    with pytest.warns(UserWarning, match="Restored the reference values"):
        trainer(tmp_path, [guard, FlipBit("backbone.layer1.0.conv1.weight")]).fit(model, tiny_loader())
    assert torch.equal(model.backbone.layer1[0].conv1.weight, original)
    model = FrozenBNClassifier(num_classes=4, arch="resnet18")
    with pytest.warns(UserWarning, match="frozen state changed at epoch 1"):
        trainer(tmp_path, [FrozenModuleGuard(on_violation="warn"), FlipBit("backbone.conv1.weight")], max_epochs=3).fit(
            model, tiny_loader()
        )


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
    with pytest.raises(
        FrozenStateViolation, match="backbone.layer1.1.bn1.running_mean: differs from the original frozen reference"
    ):
        trainer(tmp_path, [FrozenModuleGuard()], max_epochs=2).fit(
            FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader(), ckpt_path=tmp_path / "tampered.ckpt"
        )


def test_bad_guard_arguments():
    with pytest.raises(ValueError, match="on_violation='ignore'.*'raise', 'warn' or 'restore'"):
        FrozenModuleGuard(on_violation="ignore")
    with pytest.raises(ValueError, match="expected a list of submodule names"):
        FrozenModuleGuard(modules="backbone.layer1")
    model = FrozenBNClassifier(num_classes=4, arch="resnet18")
    guard = FrozenModuleGuard(modules=["backbone.layr1"])
    with pytest.raises(ValueError, match="'backbone.layr1', which is not a submodule.*Close matches: backbone.layer1"):
        guard.setup(None, model, "fit")
    with pytest.raises(ValueError, match="'backbone.layer3', but it has \\d+ trainable parameters"):
        FrozenModuleGuard(modules=["backbone.layer3"]).setup(None, model, "fit")
    with pytest.raises(ValueError, match="'backbone.relu', which has no parameters or buffers"):
        FrozenModuleGuard(modules=["backbone.relu"]).setup(None, model, "fit")


def test_explicit_modules_are_guarded(tmp_path):
    guard = FrozenModuleGuard(modules=["backbone.layer1"])
    trainer(tmp_path, [guard], max_epochs=1).fit(FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader())
    assert guard.frozen_tensor_names and all(n.startswith("backbone.layer1.") for n in guard.frozen_tensor_names)


class RankFault(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_rank == 1 and trainer.current_epoch == 0:
            with torch.no_grad():
                pl_module.backbone.layer1[0].bn1.running_mean.add_(1.0)


@pytest.mark.slow
def test_ddp_two_processes_guard_passes_and_catches_a_rank_fault(tmp_path):
    guard = FrozenModuleGuard()
    t = trainer(tmp_path, [guard], strategy="ddp_spawn", devices=2, max_epochs=2)
    t.fit(FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader())
    t = trainer(tmp_path, [RankFault(), FrozenModuleGuard()], strategy="ddp_spawn", devices=2)
    # ddp_spawn re-raises the first failing rank's error; that every rank stopped shows as no hang
    with pytest.raises(
        (FrozenStateViolation, ProcessRaisedException),
        match=r"rank 1: backbone.layer1.0.bn1.running_mean: 64 of 64 elements changed(.|\n)*rank 1 holds a different frozen state than rank 0",
    ):
        t.fit(FrozenBNClassifier(num_classes=4, arch="resnet18"), tiny_loader())
