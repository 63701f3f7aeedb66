"""Per-chunk streaming cost of each memory policy (off, NAM, NAM+SMA, surprise-gated, slow-fast), side by side.

One chunk = `steps` denoising forwards that read the cache + the clean re-run that writes it,
exactly the generation loop. The history before the measured chunk is written through the real
cache protocol (prepare / append, bank recording and retrieval) with random keys/values of the
right shapes, so chunk 60 is measurable without generating 59 chunks first; the measured chunk
itself runs the full transformer. Every repeat runs all variants in a fresh seeded random order, so
drift and position effects hit all alike.

`off_nam_keys` (memory off, window widened by bank_size frames) attends as many keys as NAM with a
full bank: the column "vs memory-free, same keys" separates what the memory's own work costs from
what attending more frames costs.

    python -m memflow_train.benchmarks.memory_overhead --num-layers 2 --chunks 5 60
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace

import torch

from memflow_train.benchmarks.common import add_measurement_args, check_counts, latent_grid, publish, summarize, sync
from memflow_train.errors import run_command
from memflow_train.memory import NAM, MemoryFree, SlowFastMemory, StreamingKVCache, SurpriseGatedBank
from memflow_train.models.attention import register_attention_backend, sdpa_attention
from memflow_train.models.causal_wan import CausalWanTransformer, TextContext, cast_keeping_fp32
from memflow_train.models.presets import wan_config

_MEMORY = NAM()
VARIANTS = {  # memory policies (memflow_train.memory), each at its defaults
    "off": MemoryFree(),
    "nam": NAM(),
    "nam_sma": NAM(sma=True),
    "surprise": SurpriseGatedBank(),
    "slow_fast": SlowFastMemory(),
    # Memory-free with the window widened by the bank's frames: as many keys as NAM with a full bank,
    # so NAM against it is the cost of the memory's own work (recording, retrieval, K/V assembly).
    "off_nam_keys": MemoryFree(local_attn_size=_MEMORY.local_attn_size + _MEMORY.bank_size),
}


def fill_history(
    cache: StreamingKVCache, text: TextContext, chunks: int, kv_shape: tuple[int, ...], pool: int = 0
) -> None:
    """Write `chunks` chunks of random keys/values through the cache protocol.

    pool > 0 cycles through that many random chunks per layer instead of drawing every chunk afresh
    (drawing is slow on CPU; long histories then fill in seconds, with the same cache work).
    """
    n = cache.config.num_frame_per_block
    texts = [text.layer(i) for i in range(len(cache))]
    gen = torch.Generator(device="cpu").manual_seed(0)
    drawn: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for c in range(chunks):
        cache.prepare(c * n, n, texts)
        for i, layer in enumerate(cache.layers):
            slot = (i, c % pool) if pool > 0 else None
            if slot in drawn:
                k, v = drawn[slot]
            else:
                k = torch.randn(kv_shape, generator=gen).to(text.keys[i])
                v = torch.randn(kv_shape, generator=gen).to(text.keys[i])
                if slot is not None:
                    drawn[slot] = (k, v)
            layer.append(k, v, c * n, n, texts[i])


def run(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.num_layers is None:  # on GPU: the whole network
        args.num_layers = wan_config(args.preset)["num_layers"]
    config = wan_config(args.preset, num_layers=args.num_layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = cast_keeping_fp32(CausalWanTransformer(**config), dtype).eval()
    lh, lw = latent_grid(args.preset, args.height, args.width)
    tpf = (lh // config["patch_size"][1]) * (lw // config["patch_size"][2])
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]

    keys_seen: list[int] = []

    def counting_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys_seen.append(k.shape[2])
        return sdpa_attention(q, k, v)

    register_attention_backend("benchmark-counting", counting_sdpa)
    model.set_attention_backend("benchmark-counting")

    with torch.no_grad():
        text = model.encode_text(torch.randn(1, args.text_len, config["text_dim"], device=device, dtype=dtype))
        caches: dict[tuple[str, int], tuple[StreamingKVCache, dict]] = {}
        for name in args.variants:
            mem = replace(VARIANTS[name], num_frame_per_block=args.frames_per_chunk)
            for chunk in args.chunks:
                cache = model.new_kv_cache(mem)
                kv_shape = (1, heads, args.frames_per_chunk * tpf, head_dim)
                fill_history(cache, text, chunk, kv_shape, getattr(args, "history_pool", 0))
                caches[(name, chunk)] = (cache, cache.state_dict())

        n = args.frames_per_chunk
        noisy = torch.randn(1, config["in_channels"], n, lh, lw, device=device, dtype=dtype)
        timesteps = torch.linspace(1000, 250, args.steps, device=device)
        times: dict[tuple[str, int], list[float]] = {key: [] for key in caches}
        attended: dict[tuple[str, int], int] = {}
        order = list(caches)
        shuffler = random.Random(0)
        for _ in range(args.repeats):
            shuffler.shuffle(order)
            for key in order:
                cache, snapshot = caches[key]
                cache.load_state_dict(snapshot)
                keys_seen.clear()
                sync(device)
                start = time.perf_counter()
                for t in timesteps:
                    model.forward_chunk(noisy, t[None], text, cache)
                model.forward_chunk(noisy, torch.zeros(1, device=device), text, cache, update_cache=True)
                sync(device)
                times[key].append(time.perf_counter() - start)
                attended[key] = max(keys_seen) // tpf

    rows = []
    for (name, chunk), ts in times.items():
        cache, _ = caches[(name, chunk)]
        seconds = summarize(ts, args.statistic)
        rows.append(
            {
                "variant": name,
                "chunk": chunk,
                "seconds_per_chunk": seconds,
                "frames_per_second": n / seconds,
                "attended_frames": attended[(name, chunk)],
                "cache_mib": cache.nbytes() / 2**20,
                "repeats": ts,
            }
        )
    base = {r["chunk"]: r["seconds_per_chunk"] for r in rows if r["variant"] == "off"}
    first = {r["variant"]: r["seconds_per_chunk"] for r in rows if r["chunk"] == min(args.chunks)}
    memory_free = {
        (r["chunk"], r["attended_frames"]): r["seconds_per_chunk"] for r in rows if not VARIANTS[r["variant"]].enabled
    }
    for r in rows:
        r["vs_off"] = r["seconds_per_chunk"] / base[r["chunk"]] - 1 if r["chunk"] in base else None
        r["vs_first_chunk"] = r["seconds_per_chunk"] / first[r["variant"]] - 1
        same_keys = memory_free.get((r["chunk"], r["attended_frames"]))
        own = VARIANTS[r["variant"]].enabled and same_keys is not None
        r["vs_memory_free_same_keys"] = r["seconds_per_chunk"] / same_keys - 1 if own else None
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"preset {args.preset}, {args.num_layers} blocks, {args.height}x{args.width} px, "
        f"{args.frames_per_chunk} frames/chunk, {args.steps} denoising steps + 1 cache write per chunk, "
        f"{args.dtype} on {args.device}, {args.statistic} of {args.repeats}"
    )
    print(
        "| variant | chunk | s/chunk | latent frames/s | attended frames | cache MiB | vs off "
        "| vs memory-free, same keys | vs first chunk |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs_off, same = ("" if r[key] is None else f"{r[key]:+.1%}" for key in ("vs_off", "vs_memory_free_same_keys"))
        print(
            f"| {r['variant']} | {r['chunk']} | {r['seconds_per_chunk']:.3f} | {r['frames_per_second']:.2f} "
            f"| {r['attended_frames']} | {r['cache_mib']:.0f} | {vs_off} | {same} | {r['vs_first_chunk']:+.1%} |"
        )


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument(
        "--num-layers",
        type=int,
        default=None if torch.cuda.is_available() else 2,
        help="transformer blocks of the preset's width and heads (default: 2 on CPU, all on GPU)",
    )
    parser.add_argument("--height", type=int, default=480, help="video height in pixels (latent = /8)")
    parser.add_argument("--width", type=int, default=832, help="video width in pixels (latent = /8)")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--frames-per-chunk", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per chunk")
    parser.add_argument("--chunks", type=int, nargs="+", default=[5, 60], help="chunk indices to measure")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--history-pool", type=int, default=0, help="cycle this many random history chunks (0: all fresh)"
    )
    add_measurement_args(parser, repeats=3)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse what the measurement cannot honour, before any work (memory_overhead and cost_growth)."""
    lowest = {"num_layers": 1, "text_len": 1, "frames_per_chunk": 1, "steps": 1, "chunks": 0, "history_pool": 0}
    check_counts(args, lowest)
    latent_grid(args.preset, args.height, args.width)
    for name in args.variants:  # the chunk must fit each variant's window
        replace(VARIANTS[name], num_frame_per_block=args.frames_per_chunk)


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    check_args(args)
    return publish(run(args), args, print_table)


if __name__ == "__main__":
    run_command(main)
