"""Attention kernels side by side on the streaming chunk attention: SDPA, compiled FlexAttention, and
FlashAttention 2 where flash-attn is installed (CUDA); "sdpa_flash" (SDPA with its flash kernel forced) on request.

One call = one layer's self-attention of a chunk: queries of frames_per_chunk frames against the keys
the cache assembles (no mask: they are exactly the visible keys), e.g. 12 frames memory-free or with
SMA, 15 with NAM (sink 3 + bank 3 + window 9). Every repeat runs all (backend, keys) cases in a fresh
seeded order. "first call" is the first call's time: compilation for flex.

    python -m memflow_train.benchmarks.attention_backends --key-frames 12 15
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import shutil
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from memflow_train.benchmarks.common import add_measurement_args, check_counts, latent_grid, publish, summarize, sync
from memflow_train.errors import run_command
from memflow_train.models import fused_attention
from memflow_train.models.attention import get_attention_backend, register_attention_backend
from memflow_train.models.presets import wan_config


def sdpa_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA with its FlashAttention kernel forced: an error, not a silent fallback, where that kernel cannot run."""
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


register_attention_backend("sdpa_flash", sdpa_flash_attention)


def backend_status(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> dict[str, str | None]:
    """Every attention backend this benchmark knows -> None where it can run on device in dtype, else why not.

    sdpa_flash is probed with one small call (cheap); flex and flash are judged by what they need (compiling
    flex to probe it costs seconds to minutes): flex a compiler for torch.compile (triton on CUDA, a C++
    compiler on CPU), flash the flash-attn package, CUDA and fp16/bf16."""
    status: dict[str, str | None] = {"sdpa": None}
    q = torch.zeros(1, heads, 16, head_dim, device=device, dtype=dtype)
    try:
        sdpa_flash_attention(q, q, q)
        status["sdpa_flash"] = None
    except RuntimeError as err:
        status["sdpa_flash"] = f"SDPA's flash kernel refuses {dtype} on {device.type}: {str(err).splitlines()[0]}"
    if device.type == "cuda":
        status["flex"] = None if importlib.util.find_spec("triton") else "torch.compile needs triton on CUDA"
    else:
        compilers = ("g++", "clang++", "c++")
        found = any(shutil.which(c) for c in compilers)
        status["flex"] = None if found else f"torch.compile on CPU needs a C++ compiler ({', '.join(compilers)})"
    if not fused_attention.FLASH_AVAILABLE:
        status["flash"] = "the flash-attn package is not installed"
    elif device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        status["flash"] = f"flash-attn runs on CUDA in float16/bfloat16, not {dtype} on {device.type}"
    else:
        status["flash"] = None
    return status


def _timed(fn, *args) -> tuple[torch.Tensor, float]:  # noqa: ANN001
    device = args[0].device
    sync(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = wan_config(args.preset)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    lh, lw = latent_grid(args.preset, args.height, args.width)
    tpf = (lh // config["patch_size"][1]) * (lw // config["patch_size"][2])
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(frames: int) -> torch.Tensor:
        return torch.randn(1, heads, frames * tpf, head_dim, generator=gen).to(device, dtype)

    q = randn(args.frames_per_chunk)
    kv = {f: (randn(f), randn(f)) for f in args.key_frames}
    cases = [(b, f) for b in args.backends for f in args.key_frames]
    reference = {f: get_attention_backend("sdpa")(q, *kv[f]).float() for f in args.key_frames}
    first, diff, times = {}, {}, {c: [] for c in cases}
    with torch.no_grad():
        for b, f in cases:
            out, first[(b, f)] = _timed(get_attention_backend(b), q, *kv[f])
            diff[(b, f)] = (out.float() - reference[f]).abs().max().item()
        order, shuffler = list(cases), random.Random(0)
        for _ in range(args.repeats):
            shuffler.shuffle(order)
            for b, f in order:
                times[(b, f)].append(_timed(get_attention_backend(b), q, *kv[f])[1])
    rows = []
    for b, f in cases:
        seconds = summarize(times[(b, f)], args.statistic)
        rows.append(
            {
                "backend": b,
                "key_frames": f,
                "query_tokens": q.shape[2],
                "key_tokens": f * tpf,
                "seconds": seconds,
                "tflops": 4 * q.shape[2] * f * tpf * heads * head_dim / seconds / 1e12,
                "max_abs_diff_vs_sdpa": diff[(b, f)],
                "first_call_seconds": first[(b, f)],
                "repeats": times[(b, f)],
            }
        )
    base = {r["key_frames"]: r["seconds"] for r in rows if r["backend"] == "sdpa"}
    for r in rows:
        r["vs_sdpa"] = r["seconds"] / base[r["key_frames"]] - 1 if r["key_frames"] in base else None
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    r0 = rows[0]
    print(
        f"{args.preset} attention layout, {r0['query_tokens']} query tokens ({args.frames_per_chunk} frames of "
        f"{args.height}x{args.width} px), {args.dtype} on {args.device}, {args.statistic} of {args.repeats}"
    )
    print("| backend | key frames | ms/call | TFLOP/s | vs sdpa | max abs diff vs sdpa | first call s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs = "" if r["vs_sdpa"] is None else f"{r['vs_sdpa']:+.1%}"
        print(
            f"| {r['backend']} | {r['key_frames']} | {r['seconds'] * 1e3:.1f} | {r['tflops']:.3f} | {vs} "
            f"| {r['max_abs_diff_vs_sdpa']:.1e} | {r['first_call_seconds']:.1f} |"
        )


def check_args(args: argparse.Namespace) -> None:
    """Refuse what the measurement cannot honour, before any work: sizes off the latent grid, counts below 1,
    key frames fewer than the chunk's own frames (the keys include them)."""
    check_counts(args, {"frames_per_chunk": 1, "key_frames": 1})
    latent_grid(args.preset, args.height, args.width)
    short = [f for f in args.key_frames if f < args.frames_per_chunk]
    if short:
        raise ValueError(
            f"--key-frames {short} fewer than --frames-per-chunk {args.frames_per_chunk}: the attended frames "
            "include the chunk's own"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    default_backends = ["sdpa", "flex"] + (["flash"] if cuda and fused_attention.FLASH_AVAILABLE else [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b", help="heads and head dim")
    p.add_argument("--height", type=int, default=480, help="video height in pixels (latent = /8)")
    p.add_argument("--width", type=int, default=832, help="video width in pixels (latent = /8)")
    p.add_argument("--frames-per-chunk", type=int, default=3)
    p.add_argument("--key-frames", type=int, nargs="+", default=[12, 15], help="frames attended (incl. the chunk)")
    p.add_argument("--backends", nargs="+", default=default_backends)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16", "float16"])
    add_measurement_args(p, repeats=5)
    args = p.parse_args(argv)
    check_args(args)
    if "sdpa" not in args.backends:
        args.backends.insert(0, "sdpa")  # the reference
    return publish(run(args), args, print_table)


if __name__ == "__main__":
    run_command(main)
