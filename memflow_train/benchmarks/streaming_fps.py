"""Streaming generation's transformer FPS per memory variant and attention backend (gpu_check's fps section).

The paper's measure: video frames generated per second of transformer time. Each memory variant first
generates warmup_chunks chunks with SDPA (the NAM bank fills: with MemFlow's layout it holds 3 frames from
chunk 12 on) and keeps that state; then each (variant, backend) case runs one untimed chunk from it
(compilation, kernel selection) and, in every repeat, measure_chunks timed chunks from the same state, all
cases in a fresh seeded order. Timed per chunk, device-synchronised: StreamingGenerator.rollout, i.e. the
memory's bank update and retrieval, every denoising forward with the renoising between them, and the forward
at the context timestep that writes the chunk into the cache. Not timed: the chunk's noise draw, text encoding
(the prompt's per-layer K/V are computed once), VAE decoding. A latent frame is VAE_TEMPORAL_STRIDE video frames.
"""

from __future__ import annotations

import argparse
import random
import time
import traceback
from dataclasses import replace
from typing import Any

import torch

from memflow_train.benchmarks.attention_backends import backend_status
from memflow_train.benchmarks.common import (
    VAE_TEMPORAL_STRIDE,
    build_backbone,
    error_text,
    latent_grid,
    repeat_within,
    summarize,
    sync,
)
from memflow_train.benchmarks.dmd_step import random_batch
from memflow_train.benchmarks.memory_overhead import VARIANTS
from memflow_train.generation.build import Recipe
from memflow_train.generation.pipeline import video_frames_for
from memflow_train.models import fused_attention  # noqa: F401 (registers the flex and flash backends)
from memflow_train.models.attention import get_attention_backend, register_attention_backend
from memflow_train.models.presets import wan_config
from memflow_train.rollout import PromptSchedule, Stream, StreamingGenerator
from memflow_train.sampling import FlowMatchSchedule, seeded

# Published speeds on one H100, transformer time only (DESIGN.md): anchors, not our measurements.
PAPER_FPS = {"MemFlow (NAM + SMA)": 18.7, "LongLive (memory-free)": 20.7}
GOAL_FPS = 20.7  # ours: at least LongLive's speed with the memory on
ANCHOR = {"off": "LongLive 20.7", "nam_sma": "MemFlow 18.7"}
BACKEND_LABEL = {
    "sdpa": "sdpa (PyTorch's choice of kernel)",
    "sdpa_flash": "sdpa, flash kernel forced",
    "flash": "flash-attn 2",
    "flex": "flex (torch.compile)",
}
Case = tuple[str, str]  # (memory variant, attention backend)


