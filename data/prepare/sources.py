"""Readers for each kind of source a user brings; each yields Items in a stable order (resume depends on it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from data.prepare.core import Item
from data.video_io import read_clip
from memflow_train.generation.narrative import narrative_from_record


def _lines(path: str | Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]


def prompt_file(path: str | Path, num_frames: int | None = None) -> list[Item]:
    """One prompt per line (VidProM-style lists); blank lines are ignored."""
    return [
        Item(f"{i:08d}", [text], None, num_frames, info={"source": Path(path).name, "line": i + 1})
        for i, text in enumerate(_lines(path))
        if text
    ]


def switch_pairs(
    first: str | Path, second: str | Path, num_frames: int | None = None, switch_frame: int | None = None
) -> list[Item]:
    """Line-aligned files (LongLive/MemFlow switch prompts): line i of `first` switches to line i of `second`.
    Without switch_frame the training method picks the switch (as LongLive does)."""
    a, b = _lines(first), _lines(second)
    if len(a) != len(b):
        raise ValueError(f"{first} has {len(a)} lines but {second} has {len(b)}: the files must be line-aligned")
    if switch_frame is not None and num_frames is not None and not 0 < switch_frame < num_frames:
        raise ValueError(f"switch frame {switch_frame} is outside (0, {num_frames})")
    items = []
    for i, (p, q) in enumerate(zip(a, b, strict=True)):
        if not p or not q:
            raise ValueError(f"line {i + 1} is empty in {first if not p else second}")
        switches = None if switch_frame is None else [switch_frame]
        items.append(Item(f"{i:08d}", [p, q], switches, num_frames, info={"source": Path(first).name, "line": i + 1}))
    return items


def narrative_jsonl(
    path: str | Path, frames_per_prompt: int = 40, unused: list[tuple[str, str]] | None = None
) -> list[Item]:
    """MemFlow's interactive benchmark format: one {"prompts": [...]} per line, each prompt frames_per_prompt
    latent frames long (40 = 10 s at 16 fps). Lines may also give their own lengths (switch_frames, num_frames,
    segment_frames; the synthetic world's narrative sets do): read exactly as generation reads them
    (memflow_train.generation.narrative), so a narrative means the same in training and generation. Settings
    a line makes unnecessary are appended to `unused` (see narrative_from_record)."""
    items = []
    for i, line in enumerate(_lines(path)):
        if not line:
            continue
        where = f"{path} line {i + 1}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err})") from err
        n = narrative_from_record(record, frames_per_prompt, None, where, unused)
        info = {"source": Path(path).name, "line": i + 1}
        items.append(Item(f"{i:08d}", list(n.prompts), list(n.switch_frames), n.num_frames, info=info))
    return items


# Containers PyAV (FFmpeg) decodes, matched case-insensitively (a.MP4, b.mov, c.mkv).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")


def list_videos(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """The videos of a folder (sorted, recursively) and the files that are neither a video nor a video's caption
    (.txt of the same name). Raises ValueError for two videos sharing a name (a.mp4 and a.mov): one caption and
    one sample key would stand for both."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    videos = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
    stems: dict[Path, Path] = {}
    for video in videos:
        other = stems.setdefault(video.with_suffix(""), video)
        if other != video:
            raise ValueError(
                f"{other} and {video} share the caption {video.with_suffix('.txt').name} and the sample key: rename one"
            )
    captions = {v.with_suffix(".txt") for v in videos}
    others = [p for p in files if p.suffix.lower() not in VIDEO_SUFFIXES and p not in captions]
    return videos, others


def video_folder(
    folder: str | Path,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    videos: list[Path] | None = None,
) -> Iterator[Item]:
    """Every video in a folder (list_videos: .mp4, .mov, .mkv, ... in any case, sorted, recursively) with its
    caption in the .txt of the same name; a video without a caption is an Item without prompts, which preparation
    skips with a warning. Each item loads (frames, their true rate) with read_clip."""
    for video in list_videos(folder)[0] if videos is None else videos:
        caption = video.with_suffix(".txt")
        text = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
        yield Item(
            video.relative_to(folder).with_suffix("").as_posix().replace("/", "__").replace(".", "_"),
            [text] if text else [],
            video=partial(read_clip, video, fps, size, max_frames),
            info={"source": video.relative_to(folder).as_posix()},
        )
