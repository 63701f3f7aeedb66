"""GPU validation in one command: streaming FPS, a stage-1 DMD step against the planner, bf16 against fp32.

    python -m memflow_train.benchmarks.gpu_check --out DIR          # one CUDA GPU: Wan2.1-1.3B, bf16, <= 8 min
    python -m memflow_train.benchmarks.gpu_check --out DIR --tiny   # the same code on CPU at tiny sizes (CI)

Sections, in this order; each is isolated: one that fails records its error, the others still run, and the
command exits 1 naming every failure. DIR/gpu_check.json and DIR/gpu_check.md are rewritten after each section.

- precision: one bidirectional forward of the backbone on one chunk's latents at the first denoising timestep,
  with the same seeded weights and input in fp32 (TF32 off) and in --dtype: max abs error, max abs and RMS
  error relative to the fp32 output's RMS, cosine similarity.
- dmd: one stage-1 self-forcing DMD step (benchmarks.dmd_step: generator, critic and teacher of the preset,
  gradient checkpointing, NAM with stage 1's every-chunk cadence): its time, its peak memory (resident when the
  step began + the peak of what the step created) and memflow_train.plan's per-GPU estimate of the module.
- fps: streaming generation's transformer FPS (the paper's measure) for memory off / NAM / NAM+SMA with every
  attention backend that can run here; the others get an "unavailable: why" row (benchmarks.streaming_fps).

--budget-s bounds the wall clock: the sections share what is left by weight as each starts, and the repeats
of the DMD step and of the FPS cases stop before one that would end past its section's share (the first
always runs). The weights and random prompts are seeded, not trained: speeds and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from memflow_train.benchmarks import dmd_step
from memflow_train.benchmarks.common import (
    build_backbone,
    check_counts,
    error_text,
    latent_grid,
    repeat_within,
    summarize,
)
from memflow_train.benchmarks.gpu_check_report import markdown
from memflow_train.benchmarks.memory_overhead import VARIANTS
from memflow_train.benchmarks.streaming_fps import BACKEND_LABEL, GOAL_FPS, PAPER_FPS, fps_section, random_prompt
from memflow_train.errors import run_command
from memflow_train.generation.build import Recipe
from memflow_train.memory.nam import CHOICES as MEMORY_CHOICES
from memflow_train.models.causal_wan import cast_keeping_fp32
from memflow_train.models.presets import wan_config
from memflow_train.sampling import FlowMatchSchedule

GIB = 2**30
SECTIONS = {"precision": 1.0, "dmd": 3.0, "fps": 6.0}  # running order and budget weights
# --tiny: the same sections at CPU sizes (tiny preset, 64x64 px: 8x8 latents, 16 tokens a frame).
TINY = {
    "preset": "tiny",
    "height": 64,
    "width": 64,
    "text_len": 16,
    "prompt_tokens": 8,
    "measure_chunks": 2,
    "max_repeats": 2,
    "dmd_max_repeats": 1,
    "budget_s": 60.0,
    "threads": 1,  # tiny models: one CPU thread is faster (10x here: no thread synchronisation on 2 shared cores)
}


class Budget:
    """The command's wall-clock budget in seconds, shared out among SECTIONS by weight as each starts."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()
        self._left = dict(SECTIONS)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def deadline(self, section: str) -> float:
        """The time.perf_counter() value by which section should end: its weight's share of what is left."""
        weight = self._left.pop(section)
        share = weight / (weight + sum(self._left.values()))
        return time.perf_counter() + max(self.seconds - self.elapsed(), 0.0) * share


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ precision


def precision_section(args: argparse.Namespace, device: torch.device, deadline: float) -> dict:
    """The backbone in --dtype against fp32: the same seeded weights and input, one bidirectional forward."""
    low = getattr(torch, args.dtype)
    reference = build_backbone(args.preset, args.seed, device, torch.float32)
    model = cast_keeping_fp32(copy.deepcopy(reference), low)
    lh, lw = latent_grid(args.preset, args.height, args.width)
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(1, reference.config.in_channels, args.frames_per_chunk, lh, lw, generator=g).to(device)
    text, _ = random_prompt(args, device, torch.float32)
    recipe = Recipe()
    t = FlowMatchSchedule(recipe.timestep_shift).warp(recipe.denoising_steps)[:1].to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # an exact fp32 reference
    try:
        with torch.no_grad():
            want = reference(latents, t, text).double()
            got = model(latents.to(low), t, text.to(low)).double()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    diff, rms = got - want, want.pow(2).mean().sqrt().item()
    return {
        "dtype": args.dtype,
        "reference": "float32, TF32 off",
        "forward": "one bidirectional forward of one chunk",
        "latent_shape": list(latents.shape),
        "timestep": t.item(),
        "fp32_output_rms": rms,
        "max_abs_error": diff.abs().max().item(),
        "max_abs_error_rel_rms": diff.abs().max().item() / rms,
        "rms_error_rel_rms": diff.pow(2).mean().sqrt().item() / rms,
        "cosine_similarity": torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item(),
    }


