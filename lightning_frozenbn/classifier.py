"""FrozenBNClassifier: the image classifier on the frozen-BN backbone and head, the package's LightningModule."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_frozenbn.module import FrozenBNModule
from lightning_frozenbn.norm import to_batchnorm

__all__ = ["FrozenBNClassifier"]


class FrozenBNClassifier(FrozenBNModule):
    """Image classifier on a frozen-BN torchvision ResNet: backbone (stem..layer3) + head (layer4) + linear.

    Meant to be subclassed by research code: override :meth:`forward_features` (the embedding),
    :meth:`forward` (the logits), :meth:`compute_loss` or :meth:`param_groups` and keep the rest
    (metrics, optimizer wiring, calibration, finite-loss check, export).

    Args:
        num_classes: number of classes; LightningCLI links it from the data module.
        label_smoothing: cross-entropy label smoothing.
        **kwargs: the arguments every task shares (``arch``, ``weights``, ``norm``, ``freeze_at``, ``fold``,
            the optimizer and scheduler, ...), documented on :class:`~lightning_frozenbn.module.FrozenBNModule`.
    """

    #: the console command for this kind of model (named when a checkpoint of the other kind is given)
    command: ClassVar[str] = "lightning-frozenbn"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"num_classes={num_classes!r} is invalid: expected an integer >= 2 (the number of class "
                "folders in your data; a classifier needs two). With the CLI it is taken from the data module; "
                "do not set it twice."
            )
        super().__init__(**kwargs)
        self.classifier = nn.Linear(self.head.out_channels, num_classes)
        metric_ks = (1, 5) if num_classes >= 5 else (1,)
        self.val_acc = nn.ModuleDict(
            {f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in metric_ks}
        )
        self.test_acc = copy.deepcopy(self.val_acc)

    # ---- the parts research code overrides -------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """Return the embedding ``(N, head.out_channels)``: backbone then head."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(x))

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits."""
        return self.classifier(self.forward_features(x))

    def compute_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy (with optional label smoothing)."""
        return F.cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing)

    # ---- Lightning hooks --------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One step; stops all ranks at the first non-finite loss instead of training on garbage."""
        x, y = batch[0], batch[1]
        loss = self.compute_loss(self(x), y)
        self.check_loss_finite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, metrics: nn.ModuleDict) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log(f"{stage}/loss", self.compute_loss(logits, y), sync_dist=True, batch_size=x.shape[0])
        for name, metric in metrics.items():
            metric(logits, y)
            key = f"{stage}/acc" if name == "top1" else f"{stage}/acc_{name}"
            self.log(key, metric, prog_bar=name == "top1", batch_size=x.shape[0])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Loss, top-1 and top-5 accuracy on the validation split."""
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Loss, top-1 and top-5 accuracy on the test split."""
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``(N, num_classes)``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(dim=-1)

    # ---- export -----------------------------------------------------------------------------
    def to_torchvision(self) -> torchvision.models.ResNet:
        """Export to a plain ``torchvision.models.<arch>(num_classes=...)`` with nn.BatchNorm2d, in eval mode.

        The result has no dependency on this package, computes the same logits in eval mode, and its
        ``state_dict()`` is a standard torchvision checkpoint.
        """
        trunk = to_batchnorm(copy.deepcopy(nn.ModuleDict({"b": self.backbone, "h": self.head})).cpu().float())
        state = {**trunk["b"].state_dict(), **trunk["h"].state_dict()}
        state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
        state["fc.weight"], state["fc.bias"] = (
            self.classifier.weight.detach().cpu(),
            self.classifier.bias.detach().cpu(),
        )
        model = getattr(torchvision.models, self.hparams.arch)(num_classes=self.hparams.num_classes)
        model.load_state_dict(state)
        return model.eval()

    def export(self, path: str | Path) -> Path:
        """Write :meth:`to_torchvision`'s state dict to ``path`` (loadable with ``weights_only=True``)."""
        path = Path(path)
        torch.save(self.to_torchvision().state_dict(), path)
        return path
