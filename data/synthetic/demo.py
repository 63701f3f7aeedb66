"""The embedded demo dataset, generated on first use (seeded, small, nothing in git).

Synthetic-world narratives rendered to tiny videos, with prompt and negative-prompt embeddings from the tiny
text encoder, latents from the tiny VAE (latent statistics measured on the training videos), mp4s and
per-frame annotations. The folder doubles as a tiny Wan folder: text_encoder/, tokenizer/ and vae/ hold the
models that made the data, for decoding and for encoding new prompts the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data.prepare.core import Encoders, Item, prepare
from data.synthetic.world import render, sample_narrative
from data.writer import ShardSink, brace_pattern
from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import WanVAE

CACHE_ENV = "MEMFLOW_TRAIN_CACHE"
DEMO_VERSION = 2  # bump whenever generation changes, so caches of older demos are not reused


@dataclass(frozen=True)
class DemoSpec:
    """What the demo contains; every field is part of the cache folder's name."""

    num_train: int = 64
    num_val: int = 16
    height: int = 32
    width: int = 32
    num_frames: int = 12  # latent frames per narrative
    chunk: int = 3  # prompt switches fall on multiples of this many latent frames
    max_segments: int = 3
    text_dim: int = 16
    text_len: int = 128  # the longest demo captions are ~105 byte tokens
    z_dim: int = 4
    negative_prompt: str = ""  # diffusers' WanPipeline default
    train_per_shard: int = 16
    val_per_shard: int = 4
    seed: int = 0


@dataclass(frozen=True)
class DemoData:
    root: Path
    train_urls: str
    val_urls: str


def cache_dir() -> Path:
    """$MEMFLOW_TRAIN_CACHE, else ~/.cache/memflow_train."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/memflow_train")).expanduser()


def demo_items(spec: DemoSpec, split: str, temporal_stride: int) -> list[Item]:
    """The split's narratives rendered: 1 to max_segments segments, switches on chunk boundaries."""
    rng = random.Random(f"{spec.seed}/{split}")
    count = spec.num_train if split == "train" else spec.num_val
    items = []
    for i in range(count):
        segments = rng.randint(1, spec.max_segments)
        cuts = sorted(rng.sample(range(spec.chunk, spec.num_frames, spec.chunk), segments - 1))
        narrative = sample_narrative(rng, np.diff([0, *cuts, spec.num_frames]).tolist())
        video, notes = render(narrative, spec.height, spec.width, temporal_stride)
        items.append(
            Item(
                key=f"{split}-{i:06d}",
                prompts=narrative.prompts,
                switch_frames=narrative.switch_frames,
                num_frames=narrative.num_frames,
                video=torch.from_numpy(video),
                annotations=notes,
                info={"source": "synthetic world", "world": narrative.to_json()},
            )
        )
    return items


def _build(spec: DemoSpec, folder: Path) -> None:
    text = WanTextEncoder.tiny(d_model=spec.text_dim, text_len=spec.text_len, seed=spec.seed)
    vae = WanVAE.tiny(z_dim=spec.z_dim, seed=spec.seed)
    splits = {s: demo_items(spec, s, vae.temporal_stride) for s in ("train", "val")}
    vae.calibrate(torch.stack([it.video for it in splits["train"]]), batch_size=16)
    encoders = Encoders(
        text, vae, spec.negative_prompt, keep_video=True, text_dtype=torch.float32, latent_dtype=torch.float32
    )
    for split, items in splits.items():
        per_shard = spec.train_per_shard if split == "train" else spec.val_per_shard
        sink = ShardSink(str(folder), {"demo": asdict(spec)}, max_samples=per_shard, prefix=split)
        prepare(items, sink, encoders, progress=False)
    text.save_pretrained(folder)
    vae.save_pretrained(folder)
    (folder / "spec.json").write_text(json.dumps({"demo_version": DEMO_VERSION, **asdict(spec)}, indent=1))


def demo_dataset(spec: DemoSpec | None = None, root: str | Path | None = None) -> DemoData:
    """The demo's folder and shard URLs, generating it first if missing (safe when ranks race: each builds in
    its own temporary folder and the first rename wins)."""
    spec = spec or DemoSpec()
    base = Path(root).expanduser() if root is not None else cache_dir()
    digest = hashlib.sha1(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:10]
    final = base / f"demo-v{DEMO_VERSION}-{digest}"
    if not (final / "spec.json").is_file():
        tmp = base / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        print(f"building the demo dataset in {final} (first use)", file=sys.stderr, flush=True)
        try:
            _build(spec, tmp)
            os.rename(tmp, final)
        except OSError:
            if not (final / "spec.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    urls = {}
    for split in ("train", "val"):
        shards = json.loads((final / f"{split}-progress.json").read_text())["shards"]
        urls[split] = brace_pattern(str(final / f"{split}-%06d.tar"), len(shards))
    return DemoData(final, urls["train"], urls["val"])
