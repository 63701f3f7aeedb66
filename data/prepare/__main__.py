"""python -m data.prepare SOURCE ...: write shards (format v1, data/README.md) from the sources users bring."""

from __future__ import annotations

import argparse
import hashlib
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

from data.prepare import sources
from data.prepare.core import Encoders, prepare
from data.writer import ShardSink, parse_size
from memflow_train.checks import frame_rate, number, whole
from memflow_train.errors import run_command
from memflow_train.generation.narrative import warn_unused
from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import WanVAE, load_vae

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Arguments that do not change what is written: a resumed run may differ in them.
class SkippedFilesWarning(UserWarning):
    """Files of a source folder that preparation does not read (not a video, not a caption)."""


DEFAULT_FRAMES_PER_PROMPT = 40  # MemFlow's benchmark: 10 s per prompt at 16 fps
RUN_ONLY = {"overwrite", "progress", "quiet", "device", "batch_size", "min_latent_frames"}


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    out = p.add_argument_group("output")
    out.add_argument("--output", required=True, help="local folder, or a URL pattern with %%06d WebDataset can write")
    out.add_argument("--prefix", default="shard", help="shard name prefix in a folder (default: shard)")
    out.add_argument("--samples-per-shard", type=int, default=1000)
    out.add_argument("--shard-bytes", default="1G", help="start a new shard past this size, e.g. 500M (default: 1G)")
    out.add_argument("--progress", help="progress file (default: PREFIX-progress.json beside local shards)")
    out.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    enc = p.add_argument_group("precomputation")
    enc.add_argument("--text-encoder", help="Wan folder (text_encoder/ + tokenizer/), UMT5 folder, or 'tiny'")
    enc.add_argument("--tokenizer", help="tokenizer folder, if not beside the encoder")
    enc.add_argument("--text-len", type=int, default=512, help="tokens per prompt (Wan: 512)")
    enc.add_argument("--negative-prompt", help="also store this prompt's embedding in every sample")
    enc.add_argument("--vae", help="Wan folder (vae/ inside), VAE folder, or 'tiny'")
    enc.add_argument("--tiny-text-dim", type=int, default=16, help="width of the 'tiny' text encoder")
    enc.add_argument("--tiny-z-dim", type=int, default=4, help="latent channels of the 'tiny' VAE")
    enc.add_argument("--seed", type=int, default=0, help="seed of the 'tiny' models")
    enc.add_argument("--text-model-dtype", choices=DTYPES, default="bfloat16", help="text encoder dtype (Wan: bf16)")
    enc.add_argument("--vae-model-dtype", choices=DTYPES, default="float32", help="VAE dtype (Wan: float32)")
    enc.add_argument("--text-dtype", choices=DTYPES, default="bfloat16", help="stored embedding dtype")
    enc.add_argument("--latent-dtype", choices=DTYPES, default="bfloat16", help="stored latent dtype")
    enc.add_argument("--batch-size", type=int, default=8, help="items encoded together")
    enc.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description="Write WebDataset shards (format v1, see data/README.md), optionally with precomputed text "
        "embeddings and video latents. Started again with the same arguments, an interrupted run continues "
        "after its last completed shard.",
    )
    sub = parser.add_subparsers(dest="source", required=True)
    common = [_common()]
    p = sub.add_parser("prompts", parents=common, help="a text file, one prompt per line")
    p.add_argument("file")
    p.add_argument("--num-frames", type=int, help="latent frames of each narrative (default: the loader's)")
    p = sub.add_parser("switch", parents=common, help="two line-aligned files of prompts and their switch prompts")
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--num-frames", type=int)
    p.add_argument("--switch-frame", type=int, help="latent frame of the switch (default: the method picks)")
    p = sub.add_parser(
        "narratives",
        aliases=["benchmark"],
        parents=common,
        help="JSONL of {'prompts': [...]}, e.g. MemFlow's benchmark",
    )
    p.add_argument("file")
    p.add_argument(
        "--frames-per-prompt",
        type=int,
        help="latent frames per prompt of lines that fix no lengths (default: 40 = 10 s)",
    )
    p = sub.add_parser(
        "videos",
        parents=common,
        help="a folder of NAME.mp4 (.mov, .mkv, .webm, .avi, any case) with captions in NAME.txt",
    )
    p.add_argument("folder")
    p.add_argument(
        "--fps",
        type=float,
        help="drop frames to this rate (Wan: 16); a slower video keeps its own rate, with a warning (default: each "
        "video's own rate)",
    )
    p.add_argument("--height", type=int, help="resize (cover) and centre-crop to this height")
    p.add_argument("--width", type=int)
    p.add_argument("--max-frames", type=int, help="video frames to keep at most (Wan: 1 + 4k, e.g. 81)")
    p.add_argument(
        "--keep-video", action="store_true", help="store the processed clip as mp4 too, labelled with its true rate"
    )
    p.add_argument(
        "--min-latent-frames", type=int, default=3, help="warn about clips shorter than this (one chunk; default 3)"
    )
    return parser


