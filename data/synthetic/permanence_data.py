"""The object-permanence world the study trains on: narratives where a target subject enters after the sink
chunk, leaves for longer than the generator's local window and re-enters, and the data built from them.

Built into one folder (`build_permanence_world`), which doubles as a tiny Wan folder:
- text_encoder/, tokenizer/: a random tiny UMT5 with a word-level tokenizer over the world's vocabulary;
- vae/: the world autoencoder (data.synthetic.autoencoder), fitted to rendered frames;
- teacher-*.tar: windows of clip_frames latent frames cut at random chunk offsets from long narratives, so
  a bidirectional teacher learns every part of a narrative, returns inside the window included;
- clips-*.tar: the first clip_frames of narratives (all switch at the same frames, as streaming batches need):
  the causal initialisation and self-forcing stage 1;
- long-*.tar: whole narratives of long_frames, for streaming long tuning (stage 2);
- val-*.tar: held-out windows; benchmark.jsonl: held-out narratives of benchmark_returns returns for the
  object-permanence benchmark, benchmark_short.jsonl: held-out narratives of the training length (both in
  `python -m data.synthetic permanence` format);
- spec.json. Every shard holds latents, prompt and negative embeddings and per-frame annotations.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from data.prepare.core import Encoders, Item, prepare
from data.synthetic.autoencoder import AutoencoderSpec, fit_autoencoder
from data.synthetic.demo import cache_dir
from data.synthetic.world import Narrative, permanence_jsonl, permanence_narrative, render, vocabulary, window
from data.writer import ShardSink, brace_pattern
from memflow_train.checks import whole
from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import PatchAutoencoder

PERMANENCE_VERSION = 1  # bump whenever what is built changes


@dataclass(frozen=True)
class PermanenceSpec:
    """Sizes of the permanence world (latent frames; temporal stride 1: a latent frame is a video frame)."""

    lead_frames: int = 3  # before the target enters: the sink chunk never shows it
    present_frames: int = 6
    away_frames: int = 9  # longer than the generator's local window
    clip_frames: int = 24  # the training length: teacher windows, stage-1 clips
    long_frames: int = 48  # stage-2 narratives
    chunk: int = 3  # latent frames per chunk: windows start on the chunk grid
    teacher_clips: int = 2048
    student_clips: int = 512
    long_narratives: int = 256
    val_clips: int = 64
    benchmark_narratives: int = 100
    benchmark_returns: int = 13  # 3 + 6 + 13 * 15 = 204 latent frames: 8.5x the training length
    text_dim: int = 32
    text_len: int = 40
    autoencoder: AutoencoderSpec = field(default_factory=AutoencoderSpec)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("lead_frames", "present_frames", "away_frames", "clip_frames", "long_frames", "chunk"):
            whole(f"world.{name}", getattr(self, name), low=1)
            if getattr(self, name) % self.chunk:
                raise ValueError(
                    f"world.{name} ({getattr(self, name)}) must be a multiple of world.chunk ({self.chunk})"
                )
        for name in ("teacher_clips", "student_clips", "long_narratives", "val_clips", "benchmark_narratives"):
            whole(f"world.{name}", getattr(self, name), low=1)
        for name in ("benchmark_returns", "text_dim", "text_len"):
            whole(f"world.{name}", getattr(self, name), low=1)
        whole("world.seed", self.seed, low=0)
        if self.clip_frames > self.long_frames:
            raise ValueError(f"world.clip_frames ({self.clip_frames}) must not exceed long_frames ({self.long_frames})")

    @property
    def period(self) -> int:
        return self.away_frames + self.present_frames

    def returns_for(self, frames: int) -> int:
        """Returns a narrative needs to last at least `frames` latent frames."""
        return max(1, -(-(frames - self.lead_frames - self.present_frames) // self.period))

    def narrative(self, rng: random.Random, returns: int) -> Narrative:
        return permanence_narrative(rng, self.lead_frames, self.present_frames, self.away_frames, returns)

    @property
    def benchmark_frames(self) -> int:
        return self.lead_frames + self.present_frames + self.benchmark_returns * self.period


@dataclass(frozen=True)
class PermanenceWorld:
    root: Path
    urls: dict[str, str]  # teacher, clips, long, val: brace patterns of their shards
    benchmark: Path


def _items(spec: PermanenceSpec, split: str) -> Iterator[Item]:
    """The split's narratives or windows, rendered (seeded by split, so splits never share a narrative)."""
    rng = random.Random(f"{spec.seed}/{split}")
    a = spec.autoencoder
    count = {"teacher": spec.teacher_clips, "clips": spec.student_clips, "long": spec.long_narratives}
    count["val"] = spec.val_clips
    for i in range(count[split]):
        whole_narrative = spec.narrative(rng, spec.returns_for(spec.long_frames))
        if split == "long":
            start, frames = 0, spec.long_frames
        elif split == "clips":
            start, frames = 0, spec.clip_frames
        else:
            start, frames = rng.randrange(0, spec.long_frames - spec.clip_frames + 1, spec.chunk), spec.clip_frames
        part = window(whole_narrative, start, frames)
        video, notes = render(whole_narrative, a.height, a.width, temporal_stride=1, span=(start, frames))
        yield Item(
            key=f"{split}-{i:06d}",
            prompts=part.prompts,
            switch_frames=part.switch_frames,
            num_frames=part.num_frames,
            video=torch.from_numpy(video),
            annotations=notes,
            info={"source": "permanence world", "world": part.to_json(), "offset": start},
        )


