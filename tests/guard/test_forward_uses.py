"""The guard checks what the forward uses, with the callbacks and namespaces of projects we did not write:
SWA's replaced BN statistics, pruning's re-parametrisation, ``pytorch_lightning``, timm's stochastic depth,
FinetuningScheduler's train-mode BN, modules built in ``configure_model`` or frozen mid-run."""

import logging
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer, randomize_bn, tiny_loader
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelPruning, StochasticWeightAveraging
from torch import nn

from lightning_frozenbn import FrozenBNClassifier, FrozenModuleGuard, FrozenStateViolation
from lightning_frozenbn.guard import Ledger, find_frozen_modules


def trainer(tmp_path, callbacks, **kwargs):
    return quiet_trainer(tmp_path, callbacks=callbacks, **{"max_epochs": 2, **kwargs})


class FrozenFeatures(pl.LightningModule):
    """A plain module: frozen conv + torch BatchNorm (random statistics, num_batches_tracked 0) + trainable head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
        randomize_bn(self.features)
        self.features[1].num_batches_tracked.zero_()  # SWA's `num_batches_tracked *= 0` then changes nothing
        self.features.requires_grad_(False)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
        )

    def forward(self, x):
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


# ---- a tensor replaced or re-parametrised is a change (the ledger, no Trainer) ---------------------
def test_a_replaced_tensor_is_looked_up_by_name_compared_and_restored_there():
    model = FrozenFeatures()
    ledger = Ledger.collect(model, find_frozen_modules(model))
    bn = model.features[1]
    before = bn.running_var.clone()
    bn.running_var = torch.ones_like(bn.running_var)  # a new object, as SWA assigns it
    assert ledger.changes() == [
        "features.1.running_var: was replaced by a new tensor (values differ: 8 of 8 elements changed, max |diff| = "
        f"{(before - 1).abs().max().item():.3g})"
    ]
    ledger.restore()
    assert torch.equal(bn.running_var, before) and ledger.changes() == []  # restored into what the forward reads
    bn.running_var = bn.running_var.clone()  # a new object with the same bits (a device move) is no change
    assert ledger.changes() == []


def test_pruning_and_parametrize_are_named_and_restore_refuses_them():
    from torch.nn.utils import parametrize, prune

    model = FrozenFeatures()
    ledger = Ledger.collect(model, find_frozen_modules(model))
    prune.l1_unstructured(model.features[0], "weight", amount=0.5)
    parametrize.register_parametrization(model.features[3], "weight", nn.Identity())
    lines = ledger.changes()
    assert lines[0].startswith("features.0.weight: was re-parametrised by torch.nn.utils.prune (weight = ")
    assert "108 of 216 elements masked to 0" in lines[0]
    assert lines[1].startswith("features.3.weight: was re-parametrised by torch.nn.utils.parametrize (Identity)")
    assert [u.split(":")[0] for u in ledger.unrestorable()] == ["features.0.weight", "features.3.weight"]


# ---- SWA ----------------------------------------------------------------------------------------
def test_swa_resetting_our_norm_eval_statistics_stops_the_run_naming_swa(tmp_path):
    model = randomize_bn(FrozenBNClassifier(num_classes=4, arch="resnet18", norm="eval"))
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    with pytest.raises(
        FrozenStateViolation,
        match=r"running_mean: was replaced by a new tensor \(values differ(.|\n)*StochasticWeightAveraging replaced",
    ):
        trainer(tmp_path, [FrozenModuleGuard(), swa]).fit(model, tiny_loader())


@pytest.mark.parametrize("guard_first", [True, False], ids=["guard-first", "guard-last"])
def test_swa_on_a_frozen_torch_bn_is_reported_and_restore_really_restores(tmp_path, guard_first):
    model = FrozenFeatures()
    stats = {k: v.clone() for k, v in model.features[1].state_dict().items()}
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    with pytest.warns(UserWarning, match=r"running_var: was replaced by a new tensor(.|\n)*Restored the reference"):
        guard = FrozenModuleGuard(on_violation="restore")
        trainer(tmp_path, [guard, swa] if guard_first else [swa, guard]).fit(model, tiny_loader())
    for key, value in model.features[1].state_dict().items():  # what the forward uses, not the old objects
        assert torch.equal(value, stats[key]), key


# ---- pruning ------------------------------------------------------------------------------------
@pytest.mark.parametrize("permanent", [False, True])
def test_pruning_a_frozen_module_is_a_violation(tmp_path, permanent):
    pruning = ModelPruning("l1_unstructured", amount=0.5, make_pruning_permanent=permanent, verbose=0)
    match = r"features.0.weight: was re-parametrised by torch.nn.utils.prune" if not permanent else "features.0.weight"
    with pytest.raises(FrozenStateViolation, match=match):
        trainer(tmp_path, [FrozenModuleGuard(), pruning]).fit(FrozenFeatures(), tiny_loader())


# ---- the pytorch_lightning namespace ------------------------------------------------------------
def test_the_guard_in_a_pytorch_lightning_trainer_recognises_its_backbone_finetuning(tmp_path, caplog):
    legacy = pytest.importorskip("pytorch_lightning")

    class Net(legacy.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(3 * 32 * 32, 16), nn.ReLU())
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.backbone(x.flatten(1)))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.05)

    for guard_first in (True, False):
        guard, finetuning = FrozenModuleGuard(), legacy.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1)
        model = Net()
        with caplog.at_level(logging.INFO):
            legacy.Trainer(
                default_root_dir=tmp_path,
                max_epochs=2,
                accelerator="cpu",
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                callbacks=[guard, finetuning] if guard_first else [finetuning, guard],
            ).fit(model, tiny_loader())
        assert "BackboneFinetuning released 2 tensors at epoch 1" in caplog.text
        assert guard.released_tensor_names == ["backbone.0.weight", "backbone.0.bias"]
        assert model.backbone[0].weight.requires_grad  # the fine-tuning was not undone
        caplog.clear()
    with pytest.raises(ValueError, match="does not support FSDPStrategy"):
        FrozenModuleGuard().setup(SimpleNamespace(strategy=legacy.strategies.FSDPStrategy()), Net(), "fit")


# ---- every module of a frozen subtree runs in eval: timm's stochastic depth -----------------------
class TimmNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        timm = pytest.importorskip("timm")
        self.model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=4, drop_path_rate=0.2)
        self.model.conv_stem.requires_grad_(False), self.model.bn1.requires_grad_(False)
        self.model.blocks[:4].requires_grad_(False)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        self.train()  # user code flipping everything back mid-step
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


class ModesSeen(Callback):
    """Records the mode each DropPath layer had when it ran (a forward hook: runs after the pre-hooks)."""

    def __init__(self):
        self.frozen, self.trainable = set(), set()

    def on_train_start(self, trainer, pl_module):
        for name, m in pl_module.model.blocks.named_modules():
            if type(m).__name__ == "DropPath":
                seen = self.frozen if int(name.split(".")[0]) < 4 else self.trainable
                m.register_forward_hook(lambda mod, args, out, seen=seen: seen.add(mod.training))


def test_stochastic_depth_inside_frozen_blocks_runs_in_eval_even_after_self_train(tmp_path, caplog):
    seen = ModesSeen()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [FrozenModuleGuard(), seen], max_epochs=1, limit_train_batches=2).fit(
            TimmNet(), tiny_loader(n=8)
        )
    assert seen.frozen == {False} and seen.trainable == {True}  # frozen: eval; the trainable blocks keep theirs
    assert "run in eval in every forward: BatchNormAct2d x" in caplog.text and "DropPath x" in caplog.text


def test_finetuning_schedulers_train_mode_bn_is_overridden_by_name(tmp_path, caplog):
    fts = pytest.importorskip("finetuning_scheduler")
    model = FrozenFeatures()
    model.features.requires_grad_(True)  # FTS freezes and thaws by its own schedule
    schedule = {0: {"params": ["classifier.*"]}, 1: {"params": ["features.*"]}}
    with caplog.at_level(logging.INFO):
        trainer(
            tmp_path, [fts.FinetuningScheduler(ft_schedule=schedule, max_depth=0), FrozenModuleGuard()], max_epochs=1
        ).fit(model, tiny_loader())
    assert "overrides FinetuningScheduler(frozen_bn_track_running_stats=True)" in caplog.text


# ---- modules that appear late ---------------------------------------------------------------------
class BuiltLate(FrozenFeatures):
    def __init__(self):
        pl.LightningModule.__init__(self)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
        )

    def configure_model(self):
        if not hasattr(self, "backbone"):
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).requires_grad_(False)

    def forward(self, x):
        return self.classifier(self.backbone(x))


def test_modules_named_are_resolved_after_configure_model(tmp_path):
    guard = FrozenModuleGuard(modules=["backbone"])
    trainer(tmp_path, [guard]).fit(BuiltLate(), tiny_loader())
    assert guard.epochs_verified == 2 and "backbone.1.running_mean" in guard.frozen_tensor_names


class FreezeHeadAtEpoch1(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.classifier[2].requires_grad_(False)


def test_a_module_frozen_mid_run_without_protect_is_warned_about_once(tmp_path):
    with pytest.warns(UserWarning, match=r"classifier.2 was frozen after training started and is not guarded") as rec:
        trainer(tmp_path, [FrozenModuleGuard(), FreezeHeadAtEpoch1()], max_epochs=3).fit(
            FrozenFeatures(), tiny_loader()
        )
    assert sum("frozen after training started" in str(w.message) for w in rec) == 1
