"""Self-forcing DMD training step: time and peak memory with memory off / NAM / NAM+SMA, side by side.

One step is SelfForcingDMD's generator step (global step 0 of a Trainer: the generator's rollout with
an exit-step graph per chunk, the DMD loss against the CFG teacher and the critic, the critic's own
rollout and flow-matching loss, one backward, one optimizer step of both networks), run by Lightning
exactly as in training, timed from batch start to batch end (device-synchronised). Peak memory counts
the tensors created during the step (activations, graphs, cache, gradients, first-step optimizer
state): the allocator's peak on GPU, counted storages on CPU (see tensor_memory). Every repeat runs
every variant in a fresh seeded order, each with a freshly built module (the same seeded weights, no
optimizer state) and Trainer: every step is a first generator step, and one variant's networks are in
memory at a time (keeping all of them across repeats exhausted 24 GB at the 1.3B layout).

    python -m memflow_train.benchmarks.dmd_step --num-layers 1 --num-frames 21
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import warnings
from dataclasses import dataclass, replace

import lightning as L
import torch

from memflow_train.benchmarks.common import add_measurement_args, check_counts, latent_grid, publish, summarize, sync
from memflow_train.benchmarks.memory_overhead import VARIANTS
from memflow_train.benchmarks.tensor_memory import PeakTensorMemory
from memflow_train.errors import run_command
from memflow_train.memory.nam import CHOICES as MEMORY_CHOICES
from memflow_train.memory.nam import NAM
from memflow_train.methods import BackboneSpec, OptimizerSpec, SelfForcingDMD
from memflow_train.models.presets import wan_config


@dataclass
class PromptBatch:
    """The fields SelfForcingDMD reads from a batch (text embeddings as the data pipeline stores them)."""

    prompts: list[list[str]]
    segment_start: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    negative_embeds: torch.Tensor
    negative_mask: torch.Tensor


def random_batch(batch: int, text_len: int, text_dim: int, tokens: int) -> PromptBatch:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, 1, text_len, dtype=torch.bool)
    mask[..., :tokens] = True
    embeds = torch.randn(batch, 1, text_len, text_dim, generator=g) * mask[..., None]
    return PromptBatch(
        prompts=[["a prompt"]] * batch,
        segment_start=torch.zeros(batch, 1, dtype=torch.long),
        prompt_embeds=embeds,
        prompt_mask=mask,
        negative_embeds=embeds[:, 0].roll(1, dims=0),
        negative_mask=mask[:, 0],
    )


class StepMeter(L.Callback):
    """Times the training batch and measures its peak tensor memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = self.peak_bytes = 0.0
        self._memory: PeakTensorMemory | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        self._memory = PeakTensorMemory(self.device).__enter__()
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        sync(self.device)
        self.seconds = time.perf_counter() - self._start
        self._memory.__exit__(None, None, None)
        self.peak_bytes = self._memory.peak_bytes
        self._memory = None

    def on_exception(self, trainer, module, exception) -> None:  # noqa: ANN001
        """A step that raised leaves no counting mode behind (on CPU it would count, and slow, all later work)."""
        if self._memory is not None:
            self._memory.__exit__(type(exception), exception, exception.__traceback__)
            self._memory = None


def build_module(args: argparse.Namespace, variant: str) -> SelfForcingDMD:
    net = BackboneSpec(preset=args.preset, config={"num_layers": args.num_layers}, dtype=args.dtype)
    memory = VARIANTS[variant]
    if isinstance(memory, NAM):  # the cadence options are NAM's
        memory = replace(memory, record_interval=args.record_interval, record_cadence=args.record_cadence)
    return SelfForcingDMD(
        generator=net,
        teacher=net,
        memory=memory,
        num_frames=args.num_frames,
        latent_size=latent_grid(args.preset, args.height, args.width),
        gradient_checkpointing=args.gradient_checkpointing,
        generator_optimizer=OptimizerSpec(lr=1e-6),
        critic_optimizer=OptimizerSpec(lr=1e-6),
        ema_decay=None,
    )


