"""What every benchmark command shares: device synchronisation, the repeat statistic, the measurement
flags, and the output (a Markdown table on stdout, the rows and arguments as JSON)."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

from memflow_train.checks import whole
from memflow_train.generation.pipeline import synchronize as sync
from memflow_train.models.presets import wan_config

__all__ = ["VAE_STRIDE", "add_measurement_args", "check_counts", "latent_grid", "publish", "summarize", "sync"]

VAE_STRIDE = 8  # Wan's VAE: pixels per latent pixel


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


def publish(
    rows: list[dict], args: argparse.Namespace, print_table: Callable[[list[dict], argparse.Namespace], None]
) -> list[dict]:
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows
