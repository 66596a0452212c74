import copy

import pytest
import torch
import torchvision
from helpers import DDP_IN_PYTEST, quiet_trainer, randomize_bn, requires_gpu, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_frozenbn import FrozenBNClassifier, FrozenModuleGuard, calibrate_bn

trainer = quiet_trainer


def test_only_trainable_parameters_reach_the_optimizer_and_backbone_lr_is_scaled(tmp_path):
    model = FrozenBNClassifier(num_classes=4, arch="resnet18", freeze_at=3, backbone_lr_mult=0.1)
    t = trainer(tmp_path, max_steps=1)
    t.fit(model, tiny_loader())
    opt = t.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert in_opt == trainable and frozen and not (in_opt & frozen)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone"]["initial_lr"] == pytest.approx(0.001) and groups["head"]["initial_lr"] == pytest.approx(
        0.01
    )
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in model.backbone.layer3.parameters()}


def test_checkpoint_alone_rebuilds_the_model_and_predict_gives_probabilities(tmp_path):
    model = FrozenBNClassifier(num_classes=5, arch="resnet18")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(tmp_path, enable_checkpointing=True, callbacks=[ckpt])
    t.fit(model, tiny_loader(num_classes=5), tiny_loader(num_classes=5, seed=1))
    assert "val/acc" in t.callback_metrics and "val/acc_top5" in t.callback_metrics
    restored = FrozenBNClassifier.load_from_checkpoint(ckpt.last_model_path, weights_only=True)
    x = torch.randn(3, 3, 32, 32)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))
    probs = t.predict(restored, tiny_loader(n=6, num_classes=5))
    probs = torch.cat(probs)
    assert probs.shape == (6, 5)
    torch.testing.assert_close(probs.sum(1), torch.ones(6))
    # the Lightning checkpoint is also accepted as `weights=` by build_resnet
    again = FrozenBNClassifier(num_classes=5, arch="resnet18", weights=ckpt.last_model_path).eval()
    torch.testing.assert_close(again.forward_features(x), model.forward_features(x))


def test_export_to_plain_torchvision_gives_same_logits(tmp_path):
    model = FrozenBNClassifier(num_classes=3, arch="resnet18", freeze_at=2)
    randomize_bn(model)  # trained-looking statistics in the frozen BN buffers
    model.eval()
    path = model.export(tmp_path / "export.pth")
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model(x), rtol=1e-5, atol=1e-5)


class EmbeddingHead(FrozenBNClassifier):
    """A research subclass as in docs/research.md: L2-normalised embedding + cosine classifier."""

    def __init__(self, num_classes: int, embed_dim: int = 32, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.embed = nn.Linear(self.head.out_channels, embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)

    def forward_features(self, x):
        return nn.functional.normalize(self.embed(super().forward_features(x)), dim=-1)

    def compute_loss(self, logits, target):
        return nn.functional.cross_entropy(logits * 16.0, target)


def test_research_subclass_trains_with_the_guard(tmp_path):
    model = EmbeddingHead(num_classes=4, arch="resnet18")
    guard = FrozenModuleGuard()
    t = trainer(tmp_path, max_epochs=2, callbacks=[guard])
    t.fit(model, tiny_loader())
    assert guard.epochs_verified == 2
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 32)


class Exploding(FrozenBNClassifier):
    nan_at = 2

    def compute_loss(self, logits, target):
        loss = super().compute_loss(logits, target)
        return loss * float("nan") if self.global_step == self.nan_at else loss


@pytest.mark.parametrize("check_finite", [True, "deferred"])
def test_non_finite_loss_stops_training_with_the_step(tmp_path, check_finite):
    model = Exploding(num_classes=4, arch="resnet18", check_finite=check_finite)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    model.on_train_batch_start = lambda batch, i: steps.append(i)
    with pytest.raises(FloatingPointError, match=r"not finite at global step 2 \(epoch 0, batch 2\): nan") as err:
        trainer(tmp_path).fit(model, tiny_loader())
    assert ("found one step later" in str(err.value)) == (check_finite == "deferred")
    if check_finite is True:  # stopped before the bad step's backward: the weights are finite
        assert steps == [0, 1, 2] and all(torch.isfinite(v.float()).all() for v in model.state_dict().values())
    else:  # found at the next step, without a host sync per step: the bad step was applied
        assert steps == [0, 1, 2, 3]
        assert not torch.isfinite(model.classifier.weight).all()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("where", ["last step of an epoch", "before a checkpoint is saved"])
