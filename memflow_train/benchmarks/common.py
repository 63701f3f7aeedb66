"""What every benchmark command shares: device synchronisation, the repeat statistic, the measurement
flags, and the output (a Markdown table on stdout, the rows and arguments as JSON)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from memflow_train.checks import whole
from memflow_train.generation.pipeline import synchronize as sync
from memflow_train.models.causal_wan import CausalWanTransformer, cast_keeping_fp32
from memflow_train.models.presets import wan_config

__all__ = [
    "VAE_STRIDE",
    "VAE_TEMPORAL_STRIDE",
    "add_measurement_args",
    "build_backbone",
    "check_counts",
    "error_text",
    "latent_grid",
    "publish",
    "repeat_within",
    "summarize",
    "sync",
]

VAE_STRIDE = 8  # Wan's VAE: pixels per latent pixel
VAE_TEMPORAL_STRIDE = 4  # Wan's VAE: video frames per latent frame (the first latent frame decodes to 1)


def add_measurement_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument(
        "--statistic",
        choices=["median", "min"],
        default="median",
        help="of the repeats; min suits a shared machine (interference only adds time)",
    )
    parser.add_argument("--json", default=None, help="write the arguments and rows here")


def check_counts(args: argparse.Namespace, lowest: dict[str, int]) -> None:
    """Each named whole-number option (None: unset) at least its lowest value, plus --repeats >= 1; ValueError
    naming the flag otherwise (a run of 0 repeats has no statistic)."""
    for name, low in {"repeats": 1, **lowest}.items():
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                whole("--" + name.replace("_", "-"), v, low=low)


def latent_grid(preset: str, height: int, width: int) -> tuple[int, int]:
    """The latent (height, width) of a video size; sizes that are not multiples of the VAE stride times the
    preset's patch are refused, naming that multiple (they used to be floored: 100x100 measured 96x96)."""
    patch = wan_config(preset)["patch_size"]
    for name, pixels, p in (("--height", height, patch[1]), ("--width", width, patch[2])):
        step = VAE_STRIDE * p
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < step or pixels % step:
            raise ValueError(
                f"{name} must be a positive multiple of {step} (VAE stride {VAE_STRIDE} x patch {p}), got {pixels}"
            )
    return height // VAE_STRIDE, width // VAE_STRIDE


def summarize(seconds: list[float], statistic: str) -> float:
    return statistics.median(seconds) if statistic == "median" else min(seconds)


def repeat_within(deadline: float, max_repeats: int, once: Callable[[int], None]) -> int:
    """once(r) for r = 0, 1, ... up to max_repeats, stopping before a repeat that would end past deadline (a
    time.perf_counter() value) if it took as long as the previous one; the first always runs. Returns how many ran."""
    last = 0.0
    for r in range(max_repeats):
        start = time.perf_counter()
        if r and start + last > deadline:
            return r
        once(r)
        last = time.perf_counter() - start
    return max_repeats


def build_backbone(preset: str, seed: int, device: torch.device, dtype: torch.dtype) -> CausalWanTransformer:
    """The preset's whole network in eval mode, weights seeded by seed, built on device and cast to dtype (norms,
    time embedder and modulation tables stay fp32, as Wan keeps them)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalWanTransformer(**wan_config(preset))
    return cast_keeping_fp32(model, dtype).eval()


def error_text(err: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    first = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def publish(
    rows: list[dict], args: argparse.Namespace, print_table: Callable[[list[dict], argparse.Namespace], None]
) -> list[dict]:
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows
