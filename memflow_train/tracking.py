"""Experiment tracking glue: the full CLI config in the logger, W&B offline without a key, same run on resume."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from memflow_train.models.trust import safe_load

RUN_ID_KEY = "wandb_run_id"


def default_wandb_offline() -> None:
    """Without an API key (env or ~/.netrc), W&B runs offline instead of prompting for a login."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        logged_in = False
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"


class LoggedConfigCallback(SaveConfigCallback):
    """Saves config.yaml in the log dir (Lightning's behaviour) and logs the whole config to every logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.config.clone()
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": _plain(config.as_dict())})


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


class WandbRunIdCallback(Callback):
    """Records the W&B run id in checkpoints, so that a resumed run logs into the same run."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint[RUN_ID_KEY] = logger.version


def checkpoint_run_id(path: str | Path) -> str | None:
    """The W&B run id a checkpoint recorded (a Lightning .ckpt file or a DeepSpeed directory)."""
    path = Path(path)
    if path.is_dir():  # DeepSpeed: the client state lives in rank 0's model-states file
        files = sorted(path.glob("*/mp_rank_00_model_states.pt")) + sorted(
            path.glob("*/zero_pp_rank_0_*model_states.pt")
        )
        if not files:
            return None
        path = files[0]
    if not path.is_file():
        return None
    return safe_load(path, mmap=True, deepspeed=path.name.endswith("model_states.pt")).get(RUN_ID_KEY)


def resume_wandb_run(trainer: Trainer, ckpt_path: str | Path | None) -> None:
    """Point the (not yet started) W&B run at the run id recorded in the checkpoint being resumed."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers or ckpt_path is None:
        return
    run_id = checkpoint_run_id(ckpt_path)
    if run_id is None:
        return
    for logger in loggers:
        if logger._experiment is None:  # WandbLogger starts its run lazily, from _wandb_init
            logger._wandb_init.update(id=run_id, resume="allow")
            logger._id = run_id
