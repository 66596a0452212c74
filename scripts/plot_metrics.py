"""Plot a run's metrics.csv (Lightning CSVLogger) as train loss and val accuracy per epoch.

    python scripts/plot_metrics.py runs/quickstart/csv/version_0/metrics.csv [-o curves.png]

Needs matplotlib (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path


def read_epochs(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Mean train loss and last val accuracy per epoch."""
    losses: dict[int, list[float]] = defaultdict(list)
    accuracy: dict[int, float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            if row.get("train/loss"):
                losses[epoch].append(float(row["train/loss"]))
            if row.get("val/acc"):
                accuracy[epoch] = float(row["val/acc"])
    return {e: sum(v) / len(v) for e, v in losses.items()}, accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="a metrics.csv written by Lightning's CSVLogger")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: next to metrics.csv)")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        sys.exit(f"error: {args.metrics} does not exist; pass the metrics.csv of a run (printed at the end of fit).")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('error: matplotlib is not installed; run pip install -e ".[plot]".')
    loss, accuracy = read_epochs(args.metrics)
    if not loss and not accuracy:
        sys.exit(f"error: {args.metrics} has no train/loss or val/acc rows; was it written by lightning-frozenbn fit?")
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(sorted(loss), [loss[e] for e in sorted(loss)], "o-", color="tab:blue", label="train loss (epoch mean)")
    left.set_xlabel("epoch")
    left.set_ylabel("train loss", color="tab:blue")
    right = left.twinx()
    right.plot(sorted(accuracy), [accuracy[e] for e in sorted(accuracy)], "s-", color="tab:green", label="val top-1")
    right.set_ylabel("val top-1 accuracy", color="tab:green")
    right.set_ylim(0, 1)
    fig.suptitle(str(args.metrics.parent))
    fig.tight_layout()
    output = args.output or args.metrics.with_name("curves.png")
    fig.savefig(output, dpi=120)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