def test_deferred_check_still_catches_the_last_step(tmp_path, where):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = Exploding(num_classes=4, arch="resnet18", check_finite="deferred")
    model.nan_at = 3  # the 4th and last batch of the epoch
    callbacks = []
    if where == "before a checkpoint is saved":
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)]
    steps = []
    model.on_train_batch_start = lambda batch, i: steps.append(i)
    t = trainer(tmp_path, callbacks=callbacks, enable_checkpointing=bool(callbacks), max_epochs=2)
    with pytest.raises(FloatingPointError, match=r"not finite at global step 3 .*found one step later"):
        t.fit(model, tiny_loader())
    assert steps == [0, 1, 2, 3]  # stopped at the end of epoch 0, before epoch 1 ran a step on NaN weights
    if callbacks:
        assert not list((tmp_path / "ckpt").glob("*.ckpt"))  # no NaN weights on disk


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "num_classes=1 is invalid: expected an integer >= 2"),
        ({"num_classes": 4, "backbone_lr_mult": -1.0}, "backbone_lr_mult=-1.0 must be >= 0"),
        ({"num_classes": 4, "calibrate_bn": -2}, "calibrate_bn=-2 must be a number of batches"),
        ({"num_classes": 4, "check_finite": "later"}, "check_finite='later' is invalid: expected true"),
    ],
)
def test_bad_module_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FrozenBNClassifier(arch="resnet18", **kwargs)


def test_everything_frozen_and_classifier_frozen_is_reported(tmp_path):
    model = FrozenBNClassifier(num_classes=4, arch="resnet18", freeze_at=5)
    model.classifier.requires_grad_(False)
    with pytest.raises(ValueError, match="No trainable parameters"):
        trainer(tmp_path, max_steps=1).fit(model, tiny_loader())


class TinyData(__import__("lightning.pytorch", fromlist=["LightningDataModule"]).LightningDataModule):
    def train_dataloader(self):
        return tiny_loader(n=32, batch_size=8)


def test_calibrate_bn_runs_before_the_guard_takes_its_reference(tmp_path):
    model = FrozenBNClassifier(num_classes=4, arch="resnet18", calibrate_bn=3)
    before = model.backbone.layer2[0].bn1.running_var.clone()
    guard = FrozenModuleGuard()
    trainer(tmp_path, callbacks=[guard], max_epochs=2).fit(model, datamodule=TinyData())
    after = model.backbone.layer2[0].bn1.running_var
    assert not torch.equal(before, after)  # calibrated (random init starts at var=1)
    assert guard.epochs_verified == 2  # a reference taken before calibration would have raised
    assert isinstance(model.backbone.layer2[0].conv1, __import__("lightning_frozenbn").FoldedConv2d)  # refolded


def test_calibration_is_not_repeated_on_resume(tmp_path):
    """Resuming keeps the checkpoint's calibrated statistics: recalibrating would move guarded frozen
    tensors (the guard would stop the run) and change the function mid-training."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = FrozenBNClassifier(num_classes=4, arch="resnet18", calibrate_bn=3)
    trainer(tmp_path, callbacks=[FrozenModuleGuard(), ckpt], max_epochs=1, enable_checkpointing=True).fit(
        model, datamodule=TinyData()
    )
    saved = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    resumed = FrozenBNClassifier(num_classes=4, arch="resnet18", calibrate_bn=3)
    guard = FrozenModuleGuard()
    trainer(tmp_path, callbacks=[guard], max_epochs=2).fit(
        resumed, datamodule=ShiftedData(), ckpt_path=ckpt.last_model_path
    )
    assert guard.epochs_verified == 2
    for name, value in resumed.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            assert torch.equal(value, saved[name]), name


class ShiftedData(TinyData):
    """Other data than the first fit's: a recalibration would give other statistics."""

    def train_dataloader(self):
        loader = tiny_loader(n=32, batch_size=8, seed=5)
        loader.dataset.tensors[0].mul_(3).add_(1)
        return loader