def built_spec(root: str | Path) -> PermanenceSpec | None:
    """The settings a world in root was built with (None when root holds none)."""
    path = Path(root).expanduser() / "spec.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.pop("permanence_version", None) != PERMANENCE_VERSION:
        raise ValueError(f"{path}: a world of another version; build it again in another folder")
    saved["autoencoder"] = AutoencoderSpec(**saved["autoencoder"])
    return PermanenceSpec(**saved)


def permanence_root(spec: PermanenceSpec, root: str | Path | None = None) -> Path:
    """root, else $MEMFLOW_TRAIN_CACHE/permanence-v<version>-<digest of the spec> (the demo cache's parent)."""
    if root is not None:
        return Path(root).expanduser()
    digest = hashlib.sha1(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / f"permanence-v{PERMANENCE_VERSION}-{digest}"


def build_permanence_world(
    spec: PermanenceSpec, root: str | Path, log: Callable[[str], None] | None = None
) -> PermanenceWorld:
    """Build (or finish building) the world in root: each part is skipped when already complete, so an
    interrupted build resumes. Returns the shard patterns."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = {"permanence_version": PERMANENCE_VERSION, **asdict(spec)}
    spec_file = root / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) != json.loads(json.dumps(marker)):
        raise ValueError(f"{root} holds a world built with other settings ({spec_file}); use another folder")
    spec_file.write_text(json.dumps(marker, indent=1))
    if not (root / "tokenizer").is_dir():
        WanTextEncoder.tiny(spec.text_dim, spec.text_len, seed=spec.seed, vocabulary=vocabulary()).save_pretrained(root)
    if not (root / "vae" / "config.json").is_file():
        fit_autoencoder(spec.autoencoder).save_pretrained(root)
    text = WanTextEncoder.from_pretrained(root, text_len=spec.text_len, dtype=torch.float32)
    vae = PatchAutoencoder.from_pretrained(root)
    encoders = Encoders(text, vae, "", batch_size=32, text_dtype=torch.float32, latent_dtype=torch.bfloat16)
    encoders.min_latent_frames = spec.chunk
    urls = {}
    for split in ("teacher", "clips", "long", "val"):
        sink = ShardSink(str(root), {"world": marker}, max_samples=256, prefix=split)
        if not sink.done:
            log(f"rendering and encoding the {split} data")
        urls[split] = prepare(_items(spec, split), sink, encoders, progress=False)
    benchmark = root / "benchmark.jsonl"
    for name, returns in (
        ("benchmark_short", spec.returns_for(spec.clip_frames)),
        ("benchmark", spec.benchmark_returns),
    ):
        if not (root / f"{name}.jsonl").is_file():
            lines = permanence_jsonl(
                spec.benchmark_narratives,
                spec.lead_frames,
                spec.present_frames,
                spec.away_frames,
                returns,
                seed=10_000 + spec.seed,  # held out: the training splits draw from other seeds
            )
            (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return PermanenceWorld(root, urls, benchmark)


def shard_urls(root: str | Path, split: str) -> str:
    """The brace pattern of a built split's shards."""
    shards = json.loads((Path(root) / f"{split}-progress.json").read_text())["shards"]
    return brace_pattern(str(Path(root) / f"{split}-%06d.tar"), len(shards))