def step(module: SelfForcingDMD, batch: PromptBatch, device: torch.device, meter: StepMeter | None = None) -> StepMeter:
    """One training step of a fresh Trainer (global step 0: generator + critic), measured by meter."""
    meter = meter if meter is not None else StepMeter(device)
    trainer = L.Trainer(
        max_steps=1,
        accelerator=device.type,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[meter],
    )
    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|no logger|ModelCheckpoint).*")
        trainer.fit(module, loader)
    return meter


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    if args.num_layers is None:
        args.num_layers = wan_config(args.preset)["num_layers"]
    text_dim = wan_config(args.preset)["text_dim"]
    batch = random_batch(args.batch_size, args.text_len, text_dim, args.prompt_tokens)
    seconds: dict[str, list[float]] = {v: [] for v in args.variants}
    peaks: dict[str, list[float]] = {v: [] for v in args.variants}
    exit_steps: dict[str, list[int]] = {}
    order, shuffler = list(args.variants), random.Random(0)
    for _ in range(args.repeats):
        shuffler.shuffle(order)
        for v in order:
            torch.manual_seed(0)
            module = build_module(args, v).to(device)
            meter = step(module, batch, device)
            seconds[v].append(meter.seconds)
            peaks[v].append(meter.peak_bytes)
            exit_steps[v] = module.last_exit_steps
            del module
            gc.collect()
    rows = []
    for v in args.variants:
        rows.append(
            {
                "variant": v,
                "seconds_per_step": summarize(seconds[v], args.statistic),
                "peak_gib": max(peaks[v]) / 2**30,
                "exit_steps": exit_steps[v],
                "repeats": seconds[v],
            }
        )
    base = next((r for r in rows if r["variant"] == "off"), None)
    for r in rows:
        r["time_vs_off"] = r["seconds_per_step"] / base["seconds_per_step"] - 1 if base else None
        r["memory_vs_off"] = r["peak_gib"] / base["peak_gib"] - 1 if base else None
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"SelfForcingDMD generator step (+ critic step), preset {args.preset} with {args.num_layers} blocks for "
        f"generator, teacher and critic, {args.num_frames} latent frames of {args.height}x{args.width} px, batch "
        f"{args.batch_size}, record_interval {args.record_interval}, {args.dtype} on {args.device}, "
        f"{args.statistic} of {args.repeats}"
    )
    print("| memory | s/step | vs off | peak tensor GiB | vs off |")
    print("|---|---|---|---|---|")
    for r in rows:
        t = "" if r["time_vs_off"] is None else f"{r['time_vs_off']:+.1%}"
        m = "" if r["memory_vs_off"] is None else f"{r['memory_vs_off']:+.1%}"
        print(f"| {r['variant']} | {r['seconds_per_step']:.1f} | {t} | {r['peak_gib']:.2f} | {m} |")


def check_args(args: argparse.Namespace) -> None:
    """Refuse what the measurement cannot honour, before any work: sizes off the latent grid, counts below 1,
    more real prompt tokens than text_len."""
    lowest = {"num_layers": 1, "num_frames": 1, "text_len": 1, "prompt_tokens": 1, "batch_size": 1}
    check_counts(args, {**lowest, "record_interval": 1})
    latent_grid(args.preset, args.height, args.width)
    if args.prompt_tokens > args.text_len:
        raise ValueError(f"--prompt-tokens {args.prompt_tokens} exceeds --text-len {args.text_len}")


def main(argv: list[str] | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument(
        "--num-layers",
        type=int,
        default=None if cuda else 1,
        help="blocks of generator, teacher and critic (default: 1 on CPU, all on GPU)",
    )
    p.add_argument("--num-frames", type=int, default=21, help="latent frames per rollout (stage 1: 21)")
    p.add_argument("--height", type=int, default=480, help="pixels (latent = /8)")
    p.add_argument("--width", type=int, default=832, help="pixels (latent = /8)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=120, help="real tokens of the random prompt")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--record-interval", type=int, default=3, help="NAM: a candidate every this many chunks")
    p.add_argument(
        "--record-cadence",
        default="interval",
        choices=MEMORY_CHOICES["record_cadence"],
        help="NAM: 'every_chunk' is MemFlow's stage-1 cadence (memflow_train.memory.NAM)",
    )
    p.add_argument("--variants", nargs="+", default=["off", "nam", "nam_sma"], choices=list(VARIANTS))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16"])
    add_measurement_args(p, repeats=1)
    args = p.parse_args(argv)
    check_args(args)
    return publish(run(args), args, print_table)


if __name__ == "__main__":
    run_command(main)
