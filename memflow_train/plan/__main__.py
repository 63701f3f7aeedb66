"""python -m memflow_train.plan --config CONFIG [--config STRATEGY] --gpus N [--gpu-memory 80GiB] [--json PATH]
[--key value ...]: the per-GPU memory of a training config's step and whether it fits (README, Memory planner).

Every --config composes as with `train.py fit`; other --key value pairs are passed on as config overrides
(e.g. --model.init_args.num_frames 12). Nothing is loaded from the weights paths and no GPU is needed.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from memflow_train.checks import number, whole
from memflow_train.errors import run_command
from memflow_train.plan.report import parse_size

if TYPE_CHECKING:
    from memflow_train.plan.report import Plan


def _whole(name: str, text: str | None, low: int = 1) -> int | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a whole number >= {low}, got {text!r}") from None
    return whole(name, value, low=low)


def main(argv: list[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(
        prog="python -m memflow_train.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", action="append", required=True, help="a config file (repeat to compose)")
    p.add_argument("--gpus", default="1", help="GPUs sharing the run (data parallel ranks), default 1")
    p.add_argument("--gpu-memory", default=None, help="memory of one GPU, e.g. 80GiB, 80GB, 81920MiB: gives a verdict")
    p.add_argument("--headroom", default="0.1", help="fraction of --gpu-memory kept free (CUDA context, NCCL, "
                   "allocator fragmentation), default 0.1")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the plan here")
    p.add_argument("--batch-size", default=None, help="samples per GPU (default: the data module's)")
    p.add_argument("--text-len", default=None, help="prompt tokens (default: the data module's)")
    p.add_argument("--latent-size", nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                   help="latent frame size, when the data sets it (flow-matching fine-tuning)")  # fmt: skip
    p.add_argument("--latent-frames", default=None, help="latent frames per sample (default: the data module's)")
    args, overrides = p.parse_known_args(argv)
    gpus = _whole("--gpus", args.gpus)
    memory = parse_size(args.gpu_memory) if args.gpu_memory is not None else None
    try:
        headroom = number("--headroom", float(args.headroom), low=0, high=1, high_open=True)
    except ValueError:
        raise ValueError(f"--headroom must be a fraction in [0, 1), got {args.headroom!r}") from None
    size = tuple(_whole("--latent-size", v) for v in args.latent_size) if args.latent_size else None
    data = {
        "batch_size": _whole("--batch-size", args.batch_size),
        "text_len": _whole("--text-len", args.text_len),
        "latent_size": size,
        "num_frames": _whole("--latent-frames", args.latent_frames),
    }
    from memflow_train.plan.config import read_config  # torch and Lightning load once the flags are checked
    from memflow_train.plan.recipe import plan_config

    setup = read_config(args.config, overrides, data)
    plan = plan_config(setup, gpus, memory, headroom, data["num_frames"])
    print(plan.to_markdown())
    if args.json:
        plan.write_json(args.json)
    return plan


if __name__ == "__main__":
    run_command(main)
