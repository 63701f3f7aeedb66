"""A 2-process CPU DeepSpeed ZeRO-3 demo fit through every collective path: long-video evaluation with
narratives that do not split evenly, validation, and a checkpoint. Under ZeRO-3 every forward gathers
parameters from both ranks, so a rank running fewer forwards than the other would hang.

Run by tests/test_eval_callback.py (with a timeout); Lightning's launcher starts rank 1 by running this
script again.
usage: python tests/scripts/zero3_collectives.py CONFIG OUT_DIR
writes OUT_DIR/rank{R}.json: the final step, the narratives of rank 0's last report, validation batches seen.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: data, callbacks

from callbacks.long_video import LongVideoEvaluation  # noqa: E402
from memflow_train.cli import MemflowCLI  # noqa: E402


def main(config: str, out_dir: str) -> None:
    out = Path(out_dir)
    cli = MemflowCLI(
        args=[
            "--config", config,
            "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_steps=4",
            "--trainer.strategy=memflow_train.strategies.MemflowDeepSpeedStrategy",
            "--trainer.strategy.init_args.stage=3",
            "--trainer.val_check_interval=2", "--trainer.limit_val_batches=3", "--trainer.num_sanity_val_steps=0",
        ],
        run=False,
    )  # fmt: skip
    validation_batches = []
    step = cli.model.validation_step

    def counting(batch, batch_idx):  # noqa: ANN001, ANN202
        validation_batches.append(list(batch.keys))
        return step(batch, batch_idx)

    cli.model.validation_step = counting
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, LongVideoEvaluation))
    report = evaluation.last_report
    result = {
        "global_step": cli.trainer.global_step,
        "report_narratives": None if report is None else [n["name"] for n in report["narratives"]],
        "validation_batches": validation_batches,
    }
    (out / f"rank{cli.trainer.global_rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
