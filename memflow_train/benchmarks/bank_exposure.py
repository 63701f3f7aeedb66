"""How much of a training rollout sees the memory bank, per record cadence.

A self-forcing rollout keeps one exit step with gradients in every chunk, so the chunks that
attend bank frames are the ones that train the memory. This runs the real streaming sampler on
a config's memory geometry and rollout length (tiny backbone: which frames a chunk attends does
not depend on the model's size) and counts, per cadence, the chunks that attend a bank and the
bank frames they attend.

    python -m memflow_train.benchmarks.bank_exposure --config configs/memflow_wan1.3b_stage1.yaml
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from memflow_train.benchmarks.common import publish
from memflow_train.checks import whole
from memflow_train.errors import run_command
from memflow_train.generation.build import recipe_from_config
from memflow_train.memory import NAM
from memflow_train.memory.nam import CHOICES
from memflow_train.models.causal_wan import CausalWanTransformer
from memflow_train.models.presets import wan_config
from memflow_train.rollout import PromptSchedule, StreamingGenerator
from memflow_train.sampling import FlowMatchSchedule


def bank_per_chunk(memory: NAM, num_frames: int, seed: int = 0) -> list[int]:
    """Bank frames each chunk of a num_frames rollout attends (SMA reads at most sma_topk of them)."""
    torch.manual_seed(seed)
    model = CausalWanTransformer(**wan_config("tiny")).eval()
    sampler = StreamingGenerator(model, FlowMatchSchedule(), [1000], memory)
    prompts = PromptSchedule.single(model.encode_text(torch.randn(1, 5, model.config.text_dim)))
    stream, n = sampler.new_stream(), memory.num_frame_per_block
    seen = []
    with torch.no_grad():
        for _ in range(num_frames // n):
            sampler.rollout(stream, torch.randn(1, model.config.in_channels, n, 2, 2), prompts)
            bank = stream.cache[0].memory  # after the chunk: what its prepare committed, what it attended
            seen.append(0 if bank is None else len(bank))
    return seen


def measure(memory: NAM, num_frames: int) -> list[dict]:
    rows = []
    for cadence in CHOICES["record_cadence"]:
        seen = bank_per_chunk(replace(memory, record_cadence=cadence), num_frames)
        rows.append(
            {
                "record_cadence": cadence,
                "chunks": len(seen),
                "chunks_with_bank": sum(1 for s in seen if s),
                "bank_frames_per_chunk": seen,
                "mean_bank_frames": sum(seen) / len(seen),
            }
        )
    return rows


def _table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"{args.num_frames}-frame rollout, memory of {args.config}")
    if args.record_interval == 1:
        print("(record_interval 1: both cadences record every chunk, so the rows are the same)")
    print("| record_cadence | chunks with a bank | bank frames per chunk | mean |")
    print("|---|---|---|---|")
    for r in rows:
        per_chunk = " ".join(map(str, r["bank_frames_per_chunk"]))
        print(
            f"| {r['record_cadence']} | {r['chunks_with_bank']} of {r['chunks']} | {per_chunk} |"
            f" {r['mean_bank_frames']:.2f} |"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        prog="python -m memflow_train.benchmarks.bank_exposure", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", required=True, help="a training YAML (model.init_args.memory and num_frames)")
    p.add_argument("--num-frames", type=int, help="rollout length (default: the config's num_frames)")
    p.add_argument("--json", default=None, help="write the arguments and rows here")
    args = p.parse_args(argv)
    memory = recipe_from_config(args.config).memory
    if not isinstance(memory, NAM):
        p.error(f"{args.config}: the memory is {type(memory).__name__}; this benchmark measures NAM's record_cadence")
    if args.num_frames is None:
        init = yaml.safe_load(Path(args.config).read_text())["model"]["init_args"]
        if "num_frames" not in init:
            p.error(f"{args.config} sets no model.init_args.num_frames: pass --num-frames")
        args.num_frames = whole(f"{args.config}: model.init_args.num_frames", init["num_frames"], low=1)
    whole("--num-frames", args.num_frames, low=1)
    if args.num_frames < memory.num_frame_per_block or args.num_frames % memory.num_frame_per_block:
        p.error(f"--num-frames {args.num_frames} is not a whole number of {memory.num_frame_per_block}-frame chunks")
    args.record_interval = memory.record_interval
    return publish(measure(memory, args.num_frames), args, _table)


if __name__ == "__main__":
    run_command(main)
