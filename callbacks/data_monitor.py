"""Logs the data pipeline's counters so that skipped bad samples show up next to the loss."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from data.datamodule import ShardDataModule

COUNTERS = ("skipped_samples", "consumed_samples")


class DataMonitor(L.Callback):
    """Logs data/skipped_samples (bad training samples skipped) and data/consumed_samples (training samples
    used), summed over ranks and over resumed runs, and data/val_skipped_samples per validation.

    Each rank's DataModule counts its own samples, but a checkpoint holds rank 0's DataModule state only, so
    the totals over ranks are kept here: this callback's state is the last logged totals, and after a resume
    it adds what every rank has counted since."""

    def __init__(self) -> None:
        self._totals = dict.fromkeys(COUNTERS, 0.0)  # over ranks, at the last log
        self._offset = dict(self._totals)  # the totals a resumed run starts from
        self._start: dict[str, int] = {}  # this rank's counters when this run started

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.datamodule, ShardDataModule):
            self._start = {name: getattr(trainer.datamodule, name) for name in COUNTERS}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, ShardDataModule):
            return
        since_start = torch.tensor([getattr(dm, n) - self._start[n] for n in COUNTERS], dtype=torch.float64)
        summed = trainer.strategy.reduce(since_start.to(pl_module.device), reduce_op="sum")
        for name, value in zip(COUNTERS, summed.tolist(), strict=True):
            self._totals[name] = self._offset[name] + value
            pl_module.log(f"data/{name}", self._totals[name], on_step=True, on_epoch=False)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.datamodule, ShardDataModule):
            trainer.datamodule.val_skipped_samples = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """data/val_skipped_samples: bad validation samples skipped in this validation, summed over ranks."""
        dm = trainer.datamodule
        if isinstance(dm, ShardDataModule) and dm.val_urls is not None:
            count = torch.tensor(float(dm.val_skipped_samples), dtype=torch.float64, device=pl_module.device)
            pl_module.log("data/val_skipped_samples", trainer.strategy.reduce(count, reduce_op="sum"), on_epoch=True)

    def state_dict(self) -> dict[str, float]:
        return dict(self._totals)

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._totals = dict(state_dict)
        self._offset = dict(state_dict)
