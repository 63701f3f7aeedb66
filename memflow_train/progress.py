"""Step-based training progress: step N of max_steps, rate, ETA and the losses; plain lines when not a TTY.

Lightning's bars count epochs (a step-bounded run shows "Epoch 0/-2", a resumed one "520/19") and write
nothing until the end when stdout is not a terminal (SLURM, nohup). This bar counts optimizer steps from
the resumed step to max_steps (tqdm on a terminal, sized to it), and without a terminal prints one line
every `interval` seconds and at the end. It observes only.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm


def _short(value: Any) -> str:
    v = float(value)
    return f"{v:.4g}" if math.isfinite(v) else str(v)


class StepProgressBar(ProgressBar):
    def __init__(self, interval: float = 30.0, tty: bool | None = None) -> None:
        """interval: seconds between plain progress lines without a terminal; tty: force the mode
        (default: whether stderr is a terminal)."""
        super().__init__()
        self.interval = interval
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._enabled = True
        self._bar: tqdm | None = None
        self._start: tuple[float, int] = (0.0, 0)  # (time, step) when training started
        self._mark: tuple[float, int] = (0.0, 0)  # (time, step) of the last plain line

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _total(self, trainer: L.Trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def _postfix(self, trainer: L.Trainer, module: L.LightningModule) -> str:
        metrics = self.get_metrics(trainer, module)
        metrics.pop("v_num", None)
        return " ".join(f"{k} {_short(v)}" for k, v in metrics.items() if isinstance(v, int | float))

    def line(self, trainer: L.Trainer, module: L.LightningModule, since: tuple[float, int] | None = None) -> str:
        """One plain progress line: step, percent, rate, ETA, losses. The rate (and the ETA from it) is over
        the steps since `since` (time, step), default the start of this run: the first steps (data
        building, warm-up) do not inflate every later ETA."""
        step, total = trainer.global_step, self._total(trainer)
        t0, s0 = since if since is not None else self._start
        rate = (step - s0) / max(time.perf_counter() - t0, 1e-9)
        parts = [f"step {step}" + (f"/{total} ({100 * step / total:.0f}%)" if total else "")]
        parts.append(f"{rate:.2f} steps/s")
        if total and rate > 0:
            parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime((total - step) / rate))}")
        postfix = self._postfix(trainer, module)
        return " | ".join(parts + ([postfix] if postfix else []))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        self._start = self._mark = (time.perf_counter(), trainer.global_step)
        if self.tty:
            self._bar = tqdm(
                total=self._total(trainer), initial=trainer.global_step, unit="step", desc="train",
                dynamic_ncols=True, file=sys.stderr, smoothing=0.1,
            )  # fmt: skip

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        if self._bar is not None:
            self._bar.update(trainer.global_step - self._bar.n)
            self._bar.set_postfix_str(self._postfix(trainer, pl_module), refresh=False)
        elif time.perf_counter() - self._mark[0] >= self.interval:
            print(self.line(trainer, pl_module, since=self._mark), file=sys.stderr, flush=True)
            self._mark = (time.perf_counter(), trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        print(self.line(trainer, pl_module), file=sys.stderr, flush=True)
