"""Callbacks that Ray calls as results arrive; they feed the results store.

They live here, on the top floor, and are handed down to ``trainers`` as plain callback
objects, so ``trainers`` never imports ``cluster``.
"""

from __future__ import annotations

import time

from ray.train import UserCallback

from cluster.store import ResultsStore
from cluster.tables import HISTORY_SCHEMA, EpochLog
from trainers.position import is_restored_report


def format_epoch(metrics: dict, prefix: str = "") -> str:
    return (
        f"{prefix}epoch {metrics['epoch']:>3}  train_loss {metrics['train_loss']:.4f}  "
        f"val_loss {metrics['val_loss']:.4f}  val_acc {metrics['val_accuracy']:.4f}  "
        f"val_f1 {metrics['val_f1']:.4f}  lr {metrics['lr']:.3g}  "
        f"{metrics['epoch_seconds']:.1f}s  {metrics['images_per_second']:.0f} img/s"
    )


class TrainHistoryCallback(UserCallback):
    """Writes ``history.parquet`` and ``progress.json`` (the last epoch's full report, with
    its stop reason) after every epoch, and prints the epoch's line.

    Runs in Ray Train's controller process. A run resumed after a crash re-reports the
    epochs after its last checkpoint; their rows replace the earlier ones. It first repeats
    the checkpoint's own epoch (``trainers.position.is_restored_report``), which a driver
    killed at the wrong moment never recorded; that row is written, not printed again.
    """

    takes_restored_reports = True

    def __init__(self, storage: str, name: str, prefix: str = ""):
        self.storage, self.name, self.prefix = storage, name, prefix  # prefix: "fold 2  " (--cv)
        self._log: EpochLog | None = None
        self._store: ResultsStore | None = None

    def after_report(self, run_context, metrics, checkpoint):
        if self._store is None:
            self._store = ResultsStore(self.storage, self.name)
            self._log = EpochLog(HISTORY_SCHEMA, self._store.read_table("history.parquet"))
        m = metrics[0]
        self._log.add(m)
        self._store.write_table("history.parquet", self._log.table())
        self._store.write_json("progress.json", {**m, "updated_at": time.time()})
        if not is_restored_report(m):
            print(format_epoch(m, self.prefix), flush=True)
