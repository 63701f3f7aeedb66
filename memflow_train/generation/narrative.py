"""Narratives to generate: prompts and the latent frames where each one starts.

Two file formats:
- JSON lines, MemFlow's interactive benchmark format: {"prompts": [...]} per line, optionally with
  "switch_frames" (where prompts 2.. start), "segment_frames" (each prompt's length) and "num_frames";
- plain text: one prompt per line, all lines one narrative (blank lines ignored).
Lines that fix no lengths take --frames-per-prompt frames per prompt, or split --num-frames evenly (or their own
num_frames); lengths that contradict each other and unknown keys are errors.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memflow_train.checks import IgnoredSettingWarning, whole


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


# Every key a narrative record may hold; any other key (a typo such as "segment_frame") is an error.
RECORD_KEYS = {
    "prompts": "the prompts, in order",
    "switch_frames": "the latent frame where each prompt after the first starts",
    "segment_frames": "each prompt's length in latent frames",
    "num_frames": "the narrative's length in latent frames",
    "world": "a synthetic world's description (evaluation's ground truth; generation does not use it)",
}


def narrative_from_record(
    record: dict[str, Any],
    frames_per_prompt: int | None,
    num_frames: int | None,
    source: str,
    unused: list[tuple[str, str]] | None = None,
) -> Narrative:
    """One narrative from a JSON record. The record's own lengths (segment_frames, or switch_frames and
    num_frames) win over the command's frames_per_prompt / num_frames, which only fill in what the record
    leaves open; each one the record makes unnecessary is appended to `unused` as (name, source).

    Raises ValueError naming the values for an unknown key, lengths that contradict each other (segment_frames
    against num_frames or switch_frames; frames_per_prompt x prompts against num_frames) or no length at all."""
    if not isinstance(record, dict) or not isinstance(record.get("prompts"), list) or not record["prompts"]:
        raise ValueError(f"{source}: expected a JSON object with a prompts list (non-empty prompts, in order)")
    unknown = sorted(set(record) - set(RECORD_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; a narrative record holds {list(RECORD_KEYS)}")
    prompts = record["prompts"]
    count = len(prompts)
    given = {"frames_per_prompt": frames_per_prompt, "num_frames": num_frames}
    own_total = (
        None if record.get("num_frames") is None else whole(f"{source}: num_frames", record["num_frames"], low=1)
    )
    own_switches = None
    if record.get("switch_frames") is not None:
        if not isinstance(record["switch_frames"], list):
            raise ValueError(f"{source}: switch_frames must be a list, got {record['switch_frames']!r}")
        own_switches = [whole(f"{source}: switch_frames", s, low=1) for s in record["switch_frames"]]
    if record.get("segment_frames") is not None:
        lengths = record["segment_frames"]
        if not isinstance(lengths, list) or len(lengths) != count:
            raise ValueError(f"{source}: segment_frames must give a positive length for each of the {count} prompts")
        lengths = [whole(f"{source}: segment_frames", n, low=1) for n in lengths]
        switches, total = [sum(lengths[:k]) for k in range(1, count)], sum(lengths)
        if own_total is not None and own_total != total:
            raise ValueError(
                f"{source}: segment_frames {lengths} add up to {total} frames but num_frames is {own_total}"
            )
        if own_switches is not None and own_switches != switches:
            raise ValueError(
                f"{source}: segment_frames {lengths} put the switches at {switches} but switch_frames is {own_switches}"
            )
        fills = {}
    elif own_switches is not None:
        switches, total = own_switches, own_total
        fills = {"num_frames": num_frames, "frames_per_prompt": frames_per_prompt} if total is None else {}
        if total is None:
            last = (switches[-1] if switches else 0) + frames_per_prompt if frames_per_prompt is not None else None
            if last is not None and num_frames is not None and last != num_frames:
                raise ValueError(
                    f"{source}: the last prompt starts at frame {switches[-1] if switches else 0}: --frames-per-prompt "
                    f"{frames_per_prompt} ends the narrative at {last}, but --num-frames is {num_frames}"
                )
            total = num_frames if num_frames is not None else last
    elif own_total is not None:
        total = own_total
        switches = [round(k * total / count) for k in range(1, count)]
        fills = {}
    else:
        fills = {"num_frames": num_frames, "frames_per_prompt": frames_per_prompt}
        if frames_per_prompt is not None:
            if num_frames is not None and num_frames != count * frames_per_prompt:
                raise ValueError(
                    f"{source}: --frames-per-prompt {frames_per_prompt} x {count} prompts is "
                    f"{count * frames_per_prompt} frames, but --num-frames is {num_frames}: give one of them"
                )
            total = count * frames_per_prompt
            switches = [k * frames_per_prompt for k in range(1, count)]
        else:
            total = num_frames
            switches = [] if total is None else [round(k * total / count) for k in range(1, count)]
    if total is None:
        raise ValueError(f"{source}: the narrative fixes no length: pass --num-frames or --frames-per-prompt")
    if unused is not None:
        unused.extend((name, source) for name, value in given.items() if value is not None and name not in fills)
    return Narrative(tuple(prompts), tuple(switches), total, source)


def warn_unused(unused: list[tuple[str, str]], values: dict[str, tuple[str, Any]]) -> None:
    """One IgnoredSettingWarning per command setting that some narratives did not use (they fix their own
    lengths), naming the setting, its value and the first narratives. values: name -> (flag, value)."""
    for name, (flag, value) in values.items():
        sources = [s for n, s in unused if n == name]
        if sources:
            shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
            warnings.warn(
                f"{flag} {value} is not used by {len(sources)} narrative(s) that fix their own lengths "
                f"(the record's lengths win): {shown}",
                IgnoredSettingWarning,
                stacklevel=3,
            )


def read_narratives(
    path: str | Path,
    frames_per_prompt: int | None = None,
    num_frames: int | None = None,
    flags: dict[str, str] | None = None,
) -> list[Narrative]:
    """Every narrative of a .jsonl file (one per non-blank line), or the one narrative of a text file.
    flags: the command's names of frames_per_prompt / num_frames; when given, a setting that narratives fixing
    their own lengths do not use is warned about once (IgnoredSettingWarning)."""
    path = Path(path)
    unused: list[tuple[str, str]] = []
    out = _read(path, frames_per_prompt, num_frames, unused)
    if flags is not None:
        given = {"frames_per_prompt": frames_per_prompt, "num_frames": num_frames}
        warn_unused(unused, {k: (flags[k], v) for k, v in given.items() if v is not None})
    return out


def _read(
    path: Path, frames_per_prompt: int | None, num_frames: int | None, unused: list[tuple[str, str]]
) -> list[Narrative]:
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
            out.append(narrative_from_record(record, frames_per_prompt, num_frames, where, unused))
        if not out:
            raise ValueError(f"{path} holds no narratives")
        return out
    prompts = [line.strip() for line in lines if line.strip()]
    return [narrative_from_record({"prompts": prompts}, frames_per_prompt, num_frames, str(path), unused)]