class OrderedData(TinyData):
    def train_dataloader(self):
        return tiny_loader(n=64, batch_size=8, seed=3)


@pytest.mark.slow
@pytest.mark.timeout(300, method="thread")
def test_calibration_under_ddp_uses_different_batches_per_rank_and_sums_them(tmp_path):
    """2 CPU processes, calibrate_bn=2 each: rank 0 sees batches 0 and 2, rank 1 batches 1 and 3, and the
    statistics (summed over ranks) equal one process's calibration on batches 0..3."""
    torch.manual_seed(0)
    model = FrozenBNClassifier(num_classes=4, arch="resnet18", calibrate_bn=2, freeze_at=5)
    reference = copy.deepcopy(model)
    batches = [batch[0] for batch in OrderedData().train_dataloader()][:4]
    calibrate_bn(reference, iter(batches), num_batches=4)
    t = trainer(tmp_path, strategy=DDP_IN_PYTEST, devices=2, max_steps=1)
    t.fit(model, datamodule=OrderedData())
    ours, theirs = model.state_dict(), reference.state_dict()
    stats = [k for k in ours if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 20
    for key in stats:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    one_rank = copy.deepcopy(model)
    calibrate_bn(one_rank, iter(batches[::2]), num_batches=2)  # what rank 0 alone would have computed
    assert not torch.allclose(one_rank.state_dict()[stats[-1]], theirs[stats[-1]], rtol=1e-3)


def test_fold_and_no_fold_give_the_same_loss_curve(tmp_path):
    losses = {}
    for fold in (True, False):
        torch.manual_seed(0)
        model = FrozenBNClassifier(num_classes=4, arch="resnet18", fold=fold, freeze_at=1)

        class Record(__import__("lightning.pytorch", fromlist=["Callback"]).Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, fold=fold):
                losses.setdefault(fold, []).append(outputs["loss"].item())

        trainer(tmp_path, callbacks=[Record()], max_steps=6).fit(model, tiny_loader(n=48, batch_size=8))
    assert len(losses[True]) == 6
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_channels_last_bf16_fit_on_cuda(tmp_path):
    # random init: calibrated statistics keep an all-frozen-BN ResNet-50 from blowing up (as in the quickstart)
    model = FrozenBNClassifier(num_classes=4, arch="resnet50", compile=True, channels_last=True, calibrate_bn=3)
    guard = FrozenModuleGuard()
    t = trainer(
        tmp_path, accelerator="gpu", precision="bf16-mixed", max_epochs=2, callbacks=[guard], gradient_clip_val=1.0
    )
    t.fit(model, datamodule=TinyData())
    assert guard.epochs_verified == 2
    assert torch.isfinite(t.callback_metrics["train/loss"])


@requires_gpu
@pytest.mark.gpu
def test_deferred_finite_check_on_cuda_reads_the_flag_it_waited_for(tmp_path):
    # the pinned copy + event path: a finite run must not stop (a read before the copy lands would
    # see garbage), and a NaN at step 2 must stop at step 3 naming step 2
    good = FrozenBNClassifier(num_classes=4, arch="resnet18", check_finite="deferred")
    trainer(tmp_path, accelerator="gpu", max_epochs=3).fit(good, tiny_loader())
    bad = Exploding(num_classes=4, arch="resnet18", check_finite="deferred")
    with pytest.raises(FloatingPointError, match=r"not finite at global step 2 .*found one step later"):
        trainer(tmp_path, accelerator="gpu").fit(bad, tiny_loader())


def test_a_checkpoint_restores_without_the_initial_weights_file(tmp_path):
    weights = tmp_path / "initial.pth"
    torch.save(randomize_bn(torchvision.models.resnet18(weights=None)).state_dict(), weights)
    model = FrozenBNClassifier(num_classes=4, arch="resnet18", weights=str(weights))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, callbacks=[ckpt], enable_checkpointing=True, max_steps=2).fit(model, tiny_loader())
    weights.unlink()  # another machine, an offline node: the file is not there
    restored = FrozenBNClassifier.load_from_checkpoint(ckpt.last_model_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    assert restored.hparams.weights is None and model.hparams.weights == str(weights)  # the run's own hparams kept
    assert torch.load(ckpt.last_model_path, weights_only=True)["initial_weights"] == str(weights)


def _val_loader():
    return tiny_loader(n=8, seed=1)


def test_reduce_on_plateau_watches_val_loss(tmp_path):
    from functools import partial

    model = FrozenBNClassifier(
        num_classes=4, arch="resnet18", scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0)
    )
    t = trainer(tmp_path, max_epochs=2)
    t.fit(model, tiny_loader(), _val_loader())
    config = t.lr_scheduler_configs[0]
    assert config.monitor == "val/loss" and config.interval == "epoch"
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert config.scheduler.last_epoch == 2  # stepped once per epoch with the monitored value


