"""python -m memflow_train.generation: narratives -> mp4 videos, streamed chunk by chunk.

  python -m memflow_train.generation narratives.jsonl --checkpoint outputs/demo/logs/version_0/checkpoints/last.ckpt \\
      --config configs/demo.yaml --text-encoder ~/.cache/memflow_train/demo-v1-... --output videos/

The generator comes from --checkpoint (anything memflow_train.models.load_transformer loads: diffusers or
original Wan folders, LongLive / Self-Forcing / MemFlow .pt, our Lightning .ckpt with EMA weights) and/or
--config (a training YAML: its model.init_args.generator spec, memory and sampling settings). Frames are
written to the mp4 as each chunk is decoded; memory stays bounded whatever the length.

FPS (both count output video frames; a latent frame decodes to 4, the first to 1):
  transformer FPS  video frames / seconds inside the transformer: every denoising forward, the clean
                   re-run that writes the KV cache and memory, recache at prompt switches;
                   device-synchronised; excludes text encoding, VAE decoding and file writing (the
                   measure behind MemFlow's 18.7 and LongLive's 20.7 FPS). "steady" leaves out chunk 1.
  end-to-end FPS   video frames / wall seconds from the start of text encoding to the closed mp4
                   (text encoder, transformer, VAE decoder, uint8 conversion, H.264 encoding, writing);
                   model loading excluded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from memflow_train.checks import frame_rate, number, whole
from memflow_train.generation.build import (
    MEMORY_KNOBS,
    Recipe,
    load_generator,
    load_text_encoder,
    load_vae,
    parse_dtype,
    recipe_from_checkpoint,
    recipe_from_config,
    with_memory_flags,
)
from memflow_train.generation.mp4 import Mp4Writer
from memflow_train.generation.narrative import Narrative, read_narratives
from memflow_train.generation.pipeline import (
    Chunk,
    GenerationStats,
    StreamingVideoPipeline,
    video_frames_for,
)
from memflow_train.memory.nam import CHOICES as NAM_CHOICES
from memflow_train.memory.policy import CHOICES as GEOMETRY_CHOICES
from memflow_train.memory.policy import plain_policy
from memflow_train.models import fused_attention  # noqa: F401 (registers the flex and flash backends)
from memflow_train.rollout import StreamingGenerator
from memflow_train.sampling import FlowMatchSchedule

_KNOB_HELP = {
    "prototype": "a bank candidate: the chunk's first frame (MemFlow code) or its frames merged by relevance (paper)",
    "record_cadence": "interval: a candidate every --record-interval chunks; every_chunk: MemFlow's stage-1 cadence",
    "recache": "at a switch: chunkwise (ours, block-causal) or joint (official: one forward over sink + window frames)",
    "recache_sink": "at a switch: keep the sink, reencode_early (MemFlow global_sink true) or replace "
    "(LongLive global_sink false; needs --memory off)",
    "context_noise": "cache writes of generated chunks: none (clean) or schedule_table (official sigma 0.005)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m memflow_train.generation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "narratives", help=".jsonl (MemFlow benchmark format, one narrative per line) or .txt (one prompt per line)"
    )
    p.add_argument("--output", required=True, help="an .mp4 path (one narrative) or a folder (NNNN.mp4 per narrative)")
    p.add_argument("--index", type=int, nargs="+", help="narratives to generate, 0-based (default: all)")
    g = p.add_argument_group("models")
    g.add_argument("--checkpoint", help="generator weights (any source load_transformer reads)")
    g.add_argument("--checkpoint-key", help="entry of a training checkpoint (default: EMA generator)")
    g.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="accept checkpoint files holding objects outside the safe allow-list (loading them can run code)",
    )
    g.add_argument("--config", help="training YAML: generator spec (architecture), memory and sampling settings")
    g.add_argument("--text-encoder", help="Wan folder (text_encoder/ + tokenizer/) or UMT5 folder (default: config's)")
    g.add_argument("--tokenizer", help="tokenizer folder when the text encoder folder has none")
    g.add_argument("--text-len", type=int, help="text tokens (default: config's, else 512)")
    g.add_argument("--vae", help="Wan folder (vae/) or VAE folder (default: --text-encoder's folder if it has vae/)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", help="transformer dtype (default: bfloat16 on GPU, float32 on CPU)")
    g.add_argument(
        "--text-dtype",
        help="text encoder dtype (default: the config's text encoder's, else bfloat16 on GPU, float32 on CPU)",
    )
    g.add_argument("--vae-dtype", default="float32")
    g.add_argument(
        "--attention-backend",
        default="sdpa",
        help="sdpa, flex (compiled FlexAttention), flash (if flash-attn is installed)",
    )
    s = p.add_argument_group("video")
    s.add_argument("--num-frames", type=int, help="latent frames when a narrative fixes none (split over its prompts)")
    s.add_argument("--frames-per-prompt", type=int, help="latent frames per prompt when a narrative fixes none")
    s.add_argument("--height", type=int, help="pixels (default: the config's latent_size, else 480)")
    s.add_argument("--width", type=int, help="pixels (default: the config's latent_size, else 832)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fps", type=float, default=16.0, help="frame rate written to the mp4 (Wan: 16)")
    s.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better)")
    s.add_argument("--denoising-steps", type=int, nargs="+", help="default: config's, else 1000 750 500 250")
    s.add_argument("--timestep-shift", type=float)
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    m = p.add_argument_group("memory (default: the config's memory policy, else NAM on)")
    m.add_argument(
        "--memory",
        help="on: NAM bank; off: none (LongLive); sma: NAM + SMA; or a memory policy class "
        "(SurpriseGatedBank, SlowFastMemory, or a dotted path to your own)",
    )
    choices = {**NAM_CHOICES, **GEOMETRY_CHOICES}
    for knob in MEMORY_KNOBS:
        flag = "--" + knob.replace("_", "-")
        if knob in ("relevance_softmax", "sma_include_sink"):
            m.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif knob in choices:
            m.add_argument(flag, choices=choices[knob], help=_KNOB_HELP.get(knob))
        elif knob in ("novelty_threshold", "surprise_threshold"):
            m.add_argument(flag, type=float)
        else:
            m.add_argument(flag, type=int)
    return p


def _recipe(args: argparse.Namespace) -> Recipe:
    if args.config is not None:
        return recipe_from_config(args.config)
    return (recipe_from_checkpoint(args.checkpoint) if args.checkpoint else None) or Recipe()


def build_pipeline(args: argparse.Namespace) -> StreamingVideoPipeline:
    recipe = _recipe(args)
    memory = with_memory_flags(recipe.memory, args.memory, **{k: getattr(args, k) for k in MEMORY_KNOBS})
    device = torch.device(args.device)
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    spec = recipe.generator if args.config is not None else None
    if args.checkpoint is None and spec is None:
        raise SystemExit("error: pass --checkpoint and/or --config")
    model = load_generator(
        spec,
        args.checkpoint,
        args.checkpoint_key,
        parse_dtype(args.dtype, default_dtype),
        device,
        args.trust_checkpoint,
    )
    model.set_attention_backend(args.attention_backend)
    text_dtype = None if args.text_dtype is None else parse_dtype(args.text_dtype, default_dtype)
    text = load_text_encoder(
        recipe, args.text_encoder, args.tokenizer, args.text_len, text_dtype, device, parse_dtype(None, default_dtype)
    )
    vae = load_vae(args.vae, args.text_encoder, parse_dtype(args.vae_dtype, "float32"), device)
    schedule = FlowMatchSchedule(recipe.timestep_shift if args.timestep_shift is None else args.timestep_shift)
    steps = list(recipe.denoising_steps if args.denoising_steps is None else args.denoising_steps)
    sampler = StreamingGenerator(model, schedule, steps, memory, recipe.context_timestep)
    stride = vae.spatial_stride
    default_px = [n * stride for n in recipe.latent_size] if recipe.latent_size else [480, 832]
    height = default_px[0] if args.height is None else args.height
    width = default_px[1] if args.width is None else args.width
    step = stride * model.config.patch_size[1]  # the VAE's stride times the transformer's patch
    if height % step or width % step:
        raise SystemExit(
            f"error: height and width must be multiples of {step} (VAE stride {stride} x patch "
            f"{model.config.patch_size[1]}), got {height}x{width}"
        )
    return StreamingVideoPipeline(sampler, text, vae, (height // stride, width // stride))


def _outputs(args: argparse.Namespace, narratives: list[Narrative]) -> list[tuple[int, Narrative, Path]]:
    indices = args.index if args.index is not None else list(range(len(narratives)))
    bad = [i for i in indices if not 0 <= i < len(narratives)]
    if bad:
        raise SystemExit(f"error: --index {bad} outside the {len(narratives)} narratives of {args.narratives}")
    out = Path(args.output)
    if out.suffix == ".mp4":
        if len(indices) != 1:
            raise SystemExit(f"error: {len(indices)} narratives selected: --output must be a folder (or pass --index)")
        return [(indices[0], narratives[indices[0]], out)]
    return [(i, narratives[i], out / f"{i:04d}.mp4") for i in indices]


def describe(narrative: Narrative, pipeline: StreamingVideoPipeline, stats: GenerationStats) -> dict:
    """The sidecar JSON: where each prompt really starts (first chunk at or after its switch frame)."""
    n, stride = pipeline.sampler.frames_per_chunk, pipeline.temporal_stride
    starts = [
        next((c * n for c, p in enumerate(stats.prompt_chunks) if p == k), None) for k in range(len(narrative.prompts))
    ]
    return {
        "prompts": list(narrative.prompts),
        "switch_frames": list(narrative.switch_frames),
        "prompt_start_latent_frames": starts,
        "prompt_start_video_frames": [None if s is None else video_frames_for(s, stride) for s in starts],
        "num_latent_frames": narrative.num_frames,
        "num_video_frames": stats.video_frames,
        "memory": plain_policy(pipeline.sampler.memory),
        "stats": stats.as_dict(),
    }


def check_args(args: argparse.Namespace) -> None:
    """Refuse option values that cannot be honoured exactly (none is replaced by a default)."""
    positive = {"fps": "--fps", "timestep_shift": "--timestep-shift"}
    counts = {"text_len": 1, "height": 1, "width": 1, "num_frames": 1, "frames_per_prompt": 1, "seed": 0}
    try:
        for key, flag in positive.items():
            if getattr(args, key) is not None:
                number(flag, getattr(args, key), low=0, low_open=True)
        for key, low in counts.items():
            if getattr(args, key) is not None:
                whole("--" + key.replace("_", "-"), getattr(args, key), low=low)
        whole("--crf", args.crf, low=0, high=51)
        frame_rate("--fps", args.fps)  # stored exactly in the mp4 (12.5 stays 12.5)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.index is not None and len(set(args.index)) != len(args.index):
        raise SystemExit(f"error: --index {args.index} names a narrative twice")


def main(argv: list[str] | None = None) -> list[GenerationStats]:
    args = build_parser().parse_args(argv)
    check_args(args)
    flags = {"frames_per_prompt": "--frames-per-prompt", "num_frames": "--num-frames"}
    narratives = read_narratives(args.narratives, args.frames_per_prompt, args.num_frames, flags)
    jobs = _outputs(args, narratives)
    pipeline = build_pipeline(args)
    for _, narrative, _ in jobs:
        pipeline.check(narrative)
    h, w = (s * pipeline.vae.spatial_stride for s in pipeline.latent_size)
    results = []
    for i, narrative, path in jobs:
        total = narrative.num_frames // pipeline.sampler.frames_per_chunk
        bar = tqdm(total=total, desc=f"narrative {i}", unit="chunk", disable=not args.progress, file=sys.stderr)

        def progress(chunk: Chunk, stats: GenerationStats, bar: tqdm = bar) -> None:
            bar.set_postfix(prompt=chunk.prompt_index, fps=f"{stats.transformer_fps:.2f}")
            bar.update()

        with Mp4Writer(path, h, w, args.fps, args.crf) as writer:
            stats = pipeline.generate(narrative, writer, args.seed, progress)
        bar.close()
        path.with_suffix(".json").write_text(json.dumps(describe(narrative, pipeline, stats), indent=1))
        print(
            f"{path}: {stats.video_frames} frames {w}x{h} ({narrative.num_frames} latent), "
            f"transformer {stats.transformer_fps:.2f} FPS (steady {stats.steady_transformer_fps:.2f}), "
            f"end-to-end {stats.end_to_end_fps:.2f} FPS"
        )
        results.append(stats)
    pipeline.text_encoder.truncation_summary()
    return results
