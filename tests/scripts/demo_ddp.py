"""A 2-process CPU DDP (gloo) run of a demo config through the CLI; records what every rank drew.

Run by tests/test_demo.py; Lightning's launcher starts rank 1 by running this script again.
usage: python tests/scripts/demo_ddp.py CONFIG OUT_DIR MAX_STEPS
writes OUT_DIR/rank{R}.json: per step the exit steps, the sequence's switch frame and the losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: data, callbacks

from memflow_train.cli import MemflowCLI  # noqa: E402


class DrawRecorder(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        sequence = getattr(pl_module, "sequence", None)
        self.steps.append(
            {
                "step": trainer.global_step,
                "exit_steps": list(pl_module.last_exit_steps),
                "switch_frame": sequence.switch_frame if sequence is not None else None,
                "keys": list(batch.keys),
                "critic_loss": float(trainer.callback_metrics["train/critic_loss"]),
            }
        )


def main(config: str, out_dir: str, max_steps: str) -> None:
    out = Path(out_dir)
    cli = MemflowCLI(
        args=[
            "--config", config,
            "--trainer.devices=2", "--trainer.strategy=ddp_find_unused_parameters_true", "--trainer.accelerator=cpu",
            f"--trainer.max_steps={max_steps}", f"--trainer.default_root_dir={out}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
        ],
        run=False,
    )  # fmt: skip
    recorder = DrawRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (out / f"rank{cli.trainer.global_rank}.json").write_text(json.dumps(recorder.steps))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
