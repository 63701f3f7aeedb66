"""Narratives to generate: prompts and the latent frames where each one starts.

Two file formats:
- JSON lines, MemFlow's interactive benchmark format: {"prompts": [...]} per line, optionally with
  "switch_frames" (where prompts 2.. start), "segment_frames" (each prompt's length) and "num_frames";
- plain text: one prompt per line, all lines one narrative (blank lines ignored).
Lines that fix no lengths take --frames-per-prompt frames per prompt, or split --num-frames evenly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memflow_train.checks import whole


@dataclass(frozen=True)
class Narrative:
    """prompts[k] conditions latent frames [starts[k], starts[k + 1]), the last one up to num_frames."""

    prompts: tuple[str, ...]
    switch_frames: tuple[int, ...]
    num_frames: int
    source: str = ""

    def __post_init__(self) -> None:
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError(f"{self.source}: prompts must be a non-empty list of non-empty strings")
        if len(self.switch_frames) != len(self.prompts) - 1:
            raise ValueError(
                f"{self.source}: {len(self.prompts)} prompts need {len(self.prompts) - 1} switch frames, "
                f"got {list(self.switch_frames)}"
            )
        bounds = [0, *self.switch_frames, self.num_frames]
        if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(
                f"{self.source}: switch frames {list(self.switch_frames)} must increase strictly inside "
                f"(0, num_frames={self.num_frames})"
            )

    @property
    def starts(self) -> tuple[int, ...]:
        return (0, *self.switch_frames)


def narrative_from_record(
    record: dict[str, Any], frames_per_prompt: int | None, num_frames: int | None, source: str
) -> Narrative:
    """One narrative from a JSON record; the record's own lengths win over the command's."""
    prompts = record.get("prompts") if isinstance(record, dict) else None
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(f"{source}: expected a JSON object with a non-empty prompts list")
    count = len(prompts)
    if "segment_frames" in record:
        lengths = [whole(f"{source}: segment_frames", n, low=1) for n in record["segment_frames"]]
        if len(lengths) != count:
            raise ValueError(f"{source}: segment_frames must give a positive length for each of the {count} prompts")
        switches = [sum(lengths[:k]) for k in range(1, count)]
        total = record.get("num_frames", sum(lengths))
    elif "switch_frames" in record:
        switches = [whole(f"{source}: switch_frames", s, low=1) for s in record["switch_frames"]]
        total = record.get("num_frames", num_frames)
        if total is None and frames_per_prompt is not None:
            total = (switches[-1] if switches else 0) + frames_per_prompt
    elif frames_per_prompt is not None:
        switches = [k * frames_per_prompt for k in range(1, count)]
        total = record.get("num_frames", num_frames if num_frames is not None else count * frames_per_prompt)
    else:
        total = record.get("num_frames", num_frames)
        if total is None:
            raise ValueError(f"{source}: the narrative fixes no length: pass --num-frames or --frames-per-prompt")
        switches = [round(k * total / count) for k in range(1, count)]
    if total is None:
        raise ValueError(f"{source}: the narrative fixes no length: pass --num-frames or --frames-per-prompt")
    return Narrative(tuple(prompts), tuple(switches), whole(f"{source}: num_frames", total, low=1), source)


def read_narratives(
    path: str | Path, frames_per_prompt: int | None = None, num_frames: int | None = None
) -> list[Narrative]:
    """Every narrative of a .jsonl file (one per non-blank line), or the one narrative of a text file."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix in (".jsonl", ".json"):
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            where = f"{path} line {i + 1}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err})") from err
            out.append(narrative_from_record(record, frames_per_prompt, num_frames, where))
        if not out:
            raise ValueError(f"{path} holds no narratives")
        return out
    prompts = [line.strip() for line in lines if line.strip()]
    return [narrative_from_record({"prompts": prompts}, frames_per_prompt, num_frames, str(path))]
