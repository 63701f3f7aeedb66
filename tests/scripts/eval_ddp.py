"""A 2-process CPU DDP (gloo) demo fit with LongVideoEvaluation; rank 1's first evaluation fails on purpose.

Run by tests/test_eval_callback.py; Lightning's launcher starts rank 1 by running this script again.
usage: python tests/scripts/eval_ddp.py CONFIG OUT_DIR
writes OUT_DIR/rank{R}.json: the rank's final step, its injected failures and the narratives of rank 0's report.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: data, callbacks

from callbacks.long_video import LongVideoEvaluation  # noqa: E402
from callbacks.long_video.protocol import Evaluator  # noqa: E402
from memflow_train.cli import MemflowCLI  # noqa: E402

injected = {"count": 0}


def _fail_once_on_rank_1() -> None:
    """Rank 1's first narrative raises: the other rank must neither hang nor log a partial evaluation."""
    original = Evaluator._one

    def one(self, *args, **kwargs):
        if injected["count"] == 0:
            injected["count"] += 1
            raise RuntimeError("injected failure on rank 1")
        return original(self, *args, **kwargs)

    Evaluator._one = one


def main(config: str, out_dir: str) -> None:
    out = Path(out_dir)
    if os.environ.get("LOCAL_RANK") == "1":
        _fail_once_on_rank_1()
    cli = MemflowCLI(
        args=[
            "--config", config,
            "--trainer.devices=2", "--trainer.strategy=ddp_find_unused_parameters_true", "--trainer.accelerator=cpu",
            "--trainer.max_steps=4",
        ],
        run=False,
    )  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, LongVideoEvaluation))
    report = evaluation.last_report
    result = {
        "global_step": cli.trainer.global_step,
        "injected_failures": injected["count"],
        "report_narratives": None if report is None else len(report["narratives"]),
    }
    (out / f"rank{cli.trainer.global_rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
