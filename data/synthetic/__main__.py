"""python -m data.synthetic {demo,narratives}: build the demo dataset, or write evaluation narrative sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from data.synthetic.demo import DemoSpec, demo_dataset
from data.synthetic.world import narratives_jsonl


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate the demo dataset (if missing) and print its folder and shard URLs")
    demo.add_argument("--cache-dir", help="default: $MEMFLOW_TRAIN_CACHE or ~/.cache/memflow_train")
    nar = sub.add_parser(
        "narratives",
        help="write narratives as JSON lines: the MemFlow benchmark's {'prompts': [...]} plus switch_frames, "
        "num_frames and the world that renders their ground truth (feed them to `python -m data.prepare narratives`)",
    )
    nar.add_argument("--out", required=True, help="JSONL file to write")
    nar.add_argument("--count", type=int, default=100)
    nar.add_argument("--segments", type=int, default=6, help="prompts per narrative")
    nar.add_argument("--frames-per-segment", type=int, default=40, help="latent frames per prompt (40 = 10 s)")
    nar.add_argument("--subjects", type=int, default=3)
    nar.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        data = demo_dataset(DemoSpec(), args.cache_dir)
        print(f"root: {data.root}\ntrain_urls: {data.train_urls}\nval_urls: {data.val_urls}")
    else:
        lines = narratives_jsonl(args.count, [args.frames_per_segment] * args.segments, args.seed, args.subjects)
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} narratives -> {args.out}")


if __name__ == "__main__":
    main()
