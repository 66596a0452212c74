"""Every DDP rank trains the same model: a backbone released after DDP wrapped the model has its gradients
averaged across ranks, and the guard compares every trainable parameter across ranks, naming what differs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DDP_IN_PYTEST, quiet_trainer, tiny_loader
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn
from torch.multiprocessing import ProcessRaisedException
from torch.utils.data import DataLoader, DistributedSampler

from lightning_frozenbn import FrozenModuleGuard, FrozenStateViolation


class Net(LightningModule):
    """The issue's setup: ``Sequential(Linear, ReLU)`` backbone released by BackboneFinetuning, plus a head."""

    def __init__(self, batch_size=4):
        super().__init__()
        self.batch_size = batch_size
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(3 * 8 * 8, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)
        self.double()

    def forward(self, x):
        return self.head(self.backbone(x.flatten(1).double()))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        """Rank r gets samples r, r+2, ... in order, so that step k's batches on 2 ranks are one batch of 8 on one."""
        data = tiny_loader(n=32, size=8).dataset
        ranks = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=ranks)


class SaveWeights(Callback):
    """Each rank writes its final weights (the launcher returns rank 0's results only)."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), self.folder / f"rank{trainer.global_rank}.pt")


class NudgeRank1Head(Callback):
    """Rank 1 alone changes a trainable weight: the ranks no longer train the same model."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_rank == 1 and trainer.current_epoch == 0:
            with torch.no_grad():
                pl_module.head.bias.add_(1e-3)


@pytest.mark.slow
@pytest.mark.timeout(400, method="thread")
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_backbone_released_under_ddp_trains_one_model_equal_to_one_process_on_all_the_data(tmp_path, accumulate):
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    quiet_trainer(
        tmp_path,
        callbacks=[FrozenModuleGuard(), finetuning, SaveWeights(tmp_path)],
        max_epochs=3,
        strategy=DDP_IN_PYTEST,
        devices=2,
        use_distributed_sampler=False,
        accumulate_grad_batches=accumulate,  # DDP's no_sync on the first of each pair: averaged once, at the step
    ).fit(Net(batch_size=4))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
    # one process on the union of the data: step k's two batches of 4 are samples 8k..8k+7, one batch of 8 here
    single = tmp_path / "single"
    single.mkdir()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    quiet_trainer(
        single,
        callbacks=[FrozenModuleGuard(), finetuning, SaveWeights(single)],
        max_epochs=3,
        accumulate_grad_batches=accumulate,
    ).fit(Net(batch_size=8))
    one = torch.load(single / "rank0.pt", weights_only=True)
    assert not torch.equal(one["backbone.0.weight"], Net().backbone[0].weight.detach())  # it did train
    for name in one:
        torch.testing.assert_close(rank0[name], one[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(400, method="thread")
def test_trainable_parameters_that_differ_across_ranks_are_named(tmp_path):
    with pytest.raises(
        (FrozenStateViolation, ProcessRaisedException),
        match=r"rank 1 holds different trainable parameters than rank 0 in 1 tensors: head.bias",
    ):
        quiet_trainer(
            tmp_path,
            callbacks=[NudgeRank1Head(), FrozenModuleGuard()],
            max_epochs=2,
            strategy=DDP_IN_PYTEST,
            devices=2,
        ).fit(Net())


@pytest.mark.slow
@pytest.mark.timeout(400, method="thread")
def test_finetuning_schedulers_phases_under_ddp_train_one_model(tmp_path):
    """FinetuningScheduler thaws the backbone at its phase 1, after DDP wrapped the model: the same cause, the
    same fix (its phases are BaseFinetuning releases)."""
    fts = pytest.importorskip("finetuning_scheduler")
    model = Net()
    model.backbone.requires_grad_(True)  # FTS freezes and thaws by its schedule
    schedule = {
        0: {"params": ["head.*"], "max_transition_epoch": 1},
        1: {"params": ["backbone.*"], "max_transition_epoch": 3},
    }
    scheduler = fts.FinetuningScheduler(ft_schedule=schedule, epoch_transitions_only=True, restore_best=False)
    quiet_trainer(
        tmp_path,
        callbacks=[scheduler, FrozenModuleGuard(), SaveWeights(tmp_path)],
        max_epochs=3,
        strategy=DDP_IN_PYTEST,
        devices=2,
        use_distributed_sampler=False,
    ).fit(model)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(rank0["backbone.0.weight"], Net().backbone[0].weight.detach())  # it did train
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
