"""python -m data.synthetic {demo,narratives,permanence,permanence-world}: build the demo dataset, write evaluation
narrative sets (random narratives, or the object-permanence benchmark's leave-and-re-enter narratives), or build
the object-permanence world the study trains on."""

from __future__ import annotations

import argparse
from pathlib import Path

from data.synthetic.autoencoder import AutoencoderSpec
from data.synthetic.demo import DemoSpec, demo_dataset
from data.synthetic.permanence_data import PermanenceSpec, build_permanence_world, permanence_root
from data.synthetic.world import COLOURS, narratives_jsonl, permanence_jsonl


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
    perm = sub.add_parser(
        "permanence",
        help="write object-permanence narratives (narratives' format): a companion throughout, a target that "
        "enters after the opening segment, leaves and re-enters; captions never name its size or marking",
    )
    perm.add_argument("--out", required=True, help="JSONL file to write")
    perm.add_argument("--count", type=int, default=100)
    perm.add_argument("--lead-frames", type=int, default=6, help="latent frames before the target enters")
    perm.add_argument("--present-frames", type=int, default=6, help="latent frames of each appearance")
    perm.add_argument(
        "--away-frames", type=int, default=12, help="latent frames away; longer than the generator's window"
    )
    perm.add_argument("--returns", type=int, default=2)
    perm.add_argument("--seed", type=int, default=0)
    world = sub.add_parser(
        "permanence-world",
        help="build the object-permanence world the study trains on (autoencoder, text encoder, shards, benchmark "
        "narratives) in --root, or finish building it",
    )
    world.add_argument("--root", help="default: $MEMFLOW_TRAIN_CACHE/permanence-v<version>-<digest of the settings>")
    world.add_argument("--teacher-clips", type=int, help=f"default {PermanenceSpec.teacher_clips}")
    world.add_argument("--student-clips", type=int, help=f"default {PermanenceSpec.student_clips}")
    world.add_argument("--long-narratives", type=int, help=f"default {PermanenceSpec.long_narratives}")
    world.add_argument("--benchmark-narratives", type=int, help=f"default {PermanenceSpec.benchmark_narratives}")
    world.add_argument("--benchmark-returns", type=int, help=f"default {PermanenceSpec.benchmark_returns}")
    world.add_argument(
        "--whitening",
        type=float,
        help=f"the autoencoder's latent scaling, 0 (one scale) to 1 (unit variance per channel); default "
        f"{AutoencoderSpec.whitening}",
    )
    args = parser.parse_args(argv)
    if args.command == "permanence-world":
        keys = ("teacher_clips", "student_clips", "long_narratives", "benchmark_narratives", "benchmark_returns")
        try:
            options = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
            if args.whitening is not None:
                options["autoencoder"] = AutoencoderSpec(whitening=args.whitening)
            spec = PermanenceSpec(**options)
        except ValueError as error:
            parser.error(str(error))
        built = build_permanence_world(spec, permanence_root(spec, args.root))
        print(f"root: {built.root}\nbenchmark: {built.benchmark}")
        for split, urls in built.urls.items():
            print(f"{split}_urls: {urls}")
        return
    if getattr(args, "count", 1) < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    if getattr(args, "seed", 0) < 0:  # random.Random takes |seed|: -5 would draw what 5 draws
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.command == "narratives":
        for flag, value in (("--segments", args.segments), ("--frames-per-segment", args.frames_per_segment)):
            if value < 1:
                parser.error(f"{flag} must be >= 1, got {value}")
        if not 1 <= args.subjects <= len(COLOURS):
            parser.error(f"--subjects must be 1 to {len(COLOURS)} (one colour each), got {args.subjects}")
    if args.command == "demo":
        data = demo_dataset(DemoSpec(), args.cache_dir)
        print(f"root: {data.root}\ntrain_urls: {data.train_urls}\nval_urls: {data.val_urls}")
    else:
        if args.command == "narratives":
            lines = narratives_jsonl(args.count, [args.frames_per_segment] * args.segments, args.seed, args.subjects)
        else:
            try:
                lines = permanence_jsonl(
                    args.count, args.lead_frames, args.present_frames, args.away_frames, args.returns, args.seed
                )
            except ValueError as error:
                parser.error(str(error))
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} narratives -> {args.out}")


if __name__ == "__main__":
    main()
