"""python -m callbacks.evaluate: the long-video evaluation protocol on one checkpoint -> report.json + report.md.

  python -m callbacks.evaluate --checkpoint outputs/demo_eval/checkpoints/last.ckpt \\
      --config configs/demo_eval.yaml --demo_models true --out reports/demo
  python -m callbacks.evaluate --checkpoint memflow.pt --config configs/memflow_wan1.3b_long.yaml \\
      --text_encoder /models/Wan2.1-T2V-1.3B-Diffusers \\
      --protocol.narratives ../shared/benchmarks/memflow_interactive_benchmark.jsonl --protocol.seed 1 \\
      --protocol.clip.path /models/clip-vit-large-patch14 --protocol.subject_features '{kind: dino, path: /models/dino}' \\
      --out reports/memflow

The generator comes from --checkpoint (anything memflow_train.models.load_transformer reads; our Lightning
checkpoints give their EMA generator) with the sampling settings (memory, denoising steps, latent size) of
--config (a training YAML) or else those the checkpoint recorded. The protocol is the one of the config's
LongVideoEvaluation callback when it has one, with --protocol / --protocol.KEY on top. Writes OUT/report.json,
report.md, segments.csv and videos/NNNN.mp4 (the first --videos narratives).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser, DefaultHelpFormatter

from callbacks.long_video.protocol import EvalProtocol, Evaluator
from callbacks.long_video.report import assemble, write_report
from data.synthetic.demo import DemoSpec, demo_dataset
from memflow_train.checks import frame_rate, number, whole
from memflow_train.errors import run_command
from memflow_train.evaluation.narratives import warn_off_grid
from memflow_train.generation.build import (
    Recipe,
    load_generator,
    load_text_encoder,
    load_vae,
    parse_dtype,
    recipe_from_checkpoint,
    recipe_from_config,
)
from memflow_train.generation.pipeline import StreamingVideoPipeline
from memflow_train.rollout import StreamingGenerator
from memflow_train.sampling import FlowMatchSchedule


class _Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help with the description's line breaks kept (it holds example commands)."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m callbacks.evaluate", description=__doc__, formatter_class=_Formatter)
    p.add_argument(
        "--checkpoint", type=str, required=True, help="generator weights (any source load_transformer reads)"
    )
    p.add_argument("--checkpoint_key", type=str | None, default=None, help="entry of a training checkpoint")
    p.add_argument("--config", type=str | None, default=None, help="training YAML: sampling settings and protocol")
    p.add_argument("--protocol", type=EvalProtocol, default=EvalProtocol(), help="the evaluation protocol")
    p.add_argument("--out", type=str, required=True, help="folder for report.json, report.md and videos/")
    p.add_argument("--text_encoder", type=str | None, default=None, help="Wan folder (text_encoder/, tokenizer/)")
    p.add_argument("--text_len", type=int | None, default=None, help="text tokens (default: config's, else 512)")
    p.add_argument("--vae", type=str | None, default=None, help="Wan or VAE folder (default: --text_encoder's)")
    p.add_argument("--demo_models", type=bool, default=False, help="text encoder and VAE of the demo dataset")
    p.add_argument("--latent_size", type=tuple[int, int] | None, default=None, help="default: the recipe's")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        type=str | None,
        default=None,
        help="transformer and text encoder dtype (default: bfloat16 on GPU, float32 on CPU; a config's text "
        "encoder keeps its own unless given)",
    )
    p.add_argument(
        "--full_sequence_steps",
        type=int | None,
        default=None,
        help="evaluate the model as a bidirectional model (a teacher): this many Euler steps over each whole "
        "narrative, each frame under its own prompt, instead of streaming it chunk by chunk",
    )
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="with --full_sequence_steps: classifier-free guidance flow(neg) + g * (flow(prompt) - flow(neg)) "
        "(1: none; needs a model trained with prompt dropout)",
    )
    p.add_argument("--negative_prompt", type=str, default="", help="the guidance's unconditional prompt")
    p.add_argument("--videos", type=int, default=2, help="narratives whose mp4 is written (0: none)")
    p.add_argument("--video_fps", type=float, default=16.0, help="frame rate of the written mp4s (stored exactly)")
    return p


def check_args(args: Any) -> None:
    """Refuse option values that cannot be honoured exactly (none is replaced by a default), before any model
    loads."""
    if args.text_len is not None:
        whole("--text_len", args.text_len, low=1)
    whole("--videos", args.videos, low=0)
    if args.full_sequence_steps is not None:
        whole("--full_sequence_steps", args.full_sequence_steps, low=1)
    number("--guidance_scale", args.guidance_scale, low=0)
    if args.guidance_scale != 1.0 and args.full_sequence_steps is None:
        raise ValueError(
            f"--guidance_scale {args.guidance_scale} applies to full-sequence sampling only: add "
            "--full_sequence_steps (a streaming generator samples unguided)"
        )
    if args.negative_prompt and args.guidance_scale == 1.0:
        raise ValueError(
            f"--negative_prompt {args.negative_prompt!r} is the unconditional prompt of guided sampling: add "
            "--guidance_scale (1, the default, samples unguided)"
        )
    frame_rate("--video_fps", args.video_fps)
    if args.latent_size is not None:
        for side in args.latent_size:
            whole("--latent_size", side, low=1)
    if args.demo_models and (args.text_encoder is not None or args.vae is not None):
        given = " and ".join(f for f, v in (("--text_encoder", args.text_encoder), ("--vae", args.vae)) if v)
        raise ValueError(f"--demo_models true takes the demo dataset's text encoder and VAE: drop {given} or it")


def config_protocol(path: str) -> dict[str, Any] | None:
    """The protocol of a training config's LongVideoEvaluation callback, if it has one."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("LongVideoEvaluation"):
            return (callback.get("init_args") or {}).get("protocol")
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.config is not None and (protocol := config_protocol(first.config)) is not None:
        argv = ["--protocol", json.dumps(protocol), *argv]  # flags given after it still win
    args = parser.instantiate(parser.parse_args(argv))
    check_args(args)
    recipe = recipe_from_config(args.config) if args.config else recipe_from_checkpoint(args.checkpoint) or Recipe()
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype, "bfloat16" if device.type == "cuda" else "float32")
    text_path, text_len = args.text_encoder, args.text_len
    if args.demo_models:
        text_path = str(demo_dataset(DemoSpec()).root)
        text_len = DemoSpec().text_len if text_len is None else text_len
    spec = recipe.generator if args.config is not None else None
    model = load_generator(spec, args.checkpoint, args.checkpoint_key, dtype, device)
    text_dtype = None if args.dtype is None else dtype  # None: the config's text encoder keeps its own dtype
    text = load_text_encoder(recipe, text_path, None, text_len, text_dtype, device, dtype)
    vae = load_vae(args.vae, text_path, torch.float32, device)
    schedule = FlowMatchSchedule(recipe.timestep_shift)
    sampler = StreamingGenerator(model, schedule, list(recipe.denoising_steps), recipe.memory, recipe.context_timestep)
    latent_size = args.latent_size or recipe.latent_size
    if latent_size is None:
        raise SystemExit("error: the checkpoint records no latent size: pass --latent_size H W (latent pixels)")
    pipeline = StreamingVideoPipeline(sampler, text, vae, tuple(latent_size))
    evaluator = Evaluator(
        args.protocol, args.videos, args.video_fps, args.full_sequence_steps, args.guidance_scale, args.negative_prompt
    )
    warn_off_grid(evaluator.narratives, sampler.frames_per_chunk)
    with torch.no_grad():
        shard = evaluator.run_shard(pipeline)
    for model in (text, *evaluator.models()):
        if hasattr(model, "truncation_summary"):  # the count of cut prompts not named one by one
            model.truncation_summary()
    source = {"checkpoint": args.checkpoint, "checkpoint_key": args.checkpoint_key or "default (EMA generator)"}
    if args.full_sequence_steps is not None:
        source["sampling"] = f"bidirectional, {args.full_sequence_steps} Euler steps over each whole narrative"
        if args.guidance_scale != 1.0:
            source["sampling"] += f", guidance {args.guidance_scale} against {args.negative_prompt!r}"
    report, videos = assemble(evaluator.protocol_info(pipeline), source, evaluator.compute(), [shard])
    write_report(args.out, report, videos)
    print(f"{len(report['narratives'])} narratives, protocol {report['protocol']['id']} -> {args.out}/report.md")
    return report


if __name__ == "__main__":
    run_command(main)
