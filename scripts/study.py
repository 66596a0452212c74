"""Measure the three frozen-BN claims on real data (scikit-learn's handwritten digits), offline, on CPU.

    python scripts/study.py                 # full study, scripts/study_results/ (tables, plot, JSON); ~20 min on 2 cores
    python scripts/study.py --quick         # reduced version used by the tests (< 2 min)
    python scripts/study.py --task detection [--quick]   # the same claims on the C4 detector (study_detection.py)

Pretraining (so the study is honest and offline): a ResNet-18 with plain BatchNorm is trained on
digits 0-4 and saved as a torchvision-style state dict; every fine-tuning run loads it through
``weights=`` and learns digits 5-9.

Claim 1: with small per-device batches, batch statistics are noise and frozen BN fine-tunes better
         than BN in train mode. Batch sizes x policies (frozen / eval / train) x seeds.
Claim 2: with frozen BN, 2-process DDP with batch B/2 per rank computes what 1 process with batch B
         computes; with train-mode BN it does not; synchronised BN restores it.
Claim 3: when the target domain is far from the source (inverted digits), frozen BN with the source
         statistics suffers and re-estimating them (``calibrate_bn``) recovers accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_frozenbn import FrozenBNClassifier, build_resnet
from lightning_frozenbn.backbone import IMAGENET_MEAN, IMAGENET_STD

POLICIES = ("frozen", "eval", "train")


# ---- data -------------------------------------------------------------------------------------
def digits(classes: range, invert: bool = False, size: int = 32, seed: int = 0):
    """(train, val) TensorDatasets of the sklearn digits in ``classes``, labels 0..len-1, ImageNet-normalised."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = [i for i, t in enumerate(d.target) if t in classes]
    x = torch.tensor(d.images[keep], dtype=torch.float32)[:, None] / 16.0
    if invert:
        x = 1.0 - x
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean, std = torch.tensor(IMAGENET_MEAN)[None, :, None, None], torch.tensor(IMAGENET_STD)[None, :, None, None]
    x = (x - mean) / std
    y = torch.tensor(d.target[keep]) - classes.start
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_val = len(y) // 5
    return TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val])


class Data(LightningDataModule):
    """In-memory tensors with a seeded shuffle: identical data order for every policy."""

    def __init__(self, train, val, batch_size, seed):
        super().__init__()
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=g)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=256)


# --quick caps each run at this many batches (batch 2 would otherwise take ~360 steps a run)
MAX_BATCHES: int | float = 1.0


def quiet_trainer(epochs: int, precision: str = "32-true") -> Trainer:
    return Trainer(
        limit_train_batches=MAX_BATCHES,
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        precision=precision,
    )


# ---- pretraining ------------------------------------------------------------------------------
def pretrain(out: Path, epochs: int, classes: range = range(0, 5)) -> Path:
    """Plain-BN ResNet-18 on ``classes`` of the digits (0-4 by default), saved as a torchvision state dict."""
    path = out / ("source_resnet18.pth" if classes == range(0, 5) else f"source_resnet18_{len(classes)}.pth")
    if path.exists():
        return path
    seed_everything(0, verbose=False)
    train, val = digits(classes)
    model = FrozenBNClassifier(
        num_classes=len(classes),
        arch="resnet18",
        norm="train",
        freeze_at=0,
        fold=False,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    )
    trainer = quiet_trainer(epochs)
    trainer.fit(model, datamodule=Data(train, val, 32, 0))
    acc = trainer.validate(model, datamodule=Data(train, val, 32, 0), verbose=False)[0]["val/acc"]
    export = model.to_torchvision()
    torch.save(export.state_dict(), path)
    print(f"pretrained on digits {classes.start}-{classes.stop - 1}: val acc {acc:.3f} -> {path}", flush=True)
    return path


def finetune(
    weights: Path, policy: str, batch: int, seed: int, epochs: int, invert: bool = False, calibrate: int = 0
) -> float:
    seed_everything(seed, verbose=False)
    train, val = digits(range(5, 10), invert=invert, seed=seed)
    lr = 0.02 * math.sqrt(batch / 32)  # sqrt scaling keeps small batches stable
    model = FrozenBNClassifier(
        num_classes=5,
        arch="resnet18",
        weights=str(weights),
        norm=policy,
        freeze_at=2,
        calibrate_bn=calibrate,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-4),
    )
    trainer = quiet_trainer(epochs)
    data = Data(train, val, batch, seed)
    trainer.fit(model, datamodule=data)
    return float(trainer.callback_metrics["val/acc"])


