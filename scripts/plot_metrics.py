"""Plot a run's train loss and validation metric per epoch, from its CSV or its TensorBoard logs.

    python scripts/plot_metrics.py runs/quickstart                     # the newest logs of a run directory
    python scripts/plot_metrics.py runs/quickstart/csv/version_0/metrics.csv [-o curves.png]
    python scripts/plot_metrics.py runs/quickstart/tensorboard/version_0  # no CSV logger needed

The validation metric is ``val/acc`` (classifier) or ``val/map`` (detector), whichever was logged, or
``--val-metric``. W&B, MLflow and other loggers have their own dashboards: plot there.
Needs matplotlib (``pip install -e ".[plot]"``); TensorBoard logs need ``tensorboard`` installed.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

VAL_METRICS = ("val/acc", "val/map")


def find_logs(path: Path) -> Path:
    """The metrics.csv or TensorBoard folder to read: ``path`` itself, or the newest training run's under it."""
    if path.is_file():
        return path.parent if "tfevents" in path.name else path
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    if any(path.glob("events.out.tfevents*")):
        return path
    found = [*path.rglob("metrics.csv"), *(p.parent for p in path.rglob("events.out.tfevents*"))]
    if not found:
        raise FileNotFoundError(
            f"{path} holds no metrics.csv and no TensorBoard events file; pass the run directory "
            "(trainer.default_root_dir) or a file printed at the end of fit."
        )
    # the newest training run: `validate`/`test` write log versions of their own, without training rows
    trained = [p for p in found if p.suffix == ".csv" and _has_training_rows(p)]
    return max(trained or found, key=lambda p: (p.stat().st_mtime, p.suffix == ".csv"))  # newest; CSV when both


def _has_training_rows(csv_path: Path) -> bool:
    """Whether a metrics.csv logged training (a ``train/`` column), not only a validate or test run."""
    with csv_path.open() as f:
        header = f.readline()
    return any(column.startswith("train/") for column in header.strip().split(","))


def read_rows(logs: Path) -> list[dict[str, float]]:
    """Rows of ``{"epoch", "step", metric: value}``: one per logging call (CSV) or per step (TensorBoard)."""
    if logs.suffix == ".csv":
        with open(logs, newline="") as f:
            return [{k: float(v) for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(f)]
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        sys.exit(f"error: reading TensorBoard logs ({logs}) needs tensorboard: pip install tensorboard.")
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    events.Reload()
    # One row per step: Lightning logs a step's metrics with the epoch they belong to (a train row and the
    # validation row that ends the epoch can share a step, and the epoch). A step written twice (a resumed
    # run redoing steps its killed predecessor logged) keeps the later value, as the resumed CSV does.
    rows: dict[int, dict[str, float]] = defaultdict(dict)
    for tag in events.Tags()["scalars"]:
        for e in sorted(events.Scalars(tag), key=lambda e: e.wall_time):
            rows[e.step].update({"step": float(e.step), tag: e.value})
    return [rows[step] for step in sorted(rows)]


def read_epochs(rows: list[dict[str, float]], val_metric: str | None = None) -> tuple[dict, dict, str | None]:
    """Mean train loss per epoch, last validation metric per epoch, and that metric's name."""
    if val_metric is None:
        val_metric = next((m for m in VAL_METRICS if any(m in r for r in rows)), None)
    losses: dict[int, list[float]] = defaultdict(list)
    val: dict[int, float] = {}
    for row in rows:
        if "epoch" not in row:
            continue
        epoch = int(row["epoch"])
        if "train/loss" in row:
            losses[epoch].append(row["train/loss"])
        if val_metric in row:
            val[epoch] = row[val_metric]
    return {e: sum(v) / len(v) for e, v in losses.items()}, val, val_metric


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", type=Path, help="a run directory, a metrics.csv, or a TensorBoard version folder")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: curves.png beside the logs)")
    parser.add_argument("--val-metric", help=f"validation metric to plot (default: the first logged of {VAL_METRICS})")
    args = parser.parse_args(argv)
    if not args.logs.exists():
        sys.exit(
            f"error: {args.logs} does not exist; pass the run directory or the metrics file printed at the end of fit."
        )
    try:
        logs = find_logs(args.logs)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    loss, val, metric = read_epochs(read_rows(logs), args.val_metric)
    if not loss and not val:
        sys.exit(f"error: {logs} has no train/loss or {args.val_metric or ' / '.join(VAL_METRICS)} per epoch.")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        sys.exit('error: matplotlib is not installed; run pip install -e ".[plot]".')
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(sorted(loss), [loss[e] for e in sorted(loss)], "o-", color="tab:blue", label="train loss (epoch mean)")
    left.set_xlabel("epoch")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("train loss", color="tab:blue")
    right = left.twinx()
    right.plot(sorted(val), [val[e] for e in sorted(val)], "s-", color="tab:green", label=metric)
    right.set_ylabel(str(metric), color="tab:green")
    right.set_ylim(0, 1)
    fig.suptitle(str(logs))
    fig.tight_layout()
    output = args.output or (logs if logs.is_dir() else logs.parent) / "curves.png"
    fig.savefig(output, dpi=120)
    print(f"wrote {output} ({logs.name}: {len(loss)} epochs of train/loss, {len(val)} of {metric})")


if __name__ == "__main__":
    main()