def test_an_unknown_scheduler_monitor_names_the_logged_metrics(tmp_path):
    from functools import partial

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    model = FrozenBNClassifier(
        num_classes=4,
        arch="resnet18",
        scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau),
        scheduler_monitor="val/accuracy",
    )
    with pytest.raises(MisconfigurationException, match=r"val/accuracy.*not available.*val/loss"):
        trainer(tmp_path, max_epochs=1).fit(model, tiny_loader(), _val_loader())


def test_one_cycle_steps_every_batch_with_interval_step(tmp_path):
    from functools import partial

    model = FrozenBNClassifier(
        num_classes=4,
        arch="resnet18",
        scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01, total_steps=8),
        scheduler_interval="step",
    )
    t = trainer(tmp_path, max_epochs=2)  # 4 batches per epoch
    t.fit(model, tiny_loader())
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 8


def test_default_cosine_with_linear_warmup(tmp_path):
    model = FrozenBNClassifier(num_classes=4, arch="resnet18", warmup_steps=3)
    lrs = []
    model.on_train_batch_start = lambda batch, i: lrs.append(model.optimizers().param_groups[0]["lr"])
    trainer(tmp_path, max_epochs=3).fit(model, tiny_loader())  # 12 steps, lr 0.01
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])  # linear warmup, then the peak
    assert lrs[4] < 0.01 and lrs == sorted(lrs[:4]) + sorted(lrs[4:], reverse=True)  # then cosine decay


def test_no_weight_decay_on_norm_and_bias():
    from functools import partial

    model = FrozenBNClassifier(
        num_classes=4,
        arch="resnet18",
        freeze_at=0,
        norm="eval",
        no_decay_norm_bias=True,
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1),
    )
    optimizer = model.configure_optimizers()["optimizer"]
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    free = [p for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert decayed and free and all(p.dim() > 1 for p in decayed) and all(p.dim() == 1 for p in free)
    assert any(model.classifier.bias is p for p in free) and any(model.classifier.weight is p for p in decayed)
    norm_affine = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() == 1 and "bn" in n]
    assert norm_affine and all(any(w is p for p in free) for w in norm_affine)  # trainable norm affine: no decay
    assert {id(p) for p in decayed + free} == {id(p) for p in model.parameters() if p.requires_grad}


class DrawsPerRank(FrozenBNClassifier):
    """Writes the first number each training step draws from torch's generator, per rank."""

    def __init__(self, folder: str, **kwargs):
        super().__init__(**kwargs)
        self.folder = folder

    def training_step(self, batch, batch_idx):
        with open(f"{self.folder}/draws.rank{self.global_rank}", "a") as f:
            f.write(f"{self.global_step} {torch.rand(1).item()!r}\n")
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
@pytest.mark.timeout(300, method="thread")
def test_each_ddp_rank_draws_its_own_random_numbers_at_every_step(tmp_path):
    """The per-step seed includes the rank: with it left out every rank would drop the same activations and
    sample the same regions (the detector), which is no longer data parallelism over independent draws."""
    model = DrawsPerRank(str(tmp_path), num_classes=4, arch="resnet18")
    trainer(tmp_path, strategy=DDP_IN_PYTEST, devices=2, max_steps=3).fit(model, tiny_loader(n=32))
    draws = [dict(line.split() for line in (tmp_path / f"draws.rank{r}").read_text().splitlines()) for r in (0, 1)]
    assert list(draws[0]) == list(draws[1]) == ["0", "1", "2"]
    assert all(draws[0][step] != draws[1][step] for step in draws[0])
    assert len(set(draws[0].values())) == 3  # and each step its own draw