# ------------------------------------------------------------------------------------------ DMD step


class ResidentStepMeter(dmd_step.StepMeter):
    """dmd_step's meter (step seconds, peak bytes of the tensors the step creates) and the bytes resident when
    the step began: the allocator's on CUDA, the module's parameter and buffer storages on CPU."""

    resident_bytes = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.resident_bytes = torch.cuda.memory_allocated(self.device)
        else:
            storages = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module.state_dict().values()
            }
            self.resident_bytes = sum(storages.values())
        super().on_train_batch_start(trainer, module, batch, batch_idx)


def planner_estimate(module: torch.nn.Module, batch: object) -> dict:
    """memflow_train.plan's per-GPU estimate of module on one GPU: {"estimate_gib": ...}; {"unavailable": why}
    where there is no planner (not a failure); {"error": why} where the planner fails (a failure)."""
    try:
        from memflow_train.plan import plan_module
    except ImportError as err:  # no memflow_train.plan, or no plan_module in it: not written yet
        if err.name == "memflow_train.plan":
            return {"unavailable": f"planner unavailable: {error_text(err)}"}
        return {"error": f"planner failed: {error_text(err)}"}  # the planner imports something missing
    try:
        # The measured step is a fresh module's first: plan that step, not a run's steady state.
        plan = plan_module(module, gpus=1, strategy=None, batch=batch, steady_state=False)
        return {"estimate_gib": int(plan.per_gpu_bytes) / GIB}
    except Exception as err:  # noqa: BLE001 (recorded; the measurement stands)
        return {"error": f"planner failed: {error_text(err)}"}


def dmd_section(args: argparse.Namespace, device: torch.device, deadline: float) -> dict:
    """One DMD step of a fresh module (benchmarks.dmd_step), repeated while the section's budget allows."""
    config = wan_config(args.preset)
    step_args = argparse.Namespace(
        preset=args.preset,
        num_layers=config["num_layers"],
        num_frames=args.dmd_num_frames,
        height=args.height,
        width=args.width,
        gradient_checkpointing=args.dmd_checkpointing,
        dtype=args.dtype,
        record_interval=getattr(VARIANTS[args.dmd_memory], "record_interval", 1),  # NAM's only
        record_cadence=args.dmd_record_cadence,
    )
    batch = dmd_step.random_batch(1, args.text_len, config["text_dim"], args.prompt_tokens)
    steps: list[dict] = []
    planner: dict = {}

    def once(r: int) -> None:
        free_memory(device)
        torch.manual_seed(args.seed)
        module = dmd_step.build_module(step_args, args.dmd_memory).to(device)
        meter = dmd_step.step(module, batch, device, ResidentStepMeter(device))
        peak = meter.resident_bytes + meter.peak_bytes
        steps.append(
            {
                "seconds": meter.seconds,
                "peak_gib": peak / GIB,
                "resident_gib": meter.resident_bytes / GIB,
                "step_peak_gib": meter.peak_bytes / GIB,
                "exit_steps": module.last_exit_steps,
            }
        )
        if r == 0:
            planner.update(planner_estimate(module, batch))

    repeats = repeat_within(deadline, args.dmd_max_repeats, once)
    peak = max(s["peak_gib"] for s in steps)
    if "estimate_gib" in planner:
        planner["measured_over_estimate"] = peak / planner["estimate_gib"]
    return {
        "networks": f"generator, critic and teacher: {args.preset}, {config['num_layers']} blocks, {args.dtype}",
        "memory": f"{args.dmd_memory}, record_cadence {args.dmd_record_cadence}",
        "num_frames": args.dmd_num_frames,
        "gradient_checkpointing": args.dmd_checkpointing,
        "repeats": repeats,
        "seconds_per_step": summarize([s["seconds"] for s in steps], args.statistic),
        "peak_gib": peak,
        "steps": steps,
        "planner": planner,
        "device_total_gib": torch.cuda.get_device_properties(device).total_memory / GIB
        if device.type == "cuda"
        else None,
        "failures": [f"dmd: {planner['error']}"] if "error" in planner else [],
    }


# ------------------------------------------------------------------------------------------ the command

SECTION_RUNS: dict[str, Callable[[argparse.Namespace, torch.device, float], dict]] = {
    "precision": precision_section,
    "dmd": dmd_section,
    "fps": fps_section,
}


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))


