"""Train the demo DMD for N steps on fixed global batches: one process, or DDP, DeepSpeed ZeRO-2/3 or FSDP2 on 2 CPU ranks.

Run by tests/test_sharded_training.py. Every rank trains on its slice of the same global batches (rank r: sample r of
each 2-sample batch); the single process trains on the whole batches. Per-sample noise makes the draws equal.
usage: python tests/scripts/strategy_equivalence.py MODE BATCHES_FILE OUT_FILE STEPS (MODE: single, ddp, zero2,
zero3, fsdp2)
writes OUT_FILE (rank 0): the generator's and the critic's full state dicts, the generator's EMA and the networks'
last gradient norms (before clipping) after training,
and a checkpoint after the last step under ckpt_MODE/ beside it (a file, or a DeepSpeed directory).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from memflow_train.cli import MemflowCLI  # noqa: E402
from memflow_train.methods.optim import find_multi_network_optimizer  # noqa: E402

STRATEGY = {
    "single": ["--trainer.devices=1"],
    "ddp": ["--trainer.devices=2", "--trainer.strategy=ddp_find_unused_parameters_true"],
    "zero2": ["--trainer.devices=2", "--trainer.strategy=memflow_train.strategies.MemflowDeepSpeedStrategy", "--trainer.strategy.stage=2"],
    "zero3": ["--trainer.devices=2", "--trainer.strategy=memflow_train.strategies.MemflowDeepSpeedStrategy", "--trainer.strategy.stage=3"],
    "fsdp2": ["--trainer.devices=2", "--trainer.strategy=memflow_train.strategies.MemflowFSDP2Strategy", "--trainer.strategy.mixed_precision=false"],
}  # fmt: skip


def rank_slice(batch: dict, rank: int, world: int) -> SimpleNamespace:
    per = len(batch["prompts"]) // world
    part = slice(rank * per, (rank + 1) * per)
    return SimpleNamespace(**{k: v[part] if v is not None else None for k, v in batch.items()})


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitions: gather to read them
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: full_tensor(v) for k, v in module.state_dict().items()}


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A whole tensor (FSDP2 parameters are DTensor shards)."""
    return (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()


def main(mode: str, batches_file: str, out_file: str, steps: str) -> None:
    world = 1 if mode == "single" else 2
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(Path(out_file).parent / f"ckpt_{mode}"), "every_n_train_steps": int(steps)},
    }
    batches = [rank_slice(b, rank, world) for b in torch.load(batches_file, weights_only=True)]
    cli = MemflowCLI(
        args=[
            "--config", str(REPO / "configs" / "demo.yaml"), "--trainer.accelerator=cpu", *STRATEGY[mode],
            f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={Path(out_file).parent}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.callbacks=[{json.dumps(checkpoint)}]", "--trainer.use_distributed_sampler=false",
            "--trainer.limit_val_batches=0",
            "--model.init_args.gen_update_ratio=2", "--model.init_args.ema_start_step=2",
            # clipping at every step (the gradient norms are about 0.1-1 here): each network must be clipped by
            # the norm of its whole gradient, however the strategy splits it
            "--model.init_args.generator_optimizer.grad_clip=0.01", "--model.init_args.critic_optimizer.grad_clip=0.01",
        ],
        run=False,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    cli.trainer.fit(cli.model, train_dataloaders=loader)
    states = {
        "generator": full_state(cli.model.generator),
        "critic": full_state(cli.model.critic),
        "generator_ema": {k: full_tensor(v) for k, v in cli.model.ema.shadow.items()},
        "grad_norms": {k: float(v) for k, v in find_multi_network_optimizer(cli.model.optimizers()).grad_norms.items()},
    }
    if cli.trainer.global_rank == 0:
        torch.save(states, out_file)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