# ---- claim 2: DDP vs one process ----------------------------------------------------------------
class GlobalBatchNorm2d(nn.BatchNorm2d):
    """SyncBatchNorm's arithmetic on CPU: batch statistics over all ranks via a differentiable all_reduce.

    torch's SyncBatchNorm refuses CPU tensors, so the study re-creates its computation to measure it.
    """

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        n = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), n])
        stats = all_reduce(stats) if dist.is_initialized() else stats
        c = x.shape[1]
        count = stats[-1]
        mean, var = stats[:c] / count, stats[c : 2 * c] / count - (stats[:c] / count) ** 2
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * count / (count - 1))
        y = (x - mean[None, :, None, None]) * (var[None, :, None, None] + self.eps).rsqrt()
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def _claim2_model(weights: Path, policy: str) -> nn.Module:
    norm = "train" if policy in ("train", "sync") else policy
    backbone, head = build_resnet("resnet18", str(weights), norm, freeze_at=2)
    model = nn.Sequential(backbone, head, nn.Linear(head.out_channels, 5))
    torch.manual_seed(0)
    nn.init.normal_(model[2].weight, std=0.01)
    nn.init.zeros_(model[2].bias)
    if policy == "sync":
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is nn.BatchNorm2d:
                    new = GlobalBatchNorm2d(child.num_features, child.eps)
                    new.load_state_dict(child.state_dict())
                    setattr(parent, name, new)
    return model


