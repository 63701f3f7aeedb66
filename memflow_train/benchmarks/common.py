"""What every benchmark command shares: device synchronisation, the repeat statistic, the measurement
flags, and the output (a Markdown table on stdout, the rows and arguments as JSON)."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

from memflow_train.generation.pipeline import synchronize as sync

__all__ = ["add_measurement_args", "publish", "summarize", "sync"]


def add_measurement_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument(
        "--statistic",
        choices=["median", "min"],
        default="median",
        help="of the repeats; min suits a shared machine (interference only adds time)",
    )
    parser.add_argument("--json", default=None, help="write the arguments and rows here")


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