# Whole-number options and their smallest honourable value (a missing option is None: the default applies).
COUNTS = {
    "samples_per_shard": 1, "text_len": 1, "tiny_text_dim": 1, "tiny_z_dim": 1, "seed": 0, "batch_size": 1,
    "num_frames": 1, "switch_frame": 1, "frames_per_prompt": 1, "max_frames": 1, "min_latent_frames": 1,
}  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """Refuse option values that cannot be honoured exactly (before any model loads or shard is written)."""
    try:
        for key, low in COUNTS.items():
            if getattr(args, key, None) is not None:
                whole("--" + key.replace("_", "-"), getattr(args, key), low=low)
        if getattr(args, "fps", None) is not None:
            number("--fps", args.fps, low=0, low_open=True)
            if args.keep_video:  # the stored mp4s say this rate: exactly
                frame_rate("--fps", args.fps)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def _items(args: argparse.Namespace) -> tuple[object, int | None]:
    if args.source == "prompts":
        items = sources.prompt_file(args.file, args.num_frames)
    elif args.source == "switch":
        items = sources.switch_pairs(args.first, args.second, args.num_frames, args.switch_frame)
    elif args.source in ("narratives", "benchmark"):
        unused: list[tuple[str, str]] = []
        given = args.frames_per_prompt
        items = sources.narrative_jsonl(args.file, DEFAULT_FRAMES_PER_PROMPT if given is None else given, unused)
        if given is not None:  # given: say where the lines' own lengths win
            warn_unused(unused, {"frames_per_prompt": ("--frames-per-prompt", given)})
    else:
        if (args.height is None) != (args.width is None):
            raise SystemExit("--height and --width go together")
        if args.height is not None and (args.height % 16 or args.width % 16 or min(args.height, args.width) < 16):
            raise SystemExit(
                f"error: --height and --width must be positive multiples of 16 (the VAE's stride 8 times the "
                f"transformer's patch 2: latents of odd sizes cannot be trained), got {args.height}x{args.width}"
            )
        size = (args.height, args.width) if args.height else None
        videos, others = sources.list_videos(args.folder)
        if others:
            kinds = Counter(p.suffix.lower() or p.name for p in others)
            warnings.warn(
                f"{args.folder}: skipping {len(others)} files that are neither a video ({', '.join(sources.VIDEO_SUFFIXES)}"
                f") nor a video's caption: {', '.join(f'{k} x{n}' for k, n in kinds.most_common())} (first: "
                f"{others[0].relative_to(args.folder)})",
                SkippedFilesWarning,
                stacklevel=2,
            )
        return sources.video_folder(args.folder, args.fps, size, args.max_frames, videos), len(videos)
    return items, len(items)


def source_digest(args: argparse.Namespace) -> str:
    """What the source holds now: file contents, or every video's path, size and time in a folder. A progress
    file records it, so a resumed run refuses a source that changed (appended prompts, new videos)."""
    digest = hashlib.sha256()
    if args.source == "videos":
        for path in sorted(Path(args.folder).rglob("*")):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.relative_to(args.folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        for name in ("file", "first", "second"):
            if getattr(args, name, None):
                digest.update(Path(getattr(args, name)).read_bytes())
    return digest.hexdigest()


def _encoders(args: argparse.Namespace) -> Encoders:
    text_dtype, vae_dtype = DTYPES[args.text_model_dtype], DTYPES[args.vae_model_dtype]
    text = vae = None
    if args.text_encoder == "tiny":
        text = WanTextEncoder.tiny(d_model=args.tiny_text_dim, text_len=args.text_len, seed=args.seed)
    elif args.text_encoder:
        text = WanTextEncoder.from_pretrained(args.text_encoder, args.tokenizer, args.text_len, text_dtype)
    if args.vae == "tiny":
        vae = WanVAE.tiny(z_dim=args.tiny_z_dim, seed=args.seed)
    elif args.vae:
        vae = load_vae(args.vae, vae_dtype)
    if args.source != "videos" and vae is not None:
        raise SystemExit("--vae needs video: use it with the videos source")
    if args.negative_prompt and text is None:
        raise SystemExit("--negative-prompt needs --text-encoder")
    text = text.to(args.device, text_dtype) if text is not None else None
    vae = vae.to(args.device, vae_dtype) if vae is not None else None
    return Encoders(
        text=text,
        vae=vae,
        negative_prompt=args.negative_prompt,
        keep_video=getattr(args, "keep_video", False),
        fps=16.0 if getattr(args, "fps", None) is None else args.fps,
        batch_size=args.batch_size,
        text_dtype=DTYPES[args.text_dtype],
        latent_dtype=DTYPES[args.latent_dtype],
        min_latent_frames=getattr(args, "min_latent_frames", 3),
    )


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.source == "benchmark":
        args.source = "narratives"
    options = {k: v for k, v in sorted(vars(args).items()) if k not in RUN_ONLY}
    if args.source == "narratives" and options["frames_per_prompt"] is None:
        options["frames_per_prompt"] = DEFAULT_FRAMES_PER_PROMPT  # as recorded before it had no default
    for key in ("file", "first", "second", "folder"):
        if options.get(key):
            options[key] = str(Path(options[key]).resolve())
    items, total = _items(args)
    if total == 0:
        source = options.get("file") or options.get("folder") or f"{options.get('first')} / {options.get('second')}"
        raise SystemExit(f"error: {source} holds no items to prepare")
    options["source_digest"] = source_digest(args)
    sink = ShardSink(
        args.output,
        options,
        max_samples=args.samples_per_shard,
        max_bytes=parse_size(args.shard_bytes),
        progress=args.progress,
        prefix=args.prefix,
        overwrite=args.overwrite,
    )
    urls = sink.urls if sink.done else prepare(items, sink, _encoders(args), total, progress=not args.quiet)
    print(urls)
    return urls


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
