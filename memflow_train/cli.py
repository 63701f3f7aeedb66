"""The command line: LightningCLI in subclass mode, so YAML picks model and data by class_path."""

from __future__ import annotations

import os
import warnings
from typing import Any

# Lightning 2.6 calls a jsonargparse API deprecated in 4.49; users cannot act on that warning.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from memflow_train.tracking import LoggedConfigCallback, WandbRunIdCallback, default_wandb_offline, resume_wandb_run

# Our DMD modules step their optimizer inside training_step; a checkpoint after step N holds the
# state after N updates, which is what resuming needs. Lightning warns about that on every save.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


class MemflowCLI(LightningCLI):
    """`python train.py {fit,validate,test,predict} --config configs/X.yaml [--config configs/strategies/Y.yaml]`.

    Besides LightningCLI: the whole config goes to the loggers, W&B runs offline without an API
    key, and a run resumed with --ckpt_path continues its W&B run.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        default_wandb_offline()
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", LoggedConfigCallback)
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def before_fit(self) -> None:
        self.trainer.callbacks.append(WandbRunIdCallback())
        resume_wandb_run(self.trainer, self.config["fit"].get("ckpt_path"))
