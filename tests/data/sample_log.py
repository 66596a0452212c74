"""A callback for the subprocess tests: each training step's sample indices, one JSON line per step, a file per rank."""

import json
import os
import time

from lightning.pytorch.callbacks import Callback


class SampleLog(Callback):
    def __init__(self, path: str, delay: float = 0.0) -> None:
        self.path, self.delay = path, delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "index": batch[2].tolist()}
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        time.sleep(self.delay)  # paces the run so that a test can kill it mid-epoch


def read(path, rank=0):
    file = f"{path}.rank{rank}"
    return [json.loads(line) for line in open(file)] if os.path.exists(file) else []
