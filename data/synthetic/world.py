"""A procedural world of coloured shapes for narratives whose consistency can be checked exactly.

A narrative is a few subjects (a shape, a colour and a size that never change) and segments, each a scene
(background) with the subjects visible in it. Between segments the scene may switch and subjects leave or
come back. Rendering gives small videos plus, per video frame, the scene and each visible subject's identity
and position; a segment's caption names its scene and subjects, so "the blue square returns" is testable.
Positions are fractions of the frame, so one narrative renders at any resolution.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 235),
    "yellow": (240, 215, 30),
    "magenta": (215, 50, 205),
    "white": (245, 245, 245),
}
# Scene: (upper colour, lower colour, horizon as a fraction of the height).
SCENES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], float]] = {
    "night sky": ((10, 15, 50), (25, 25, 35), 0.7),
    "meadow": ((130, 190, 245), (70, 130, 50), 0.55),
    "desert": ((250, 220, 160), (190, 150, 80), 0.5),
    "grey studio": ((100, 100, 100), (70, 70, 70), 0.8),
    "ocean": ((120, 180, 230), (20, 60, 130), 0.45),
}
VERBS = (("drifts across", "drift across"), ("moves around", "move around"), ("wanders over", "wander over"))


@dataclass(frozen=True)
class Subject:
    id: int
    shape: str
    colour: str
    size: float  # radius as a fraction of the frame's smaller side

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Segment:
    scene: str
    subjects: tuple[int, ...]  # ids visible in this segment
    frames: int  # latent frames
    returning: tuple[int, ...] = ()  # ids seen before, absent in the previous segment, back now


@dataclass(frozen=True)
class Narrative:
    subjects: tuple[Subject, ...]
    segments: tuple[Segment, ...]
    seed: int  # of the motion

    @property
    def num_frames(self) -> int:
        return sum(s.frames for s in self.segments)

    @property
    def switch_frames(self) -> list[int]:
        return np.cumsum([s.frames for s in self.segments[:-1]]).tolist()

    @property
    def prompts(self) -> list[str]:
        return [caption(seg, self.subjects, i) for i, seg in enumerate(self.segments)]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Narrative:
        return cls(
            subjects=tuple(Subject(**s) for s in d["subjects"]),
            segments=tuple(
                Segment(s["scene"], tuple(s["subjects"]), s["frames"], tuple(s["returning"])) for s in d["segments"]
            ),
            seed=d["seed"],
        )


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def caption(segment: Segment, subjects: tuple[Subject, ...], index: int) -> str:
    """The segment's prompt: its visible subjects, who came back, and the scene."""
    by_id = {s.id: s for s in subjects}
    names = [f"a {by_id[i].name}" for i in segment.subjects]
    verb = VERBS[index % len(VERBS)][len(names) > 1]
    text = f"{_join(names).capitalize()} {verb} the {segment.scene}." if names else f"The {segment.scene} is empty."
    if segment.returning:
        back = _join([f"the {by_id[i].name}" for i in segment.returning])
        text = f"{back[0].upper()}{back[1:]} {'comes' if len(segment.returning) == 1 else 'come'} back. {text}"
    return text


def sample_narrative(rng: random.Random, segment_frames: list[int], num_subjects: int = 3) -> Narrative:
    """Random subjects and segments: each switch changes the scene or the cast (a subject leaves, a new one
    enters, or one that left returns); with three or more segments, some subject always leaves and returns."""
    looks = rng.sample([(s, c) for s in SHAPES for c in COLOURS], num_subjects)
    subjects = tuple(Subject(i, s, c, round(rng.uniform(0.12, 0.2), 3)) for i, (s, c) in enumerate(looks))
    scene = rng.choice(list(SCENES))
    present = sorted(rng.sample(range(num_subjects), min(2, num_subjects)))
    seen, left = set(present), []
    segments = [Segment(scene, tuple(present), segment_frames[0])]
    must_return = len(segment_frames) >= 3
    for k, frames in enumerate(segment_frames[1:], start=1):
        returning: list[int] = []
        last = k == len(segment_frames) - 1
        if must_return and last and left:
            event = "return"
        elif must_return and k == 1 and len(present) > 1:
            event = "leave"
        else:
            event = rng.choice(["scene", "leave", "enter", "return"])
        if event == "leave" and len(present) > 1:
            gone = rng.choice(present)
            present.remove(gone)
            left.append(gone)
        elif event == "return" and left:
            back = left.pop(rng.randrange(len(left)))
            present.append(back)
            returning.append(back)
        elif event == "enter" and len(seen) < num_subjects:
            new = min(set(range(num_subjects)) - seen)
            seen.add(new)
            present.append(new)
        else:
            scene = rng.choice([s for s in SCENES if s != scene])
        segments.append(Segment(scene, tuple(sorted(present)), frames, tuple(returning)))
    return Narrative(subjects, tuple(segments), rng.randrange(2**31))


