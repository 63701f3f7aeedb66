"""python -m data.benchmark: training-loader throughput (samples/s) on prompt-only or latent shards.

Without --urls it first writes random shards of the given sizes (default: Wan2.1 1.3B at 480x832, 21 latent
frames, ~120-token captions embedded by UMT5-XXL) into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from data.datamodule import ShardDataModule
from data.format import Sample
from data.writer import ShardSink


def write_random_shards(
    folder: str, kind: str, samples: int, per_shard: int, text_dim: int, tokens: int, latent_shape: list[int]
) -> str:
    """Random bf16 samples with one caption each, plus latents for kind='latents'; returns the brace pattern."""
    gen = torch.Generator().manual_seed(0)
    sink = ShardSink(folder, {"benchmark": kind}, max_samples=per_shard)
    for i in range(samples):
        text = [torch.randn(tokens, text_dim, generator=gen).to(torch.bfloat16)]
        latents = torch.randn(latent_shape, generator=gen).to(torch.bfloat16) if kind == "latents" else None
        sink.write(i, Sample(f"{i:08d}", [f"prompt {i}"], num_frames=latent_shape[1], text=text, latents=latents))
    return sink.close()


def measure(dm: ShardDataModule, batches: int) -> dict[str, float]:
    """Time to the first batch (worker start, shuffle buffer fill) and samples/s over the following batches."""
    dm.setup("fit")
    start = time.perf_counter()
    it = iter(dm.train_dataloader())
    first = next(it)
    ready = time.perf_counter()
    n = 0
    for _, batch in zip(range(batches), it, strict=False):
        n += len(batch)
    end = time.perf_counter()
    return {"first_batch_s": ready - start, "samples": n, "samples_per_s": n / (end - ready), "batch": len(first)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python -m data.benchmark", description=__doc__)
    p.add_argument("--kind", choices=["prompts", "latents"], default="prompts")
    p.add_argument("--urls", help="existing shards to read (otherwise random ones are written)")
    p.add_argument("--fields", nargs="+", help="fields to load (default: text, plus latents for --kind latents)")
    p.add_argument("--samples", type=int, default=256, help="random samples to write")
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=120)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--latent-shape", type=int, nargs=4, default=[16, 21, 60, 104], metavar=("C", "T", "H", "W"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=50, help="batches timed after the first")
    p.add_argument("--shuffle-buffer", type=int, default=100)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        urls = args.urls or write_random_shards(
            tmp, args.kind, args.samples, args.per_shard, args.text_dim, args.tokens, args.latent_shape
        )
        fields = args.fields or (["text", "latents"] if args.kind == "latents" else ["text"])
        dm = ShardDataModule(
            train_urls=urls,
            fields=fields,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            batches_per_epoch=args.batches + 1,
            shuffle_buffer=args.shuffle_buffer,
            text_len=args.text_len,
        )
        source = args.urls or f"random {args.kind} shards"
        result = {"shards": source, "fields": fields, "num_workers": args.num_workers, **measure(dm, args.batches)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