def run(args: argparse.Namespace) -> dict:
    """Every section in SECTIONS order, each isolated; the report is written after each."""
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {
        "args": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "paper_fps": PAPER_FPS,
        "goal_fps": GOAL_FPS,
        "sections": {},
        "failed": [],
        "wall_s": 0.0,
    }
    for section in SECTIONS:
        deadline, start = budget.deadline(section), time.perf_counter()
        print(f"gpu_check: {section} ...", file=sys.stderr, flush=True)
        try:
            result = SECTION_RUNS[section](args, device, deadline)
        except Exception as err:  # noqa: BLE001 (one failing section must not hide the others)
            traceback.print_exc()
            result = {"error": error_text(err)}
            report["failed"].append(f"{section}: {result['error']}")
        report["failed"] += result.get("failures", [])
        report["sections"][section] = result | {"wall_s": time.perf_counter() - start}
        free_memory(device)
        report["wall_s"] = budget.elapsed()
        write(report, Path(args.out))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--tiny", action="store_true", help=f"CPU sizes for CI: {TINY}")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole command, seconds")
    p.add_argument("--preset", default="wan2.1-t2v-1.3b", help="the whole network of this preset")
    p.add_argument("--height", type=int, default=480, help="video height in pixels (latent = /8)")
    p.add_argument("--width", type=int, default=832, help="video width in pixels (latent = /8)")
    p.add_argument("--text-len", type=int, default=512, help="text tokens (UMT5: 512)")
    p.add_argument("--prompt-tokens", type=int, default=120, help="real tokens of the random prompt")
    p.add_argument("--frames-per-chunk", type=int, default=Recipe().memory.num_frame_per_block, help="latent frames")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --tiny: 1)")
    p.add_argument("--statistic", choices=["median", "min"], default="median", help="of the repeats' times")
    g = p.add_argument_group("fps")
    g.add_argument("--variants", nargs="+", default=["off", "nam", "nam_sma"], choices=list(VARIANTS))
    g.add_argument("--backends", nargs="+", default=list(BACKEND_LABEL), choices=list(BACKEND_LABEL))
    g.add_argument("--warmup-chunks", type=int, default=12, help="untimed chunks first (12: the NAM bank is full)")
    g.add_argument("--measure-chunks", type=int, default=4, help="timed chunks per case and repeat")
    g.add_argument("--max-repeats", type=int, default=5, help="at most this many repeats (fewer if over budget)")
    g = p.add_argument_group("dmd")
    g.add_argument("--dmd-num-frames", type=int, default=21, help="latent frames per rollout (stage 1: 21)")
    g.add_argument("--dmd-memory", default="nam", choices=list(VARIANTS), help="stage 1: nam")
    g.add_argument("--dmd-record-cadence", default="every_chunk", choices=MEMORY_CHOICES["record_cadence"])
    g.add_argument("--dmd-max-repeats", type=int, default=2, help="at most this many steps (fewer if over budget)")
    g.add_argument(
        "--dmd-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gradient checkpointing of generator and critic (stage 1's recipe: on)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, --tiny's defaults applied under any given flag; refuses what cannot be measured."""
    parser = build_parser()
    if parser.parse_known_args(argv)[0].tiny:
        parser.set_defaults(**TINY)
    args = parser.parse_args(argv)
    lowest = {"text_len": 1, "prompt_tokens": 1, "frames_per_chunk": 1, "warmup_chunks": 0, "measure_chunks": 1}
    lowest |= {"max_repeats": 1, "dmd_num_frames": 1, "dmd_max_repeats": 1, "seed": 0, "threads": 1}
    check_counts(args, lowest)
    latent_grid(args.preset, args.height, args.width)
    if args.prompt_tokens > args.text_len:
        raise ValueError(f"--prompt-tokens {args.prompt_tokens} exceeds --text-len {args.text_len}")
    if not math.isfinite(args.budget_s) or args.budget_s <= 0:
        raise ValueError(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if not args.tiny and torch.device(args.device).type != "cuda":
        raise ValueError("the full check needs a CUDA GPU (the whole 1.3B network); --tiny runs on CPU")
    for v in args.variants:  # the chunk must fit each variant's window
        replace(VARIANTS[v], num_frame_per_block=args.frames_per_chunk)
    return args


def main(argv: list[str] | None = None) -> dict:
    report = run(parse_args(argv))
    print(markdown(report))
    if report["failed"]:
        raise SystemExit(f"gpu_check failed: {'; '.join(report['failed'])}")
    return report


if __name__ == "__main__":
    run_command(main)