def _claim2_worker(
    rank: int, world: int, weights: str, policies: tuple[str, ...], batch: int, steps: int, port: int, out: str
):
    """Train each policy's model for ``steps`` steps in this process (rank of ``world``); rank 0 saves the weights.

    One process group serves every policy, so the 2-process run is spawned once (process start-up is most
    of its cost on CPU).
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    train, _ = digits(range(5, 10))
    per_rank = batch // world
    for policy in policies:
        model = _claim2_model(Path(weights), policy)
        model.train()
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model, broadcast_buffers=policy != "frozen")
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        for step in range(steps):
            xb = train.tensors[0][step * batch : (step + 1) * batch][rank * per_rank : (rank + 1) * per_rank]
            yb = train.tensors[1][step * batch : (step + 1) * batch][rank * per_rank : (rank + 1) * per_rank]
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if rank == 0:
            module = model.module if world > 1 else model
            trained = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
            torch.save(trained, Path(out) / f"claim2_{policy}_{world}.pt")
    if world > 1:
        dist.destroy_process_group()


def ddp_vs_single(worker, args: tuple, port: int, out: Path, prefix: str, policies, start_of) -> list[dict]:
    """Run ``worker`` in one process and in two (gloo), then compare the trainable weights it saved per policy.

    ``worker(rank, world, *args, port, out)`` trains each policy and, on rank 0, saves its trainable
    weights to ``out/<prefix><policy>_<world>.pt``; ``start_of(policy)`` gives the starting weights, so
    the difference can be read against the size of the update.
    """
    for world in (1, 2):
        full = (world, *args, port + world, str(out))
        if world == 1:
            worker(0, *full)
        else:
            mp.spawn(worker, args=full, nprocs=2)
    rows = []
    for policy in policies:
        one = torch.load(out / f"{prefix}{policy}_1.pt", weights_only=True)
        two = torch.load(out / f"{prefix}{policy}_2.pt", weights_only=True)
        diff = max((one[k] - two[k]).abs().max().item() for k in one)
        start = start_of(policy)  # built once per policy (rebuilding it per tensor took 20 s)
        change = max((one[k] - start[k]).abs().max().item() for k in one if k in start)
        rows.append({"policy": policy, "max_abs_diff": diff, "max_abs_update": change})
        print(f"claim 2 {policy}: max |w_ddp - w_single| = {diff:.3g} (largest weight update {change:.3g})", flush=True)
    return rows


def claim2(weights: Path, out: Path, batch: int, steps: int) -> list[dict]:
    policies = ("frozen", "train", "sync")
    return ddp_vs_single(
        _claim2_worker,
        (str(weights), policies, batch, steps),
        29700,
        out,
        "claim2_",
        policies,
        lambda policy: _claim2_model(weights, policy).state_dict(),
    )


# ---- reporting ----------------------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "study_results")
    parser.add_argument("--quick", action="store_true", help="reduced version for tests")
    parser.add_argument(
        "--task",
        choices=["classification", "detection"],
        default="classification",
        help="detection: the claims on the C4 detector (scripts/study_detection.py)",
    )
    args = parser.parse_args(argv)
    global MAX_BATCHES
    MAX_BATCHES = 60 if args.quick else 1.0
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.task == "detection":
        import study_detection

        started = time.time()
        result = study_detection.run(args, pretrain(args.out, 1 if args.quick else 6, classes=range(10)))
        result["seconds"] = time.time() - started
        print(study_detection.write_report(result, args.out))
        print(f"wrote {args.out}/ in {result['seconds']:.0f} s")
        return
    batches = (2,) if args.quick else (2, 4, 8, 32)  # quick keeps batch 2, where claim 1 shows
    seeds = (0,) if args.quick else (0, 1, 2)
    epochs = 1 if args.quick else 3
    started = time.time()
    weights = pretrain(args.out, 1 if args.quick else 6)
    results: dict = {"batches": batches, "seeds": seeds, "epochs": epochs}

    claim1 = {p: {b: [finetune(weights, p, b, s, epochs) for s in seeds] for b in batches} for p in POLICIES}
    results["claim1"] = claim1
    print("claim 1 done", {p: {b: statistics.mean(v) for b, v in r.items()} for p, r in claim1.items()}, flush=True)

    results["claim2"] = claim2(weights, args.out, batch=8 if args.quick else 16, steps=2 if args.quick else 5)

    c3_batch = 32 if args.quick else 8
    claim3 = {
        "frozen, source statistics": [finetune(weights, "frozen", c3_batch, s, epochs, invert=True) for s in seeds],
        "frozen + calibrate_bn (20 batches)": [
            finetune(weights, "frozen", c3_batch, s, epochs, invert=True, calibrate=20) for s in seeds
        ],
    }
    if not args.quick:  # the quick run keeps the comparison the claim is about
        claim3["eval (stats frozen, affine trains)"] = [
            finetune(weights, "eval", c3_batch, s, epochs, invert=True) for s in seeds
        ]
        claim3["train (plain BN)"] = [finetune(weights, "train", c3_batch, s, epochs, invert=True) for s in seeds]
    results["claim3"] = claim3
    results["seconds"] = time.time() - started

    lines = [
        "## Claim 1: target val accuracy (digits 5-9), mean ± std over seeds " + str(list(seeds)),
        "",
        "| per-device batch | " + " | ".join(POLICIES) + " |",
        "| ---: |" + " ---: |" * len(POLICIES),
    ]
    lines += [f"| {b} | " + " | ".join(mean_std(claim1[p][b]) for p in POLICIES) + " |" for b in batches]
    (args.out / "claim1.md").write_text("\n".join(lines) + "\n")
    c2 = [
        "## Claim 2: 2-process DDP (B/2 per rank) vs 1 process (B), trainable weights after the same steps",
        "",
        "| BN policy | max abs difference | largest weight update |",
        "| --- | ---: | ---: |",
    ]
    c2 += [f"| {r['policy']} | {r['max_abs_diff']:.3g} | {r['max_abs_update']:.3g} |" for r in results["claim2"]]
    (args.out / "claim2.md").write_text("\n".join(c2) + "\n")
    c3 = [
        f"## Claim 3: target far from source (inverted digits 5-9), batch {c3_batch}, mean ± std",
        "",
        "| policy | val accuracy |",
        "| --- | ---: |",
    ]
    c3 += [f"| {k} | {mean_std(v)} |" for k, v in claim3.items()]
    (args.out / "claim3.md").write_text("\n".join(c3) + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for p in POLICIES:
            means = [statistics.mean(claim1[p][b]) for b in batches]
            stds = [statistics.stdev(claim1[p][b]) if len(seeds) > 1 else 0.0 for b in batches]
            ax.errorbar(batches, means, yerr=stds, marker="o", capsize=3, label=f"norm={p}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("per-device batch size")
        ax.set_ylabel("target val accuracy")
        ax.set_title("Fine-tuning ResNet-18 (digits 0-4 -> 5-9)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "claim1.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    print("\n".join(["", *lines, "", *c2, "", *c3]))
    print(f"\nwrote {args.out}/ in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