# ------------------------------------------------------------------------------------------ rendering


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels a shape of radius r covers at offsets (dx, dy) from its centre (shared by renderer and evaluation)."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.6 * (dy + r))
    raise ValueError(f"unknown shape {shape!r}")


def latent_frame(frame: int, temporal_stride: int) -> int:
    """The latent frame a video frame belongs to (Wan's VAE: frame 0 alone, then groups of the stride)."""
    return 0 if frame == 0 else (frame - 1) // temporal_stride + 1


def render(
    narrative: Narrative, height: int, width: int, temporal_stride: int = 4
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Video uint8 (1 + stride*(N-1), H, W, 3) for N latent frames, and per video frame its annotation:
    frame, latent_frame, segment, scene and the visible subjects with their centre (x, y as fractions)."""
    frames = 1 + temporal_stride * (narrative.num_frames - 1)
    starts = [0, *narrative.switch_frames]
    rng = np.random.default_rng(narrative.seed)
    pos = rng.uniform(0.25, 0.75, size=(len(narrative.subjects), 2))
    speed = rng.uniform(0.01, 0.03, size=(len(narrative.subjects), 1))  # frame fractions per video frame
    angle = rng.uniform(0, 2 * np.pi, size=(len(narrative.subjects), 1))
    vel = speed * np.concatenate([np.cos(angle), np.sin(angle)], axis=1)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    unit = min(height, width)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    notes = []
    for f in range(frames):
        lf = latent_frame(f, temporal_stride)
        k = int(np.searchsorted(starts, lf, side="right")) - 1
        seg = narrative.segments[k]
        upper, lower, horizon = SCENES[seg.scene]
        img = video[f]
        img[:] = lower
        img[: int(round(horizon * height))] = upper
        visible = []
        for sid in seg.subjects:
            s = narrative.subjects[sid]
            x, y = pos[sid]
            img[shape_mask(s.shape, xx - x * width, yy - y * height, s.size * unit)] = COLOURS[s.colour]
            visible.append({**asdict(s), "x": round(float(x), 4), "y": round(float(y), 4)})
        notes.append({"frame": f, "latent_frame": lf, "segment": k, "scene": seg.scene, "subjects": visible})
        # Every subject keeps moving while away, so one that returns shows up somewhere else.
        pos += vel
        for axis in range(2):
            margin = np.array([s.size for s in narrative.subjects]) * unit / (width if axis == 0 else height)
            low, high = pos[:, axis] < margin, pos[:, axis] > 1 - margin
            vel[low | high, axis] *= -1
            pos[:, axis] = np.clip(pos[:, axis], margin, 1 - margin)
    return video, notes


def narratives_jsonl(count: int, segment_frames: list[int], seed: int = 0, num_subjects: int = 3) -> list[str]:
    """Evaluation narratives as JSON lines: the benchmark's {"prompts": [...]} plus switch frames, length and the
    world, from which `render` rebuilds the ground truth."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        n = sample_narrative(rng, segment_frames, num_subjects)
        record = {
            "prompts": n.prompts,
            "switch_frames": n.switch_frames,
            "num_frames": n.num_frames,
            "world": n.to_json(),
        }
        lines.append(json.dumps(record))
    return lines