def random_prompt(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Text encoder states (1, text_len, text_dim) of prompt_tokens random tokens, padding zeroed, and the mask
    (dmd_step's random batch)."""
    b = random_batch(1, args.text_len, wan_config(args.preset)["text_dim"], args.prompt_tokens)
    return b.prompt_embeds[:, 0].to(device, dtype), b.prompt_mask[:, 0].to(device)


def anchors_apply(args: argparse.Namespace) -> bool:
    """The paper's FPS are for the whole 1.3B at 480x832, 3-frame chunks, bf16 on a GPU."""
    full = args.preset == "wan2.1-t2v-1.3b" and (args.height, args.width) == (480, 832)
    return full and args.frames_per_chunk == 3 and args.dtype == "bfloat16" and args.device.startswith("cuda")


class AttendedFrames:
    """Counting wrappers of attention backends: the most key frames any call attended since the last take()."""

    def __init__(self, tokens_per_frame: int) -> None:
        self.tokens_per_frame = tokens_per_frame
        self.keys: list[int] = []

    def wrap(self, backend: str) -> str:
        """Register a counting wrapper of backend; returns its name."""
        fn = get_attention_backend(backend)

        def counted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.keys.append(k.shape[2])
            return fn(q, k, v)

        register_attention_backend(f"streaming_fps/{backend}", counted)
        return f"streaming_fps/{backend}"

    def take(self) -> int:
        frames = max(self.keys) // self.tokens_per_frame
        self.keys.clear()
        return frames


def generate(
    sampler: StreamingGenerator,
    stream: Stream,
    prompts: PromptSchedule,
    noise: list[torch.Tensor],
    seed: int,
    counter: AttendedFrames,
) -> list[dict]:
    """Continue stream by one chunk per noise tensor; per chunk its index, seconds, video frames and the frames
    it attended (counter: the wrapper of the model's attention backend)."""
    device, n = next(sampler.model.parameters()).device, sampler.frames_per_chunk
    steps = seeded(seed, "steps", device=device)
    chunks = []
    for x in noise:
        first = stream.next_frame
        counter.keys.clear()
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            sampler.rollout(stream, x, prompts, generator=steps)
        sync(device)
        seconds = time.perf_counter() - start
        video = video_frames_for(first + n, VAE_TEMPORAL_STRIDE) - video_frames_for(first, VAE_TEMPORAL_STRIDE)
        chunks.append({"chunk": first // n, "seconds": seconds, "video_frames": video, "attended": counter.take()})
    return chunks


def fps_section(args: argparse.Namespace, device: torch.device, deadline: float) -> dict:
    """Transformer FPS per (variant, backend) case, repeats bounded by deadline (time.perf_counter()); a case that
    raises is recorded in its row and in "failures", the others still run."""
    dtype = getattr(torch, args.dtype)
    model = build_backbone(args.preset, args.seed, device, dtype)
    c = model.config
    lh, lw = latent_grid(args.preset, args.height, args.width)
    counter = AttendedFrames((lh // c.patch_size[1]) * (lw // c.patch_size[2]))
    with torch.no_grad():
        prompts = PromptSchedule.single(model.encode_text(*random_prompt(args, device, dtype)))
    recipe, n = Recipe(), args.frames_per_chunk
    g, shape = seeded(args.seed, "noise"), (1, c.in_channels, n, lh, lw)
    draw = [torch.randn(shape, generator=g).to(device, dtype) for _ in range(args.warmup_chunks)]
    timed_noise = [torch.randn(shape, generator=g).to(device, dtype) for _ in range(args.measure_chunks)]
    status = backend_status(device, dtype, c.num_attention_heads, c.attention_head_dim)
    backends = {b: counter.wrap(b) for b in args.backends if status[b] is None}

    streams: dict[str, tuple[StreamingGenerator, Stream, dict]] = {}
    warmup: dict[str, list[dict]] = {}
    model.set_attention_backend(counter.wrap("sdpa"))
    for v in args.variants:
        memory = replace(VARIANTS[v], num_frame_per_block=n)
        sampler = StreamingGenerator(
            model, FlowMatchSchedule(recipe.timestep_shift), list(recipe.denoising_steps), memory
        )
        stream = sampler.new_stream()
        warmup[v] = generate(sampler, stream, prompts, draw, args.seed, counter)
        streams[v] = (sampler, stream, stream.state_dict())

    def run(case: Case, noise: list[torch.Tensor]) -> list[dict]:
        sampler, stream, state = streams[case[0]]
        stream.load_state_dict(state)
        model.set_attention_backend(backends[case[1]])
        return generate(sampler, stream, prompts, noise, args.seed + 1, counter)

    cases = [(v, b) for b in backends for v in args.variants]
    first_call: dict[Case, float] = {}
    timed: dict[Case, list[list[dict]]] = {case: [] for case in cases}
    errors: dict[Case, str] = {}

    def attempt(case: Case, noise: list[torch.Tensor]) -> list[dict] | None:
        try:
            return run(case, noise)
        except Exception as err:  # noqa: BLE001 (a failing case is recorded; the others still run)
            traceback.print_exc()
            errors[case] = error_text(err)
            return None

    for case in cases:  # one untimed chunk per case: compilation and kernel selection happen here
        start = time.perf_counter()
        if attempt(case, timed_noise[:1]) is not None:
            first_call[case] = time.perf_counter() - start
    order, shuffler = [case for case in cases if case not in errors], random.Random(args.seed)

    def once(r: int) -> None:
        shuffler.shuffle(order)
        for case in order:
            if case not in errors and (chunks := attempt(case, timed_noise)) is not None:
                timed[case].append(chunks)

    repeats = repeat_within(deadline, args.max_repeats, once)
    rows = [{"backend": b, "label": BACKEND_LABEL[b], "unavailable": status[b]} for b in args.backends if status[b]]
    for v, b in cases:
        row = {"variant": v, "backend": b, "label": BACKEND_LABEL[b], "error": errors.get((v, b)), "fps": None}
        if timed[(v, b)] and (v, b) not in errors:
            row |= _measured(timed[(v, b)], streams[v][1], args) | {"first_call_seconds": first_call[(v, b)]}
            row |= {"paper_anchor": ANCHOR.get(v), "goal_met": None}
            if anchors_apply(args) and VARIANTS[v].enabled:
                row["goal_met"] = row["fps"] >= GOAL_FPS
        rows.append(row)
    fps = {(r["variant"], r["backend"]): r["fps"] for r in rows if r.get("fps")}
    for r in rows:
        off, sdpa = fps.get(("off", r["backend"])), fps.get((r.get("variant"), "sdpa"))
        r["vs_off"] = r["fps"] / off - 1 if r.get("fps") and off else None
        r["vs_sdpa"] = r["fps"] / sdpa - 1 if r.get("fps") and sdpa else None
    return {
        "timed": f"StreamingGenerator.rollout per chunk: the memory's bank update and retrieval, "
        f"{len(recipe.denoising_steps)} denoising forwards with renoising, 1 cache-writing forward; "
        "device-synchronised",
        "fps_definition": f"video frames / transformer seconds of the timed chunks (a latent frame = {VAE_TEMPORAL_STRIDE} "
        "video frames)",
        "frames_per_chunk": n,
        "warmup_chunks": args.warmup_chunks,
        "measured_chunks": args.measure_chunks,
        "repeats": repeats,
        "statistic": args.statistic,
        "anchors_apply": anchors_apply(args),
        "rows": rows,
        "warmup_sdpa": warmup,
        "failures": [f"fps {v} / {b}: {e}" for (v, b), e in errors.items()],
    }


def _measured(repeats: list[list[dict]], stream: Stream, args: argparse.Namespace) -> dict[str, Any]:
    """A case's figures: FPS from the statistic of the repeats' summed chunk seconds, and what the chunks saw."""
    seconds = summarize([sum(c["seconds"] for c in chunks) for chunks in repeats], args.statistic)
    chunks = repeats[0]
    frames = sum(c["video_frames"] for c in chunks)
    bank = stream.cache.layers[0].memory
    return {
        "fps": frames / seconds,
        "seconds_per_chunk": seconds / len(chunks),
        "chunks": [chunks[0]["chunk"], chunks[-1]["chunk"]],
        "video_frames_per_chunk": frames / len(chunks),
        "attended_frames": max(c["attended"] for chunks in repeats for c in chunks),
        "bank_frames": 0 if bank is None else len(bank),
        "cache_mib": stream.cache.nbytes() / 2**20,
        "repeat_seconds": [[c["seconds"] for c in chunks] for chunks in repeats],
    }
