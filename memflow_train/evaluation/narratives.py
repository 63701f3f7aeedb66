"""Evaluation narrative sets: the generation Narratives plus, for synthetic-world ones, the world's description.

Sets are read from JSONL in MemFlow's interactive benchmark format (memflow_train.generation.narrative reads
the prompts and lengths; a line's "world", written by `python -m data.synthetic narratives`, renders the
ground truth). A set can be cut down for cheap evaluation (first N narratives, first P prompts, F latent
frames per prompt), and is identified by a digest of its content and the generation settings, so reports
name exactly what they measured. The streaming generator switches prompt at the first chunk starting at or
after a switch frame, so the segments that evaluation measures start on the chunk grid (`segment_starts`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from memflow_train.generation.narrative import Narrative, narrative_from_record, read_narratives

# Bump when generation or any metric changes meaning, so reports of different protocols are not compared.
PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class EvalNarrative:
    narrative: Narrative
    world: dict[str, Any] | None = None  # the synthetic world's description (data.synthetic), if any

    @property
    def name(self) -> str:
        return self.narrative.source

    def for_chunks(self, chunk: int) -> Narrative:
        """The narrative as generated: num_frames rounded up to whole chunks (warn_off_grid says so, once
        per narrative set)."""
        frames = -(-self.narrative.num_frames // chunk) * chunk
        return replace(self.narrative, num_frames=frames)

    def segment_starts(self, chunk: int) -> list[int]:
        """First latent frame of each prompt's segment as generated: switches moved to the next chunk start."""
        starts = [0, *(-(-s // chunk) * chunk for s in self.narrative.switch_frames)]
        if any(a >= b for a, b in zip(starts, starts[1:], strict=False)):
            raise ValueError(f"{self.name}: two prompt switches fall in one {chunk}-frame chunk ({starts})")
        return starts

    def latent_segments(self, chunk: int) -> torch.Tensor:
        """(generated frames,) long: the segment of every generated latent frame."""
        starts = torch.tensor(self.segment_starts(chunk))
        return torch.bucketize(torch.arange(self.for_chunks(chunk).num_frames), starts, right=True) - 1

    def to_json(self) -> dict[str, Any]:
        n = self.narrative
        return {
            "name": n.source,
            "prompts": list(n.prompts),
            "switch_frames": list(n.switch_frames),
            "num_frames": n.num_frames,
            "world": self.world,
        }


class ChunkGridWarning(UserWarning):
    """Narratives whose length or switches are not on the generator's chunk grid: generated rounded up to whole
    chunks, each switch taking effect at the next chunk start."""


def warn_off_grid(narratives: list[EvalNarrative], chunk: int) -> None:
    """One ChunkGridWarning for a narrative set, naming each narrative whose num_frames or switch frames the
    generator moves to its `chunk`-frame grid, with the original and the used values (the report records them
    too, as segment_starts and latent_frames)."""
    moved = []
    for item in narratives:
        n = item.narrative
        frames, starts = item.for_chunks(chunk).num_frames, item.segment_starts(chunk)[1:]
        if frames != n.num_frames or tuple(starts) != n.switch_frames:
            moved.append(
                f"{item.name}: num_frames {n.num_frames} -> {frames}, switch_frames {list(n.switch_frames)} -> {starts}"
            )
    if moved:
        shown = "; ".join(moved[:5]) + (f"; and {len(moved) - 5} more" if len(moved) > 5 else "")
        warnings.warn(
            f"{len(moved)} of {len(narratives)} narratives are generated on the {chunk}-frame chunk grid (lengths "
            f"rounded up to whole chunks, switches at the next chunk start): {shown}",
            ChunkGridWarning,
            stacklevel=2,
        )


def video_frame_segments(latent_segments: torch.Tensor, temporal_stride: int) -> torch.Tensor:
    """Segment of every decoded video frame: Wan's VAE turns latent frame 0 into 1 frame, each later one into
    temporal_stride frames."""
    return torch.cat([latent_segments[:1], latent_segments[1:].repeat_interleave(temporal_stride)])


def from_records(records: list[dict[str, Any]], source: str, frames_per_prompt: int = 40) -> list[EvalNarrative]:
    """Narratives from JSONL records (their own lengths win; else frames_per_prompt per prompt)."""
    return [
        EvalNarrative(narrative_from_record(r, frames_per_prompt, None, f"{source}:{i}"), r.get("world"))
        for i, r in enumerate(records)
    ]


def read_jsonl(path: str | Path, frames_per_prompt: int = 40) -> list[EvalNarrative]:
    """Every narrative of a JSONL file (blank lines skipped), with its world when the line has one."""
    narratives = read_narratives(path, frames_per_prompt)
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [
        EvalNarrative(replace(n, source=f"{Path(path).name}:{i}"), r.get("world"))
        for i, (n, r) in enumerate(zip(narratives, records, strict=True))
    ]


def shorten(item: EvalNarrative, max_prompts: int | None, frames_per_prompt: int | None) -> EvalNarrative:
    """Keep the first max_prompts prompts and give each frames_per_prompt latent frames (None: unchanged);
    a synthetic world's segments follow, so its ground truth describes the shortened narrative."""
    n = item.narrative
    count = len(n.prompts) if max_prompts is None else min(max_prompts, len(n.prompts))
    bounds = [0, *n.switch_frames, n.num_frames]
    lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)][:count]
    if frames_per_prompt is not None:
        lengths = [frames_per_prompt] * count
    world = copy.deepcopy(item.world)
    if world is not None:
        world["segments"] = [dict(s, frames=f) for s, f in zip(world["segments"], lengths, strict=False)]
    switches = tuple(sum(lengths[:k]) for k in range(1, count))
    return EvalNarrative(replace(n, prompts=n.prompts[:count], switch_frames=switches, num_frames=sum(lengths)), world)


def digest(narratives: list[EvalNarrative], settings: dict[str, Any]) -> str:
    """A short id of a narrative set plus the settings that shape generation and measurement."""
    payload = {
        "protocol_version": PROTOCOL_VERSION,
        "narratives": [{k: v for k, v in n.to_json().items() if k != "name"} for n in narratives],
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
