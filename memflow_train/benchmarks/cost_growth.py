"""Per-chunk streaming cost against history length (up to ~1000 latent frames), a column per memory policy.

The measurement is memory_overhead's (one chunk = the denoising forwards + the cache write, the
history written through the real cache protocol), at chunk indices spanning a long video, all
variants and positions interleaved in every repeat. A streaming generator whose cost grew with
history would show it here; the NAM bank fills over its first record_interval * bank_size chunks
after the window, then the attended frames stay fixed; the surprise-gated bank and the slow-fast memory hold at
most their budget. Columns: memory_overhead's VARIANTS (off = MemoryFree, nam, nam_sma, surprise =
SurpriseGatedBank, slow_fast = SlowFastMemory).

    python -m memflow_train.benchmarks.cost_growth --num-layers 1 --chunks 5 12 60 332
"""

from __future__ import annotations

import argparse

from memflow_train.benchmarks.common import publish
from memflow_train.benchmarks.memory_overhead import build_parser, check_args, run
from memflow_train.errors import run_command


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    n = args.frames_per_chunk
    print(
        f"preset {args.preset}, {args.num_layers} blocks, {args.height}x{args.width} px, {n} frames/chunk, "
        f"{args.steps} denoising steps + 1 cache write per chunk, {args.dtype} on {args.device}, "
        f"{args.statistic} of {args.repeats}; s/chunk (attended frames) and change vs chunk {min(args.chunks)}"
    )
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    print("| chunk | history (latent frames) | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    by = {(r["variant"], r["chunk"]): r for r in rows}
    for chunk in sorted(args.chunks):
        cells = []
        for v in variants:
            r = by[(v, chunk)]
            cells.append(f"{r['seconds_per_chunk']:.3f} ({r['attended_frames']}) {r['vs_first_chunk']:+.1%}")
        print(f"| {chunk} | {chunk * n} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser(__doc__)
    parser.set_defaults(
        chunks=[5, 12, 60, 332],
        history_pool=4,
        statistic="min",
        variants=["off", "nam", "nam_sma", "surprise", "slow_fast"],
    )
    args = parser.parse_args(argv)
    check_args(args)
    return publish(run(args), args, print_table)


if __name__ == "__main__":
    run_command(main)
