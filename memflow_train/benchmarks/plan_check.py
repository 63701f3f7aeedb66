"""The memory planner's estimate against the measured peak of the same training steps, config by config.

Each case is a config (+ overrides) read through the CLI as `train.py fit` reads it. Estimated: the planner's
per-GPU peak of the configured step (memflow_train.plan, traced on meta weights). Measured: the same module
built with real weights and trained by Lightning for the steps the planner traced plus one, on the planner's
batch shapes (random values), every step a generator step with the EMA running (gen_update_ratio 1,
ema_start_step 0: the planner's steady state from the second step on), with every tensor counted from before
the module is built: the peak of PeakTensorMemory (counted storages on CPU; torch.cuda.max_memory_allocated
on a GPU). Both sides: one device, the config's precision (the CPU cases are float32).

    python -m memflow_train.benchmarks.plan_check                      # every case, CPU
    python -m memflow_train.benchmarks.plan_check --cases tiny-dmd tiny-long --json check.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import torch

from memflow_train.benchmarks.tensor_memory import PeakTensorMemory
from memflow_train.errors import run_command
from memflow_train.plan.batch import synthetic_batch
from memflow_train.plan.config import PlanSetup, read_config
from memflow_train.plan.planner import plan_module
from memflow_train.plan.report import human
from memflow_train.plan.step import fit_on_batch
from memflow_train.plan.strategy import parse_strategy

WAN = "wan2.1-t2v-1.3b"


def _layout(*networks: str, blocks: int = 1) -> list[str]:
    """Overrides giving networks the Wan2.1-1.3B layout (dim 1536, 12 heads x 128, FFN 8960) with few blocks."""
    out = []
    for net in networks:
        out += [
            f"--model.init_args.{net}.preset",
            WAN,
            f"--model.init_args.{net}.config",
            json.dumps({"num_layers": blocks}),
        ]
    return out


# name -> (what, config files, CLI overrides, planner data flags)
CASES: dict[str, tuple[str, list[str], list[str], dict[str, Any]]] = {
    "tiny-dmd": ("stage 1, tiny preset, NAM + SMA", ["configs/demo.yaml"], [], {}),
    "tiny-dmd-ckpt": (
        "stage 1, tiny preset, gradient checkpointing",
        ["configs/demo.yaml"],
        ["--model.init_args.gradient_checkpointing", "true"],
        {},
    ),
    "tiny-long": ("stage 2, tiny preset, LoRA 4, prompt switch + recache", ["configs/demo_long.yaml"], [], {}),
    "tiny-finetune": (
        "flow matching, tiny preset, 12 latent frames",
        ["configs/demo_finetune.yaml"],
        [],
        {"latent_size": (4, 4), "num_frames": 12},
    ),
    "wan-dmd": (
        "stage 1, 1.3B layout x 1 block, 16x16 latents, 6 frames",
        ["configs/demo.yaml"],
        [
            *_layout("generator", "teacher"),
            "--model.init_args.latent_size",
            "[16, 16]",
            "--model.init_args.num_frames",
            "6",
        ],
        {},
    ),
    "wan-dmd-32": (
        "stage 1, 1.3B layout x 1 block, 32x32 latents (256 tokens a frame), 6 frames",
        ["configs/demo.yaml"],
        [
            *_layout("generator", "teacher"),
            "--model.init_args.latent_size",
            "[32, 32]",
            "--model.init_args.num_frames",
            "6",
        ],
        {},
    ),
    "wan-dmd-ckpt": (
        "stage 1, 1.3B layout x 1 block, 16x16 latents, 9 frames, checkpointing",
        ["configs/demo.yaml"],
        [
            *_layout("generator", "teacher"),
            "--model.init_args.latent_size",
            "[16, 16]",
            "--model.init_args.num_frames",
            "9",
            "--model.init_args.gradient_checkpointing",
            "true",
        ],
        {},
    ),
    "wan-long": (
        "stage 2, 1.3B layout x 1 block, 8x8 latents, LoRA 16",
        ["configs/demo_long.yaml"],
        [
            *_layout("generator", "teacher"),
            "--model.init_args.latent_size",
            "[8, 8]",
            "--model.init_args.generator_lora.rank",
            "16",
            "--model.init_args.critic_lora.rank",
            "16",
        ],
        {},
    ),
    "wan-finetune-ckpt": (
        "flow matching, 1.3B layout x 2 blocks, 16x16 latents, 6 frames, checkpointing",
        ["configs/demo_finetune.yaml"],
        [*_layout("model", blocks=2), "--model.init_args.gradient_checkpointing", "true"],
        {"latent_size": (16, 16), "num_frames": 6},
    ),
}


def estimate(setup: PlanSetup, device: str) -> tuple[int, int, float]:
    """(per-GPU bytes, training steps traced, seconds) of the configured step."""
    start = time.perf_counter()
    module = setup.build()
    batch = synthetic_batch(module, setup.data, setup.data.num_frames)
    strategy = parse_strategy(setup.strategy, 1)
    plan = plan_module(module, 1, strategy, precision=setup.precision, batch=batch, target=device)
    return plan.per_gpu_bytes, plan.variants[plan.chosen].steps, time.perf_counter() - start


def _random(batch: Any, seed: int = 0) -> Any:
    """The planner's batch with random floating values (a zero prompt is an edge case, not a sample)."""
    g = torch.Generator().manual_seed(seed)
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(batch, name, torch.randn(value.shape, generator=g).to(value.dtype))
    return batch


def measure(setup: PlanSetup, steps: int, device: str) -> tuple[int, float]:
    """(peak bytes, seconds) of steps + 1 real training steps (see the module doc)."""
    args = dict(setup.init_args)
    args.update({k: v for k, v in (("gen_update_ratio", 1), ("ema_start_step", 0)) if k in args})
    start = time.perf_counter()
    with PeakTensorMemory(device) as memory:
        torch.manual_seed(0)
        module = setup.model_class(**args).to(device)
        batch = _random(synthetic_batch(module, setup.data, setup.data.num_frames))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accelerator = "gpu" if device == "cuda" else "cpu"
            fit_on_batch(module, batch, steps + 1, accelerator=accelerator, precision=setup.precision)
    return memory.peak_bytes, time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.cases:
        what, configs, overrides, data = CASES[name]
        extra = ["--trainer.precision", args.precision] if args.precision else []
        setup = read_config(configs, overrides + extra, data)
        planned, steps, plan_s = estimate(setup, args.device)
        measured, run_s = measure(setup, steps, args.device)
        rows.append(
            {
                "case": name,
                "what": what,
                "precision": setup.precision,
                "estimated_bytes": planned,
                "measured_bytes": measured,
                "error": planned / measured - 1,
                "steps_traced": steps,
                "plan_seconds": plan_s,
                "run_seconds": run_s,
            }
        )
        print(f"{name}: estimated {human(planned)}, measured {human(measured)}, {rows[-1]['error']:+.1%}", flush=True)
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    counter = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "PeakTensorMemory (counted storages)"
    print(f"\nPlanner estimate vs measured peak per device, {args.device}, measured with {counter}")
    print("| case | what | estimated | measured | estimate vs measured | steps | plan s | run s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['what']} | {human(r['estimated_bytes'])} | {human(r['measured_bytes'])} | "
            f"{r['error']:+.1%} | {r['steps_traced']} | {r['plan_seconds']:.1f} | {r['run_seconds']:.1f} |"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default=None, help="override trainer.precision (e.g. bf16-mixed on a GPU)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    rows = run(args)
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    run_command(main)
