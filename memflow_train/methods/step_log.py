"""Training scalars that belong to the step they are logged at.

Lightning's loggers write, at every logged step, the last value of every metric ever logged, so
a value a step did not produce (the generator's loss on a critic-only step, anything on a skipped
update) would be written again under later steps. A method puts the step's values here and
flushes once per step: every key seen so far is logged, NaN when this step has no value. The
progress bar shows each loss's latest finite value instead (it is a display, not a log).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule


class StepLog:
    def __init__(self, progress_bar: tuple[str, ...] = ()) -> None:
        """progress_bar: keys also shown on the progress bar (their latest finite value)."""
        self.keys: list[str] = []
        self.values: dict[str, float | torch.Tensor] = {}
        self.progress_bar = progress_bar
        self._shown: dict[str, float] = {}

    def put(self, key: str, value: float | torch.Tensor) -> None:
        if key not in self.keys:
            self.keys.append(key)
        self.values[key] = value.detach().float() if isinstance(value, torch.Tensor) else float(value)

    def flush(self, module: LightningModule, batch_size: int | None = None) -> None:
        for key in self.keys:
            value = self.values.get(key, math.nan)
            module.log(key, value, batch_size=batch_size)
            if key in self.progress_bar:
                finite = float(value)
                if math.isfinite(finite):
                    self._shown[key] = finite
                if key in self._shown:
                    module.log(key.split("/")[-1], self._shown[key], prog_bar=True, logger=False, batch_size=batch_size)
        self.values = {}
