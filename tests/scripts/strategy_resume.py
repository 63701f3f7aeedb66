"""A demo config on 2 CPU ranks under DeepSpeed ZeRO (or DDP, FSDP2), checkpointing every K steps, optionally resumed.

Run by tests/test_sharded_resume.py. usage: python tests/scripts/strategy_resume.py STAGE CONFIG OUT_DIR STEPS EVERY [CKPT]
(STAGE: 2, 3, ddp, fsdp2, or fsdp2_bf16: FSDP2 with bf16 compute and activation checkpointing). Writes OUT_DIR/losses_rank{R}.json: per step, each network's loss on that rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from memflow_train.cli import MemflowCLI  # noqa: E402


def main(stage: str, config: str, out_dir: str, steps: str, every: str, ckpt: str | None = None) -> None:
    out = Path(out_dir)
    strategy = {
        "ddp": ["--trainer.strategy=ddp_find_unused_parameters_true"],
        "fsdp2": [
            "--trainer.strategy=memflow_train.strategies.MemflowFSDP2Strategy",
            "--trainer.strategy.mixed_precision=false",
        ],
        "fsdp2_bf16": [  # bf16 compute and activation checkpointing
            "--trainer.strategy=memflow_train.strategies.MemflowFSDP2Strategy",
            "--trainer.strategy.mixed_precision=true",
            "--model.init_args.gradient_checkpointing=true",
        ],
    }.get(
        stage,
        ["--trainer.strategy=memflow_train.strategies.MemflowDeepSpeedStrategy", f"--trainer.strategy.stage={stage}"],
    )
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(out / "ckpt"), "every_n_train_steps": int(every), "save_top_k": -1},
    }
    cli = MemflowCLI(
        args=[
            "--config", config, "--trainer.accelerator=cpu", "--trainer.devices=2", *strategy,
            f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={out}", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.callbacks=[{json.dumps(checkpoint)}]",
        ],
        run=False,
    )  # fmt: skip
    losses: list[dict] = []
    if hasattr(cli.model, "update_networks"):  # the DMD methods: each network's loss
        update = cli.model.update_networks

        def update_networks(step_losses, step):  # noqa: ANN001
            losses.append({"step": step, **{k: float(v.detach()) for k, v in step_losses.items()}})
            return update(step_losses, step)

        cli.model.update_networks = update_networks
    else:  # flow matching: the step's loss
        training_step = cli.model.training_step

        def record_step(batch, batch_idx):  # noqa: ANN001
            loss = training_step(batch, batch_idx)
            losses.append({"step": cli.trainer.global_step, "loss": None if loss is None else float(loss.detach())})
            return loss

        cli.model.training_step = record_step
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    name = "losses_resumed" if ckpt else "losses"
    (out / f"{name}_rank{cli.trainer.global_rank}.json").write_text(json.dumps(losses))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
