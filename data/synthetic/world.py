"""A procedural world of coloured shapes for narratives whose consistency can be checked exactly.

A narrative is a few subjects (a shape, a colour, a size and a marking that never change) and segments, each a
scene (background) with the subjects visible in it. Between segments the scene may switch and subjects leave or
come back. Rendering gives small videos plus, per video frame, the scene and each visible subject's identity
and position; a segment's caption names its scene and its subjects' shapes and colours, so "the blue square
returns" is testable. Captions never name a subject's size or marking: a video can only show a returning
subject as it was if the model remembers it (object permanence, the memory's purpose; Ring Forcing,
arXiv 2608.26794). Positions and sizes are fractions of the frame, so one narrative renders at any resolution.
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
# Radii as fractions of the frame's smaller side: classes far enough apart (1.9 px at 64x64) for a readback to
# tell which one a video shows; captions never name them. The largest fits a lane of a third of the height.
SIZES = (0.1, 0.13, 0.16)
# "ring": the middle of the shape (within RING_HOLE of its radius) is left out, showing the scene through it.
MARKINGS = ("solid", "ring")
RING_HOLE = 0.5
VERBS = (("drifts across", "drift across"), ("moves around", "move around"), ("wanders over", "wander over"))


@dataclass(frozen=True)
class Subject:
    id: int
    shape: str
    colour: str
    size: float  # radius as a fraction of the frame's smaller side (one of SIZES in sampled worlds)
    marking: str = "solid"  # one of MARKINGS

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


def sample_subjects(rng: random.Random, count: int) -> tuple[Subject, ...]:
    """Subjects of distinct colours (so a colour names one subject), each with a random shape, size class and
    marking."""
    colours = rng.sample(list(COLOURS), count)
    return tuple(
        Subject(i, rng.choice(SHAPES), c, rng.choice(SIZES), rng.choice(MARKINGS)) for i, c in enumerate(colours)
    )


def sample_narrative(rng: random.Random, segment_frames: list[int], num_subjects: int = 3) -> Narrative:
    """Random subjects and segments: each switch changes the scene or the cast (a subject leaves, a new one
    enters, or one that left returns); with three or more segments, some subject always leaves and returns."""
    subjects = sample_subjects(rng, num_subjects)
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


def permanence_narrative(
    rng: random.Random, lead_frames: int, present_frames: int, away_frames: int, returns: int
) -> Narrative:
    """A narrative for the object-permanence benchmark: one scene and two subjects. A companion is there from
    the start; the target enters only after `lead_frames` (so the sink never shows it), stays `present_frames`,
    then is away `away_frames` and back `present_frames`, `returns` times. Make away_frames longer than the
    student's local window, so only a memory can hold the target's size and marking when it re-enters.

    Raises ValueError for a non-positive length or fewer than one return."""
    if min(lead_frames, present_frames, away_frames) < 1 or returns < 1:
        raise ValueError(
            f"lead_frames, present_frames, away_frames and returns must be >= 1, got "
            f"{lead_frames}, {present_frames}, {away_frames}, {returns}"
        )
    subjects = sample_subjects(rng, 2)
    scene = rng.choice(list(SCENES))
    segments = [Segment(scene, (0,), lead_frames), Segment(scene, (0, 1), present_frames)]
    for _ in range(returns):
        segments += [Segment(scene, (0,), away_frames), Segment(scene, (0, 1), present_frames, (1,))]
    return Narrative(subjects, tuple(segments), rng.randrange(2**31))


def vocabulary() -> list[str]:
    """Every word and punctuation mark a caption can hold (lower case), for a word-level tokenizer."""
    pieces = [*SHAPES, *COLOURS, *SCENES, *(v for pair in VERBS for v in pair)]
    pieces += ["a", "the", "and", "comes", "come", "back", "is", "empty", ".", ","]
    return sorted({word for piece in pieces for word in piece.lower().split()})


def window(narrative: Narrative, start: int, frames: int) -> Narrative:
    """Latent frames [start, start + frames) of a narrative as a narrative of its own: the segments overlapping
    them, cut to the window (each keeps its caption). Its motion is the original's at those frames only through
    `render(..., span=(start, frames))` of the original. Raises ValueError for a window outside the narrative."""
    if start < 0 or frames < 1 or start + frames > narrative.num_frames:
        raise ValueError(f"window [{start}, {start + frames}) outside the narrative's {narrative.num_frames} frames")
    segments, first = [], 0
    for seg in narrative.segments:
        a, b = max(first, start), min(first + seg.frames, start + frames)
        if a < b:
            segments.append(Segment(seg.scene, seg.subjects, b - a, seg.returning))
        first += seg.frames
    return Narrative(narrative.subjects, tuple(segments), narrative.seed)


# ------------------------------------------------------------------------------------------ rendering


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float | np.ndarray) -> np.ndarray:
    """Pixels a solid shape of radius r covers at offsets (dx, dy) from its centre (shared by renderer and
    evaluation)."""
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
    narrative: Narrative, height: int, width: int, temporal_stride: int = 4, span: tuple[int, int] | None = None
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Video uint8 (1 + stride*(N-1), H, W, 3) for N latent frames, and per video frame its annotation:
    frame, latent_frame, segment, scene and the visible subjects with their centre (x, y as fractions).

    Subject i of n moves in its own lane, the i-th of n horizontal bands, bouncing off the lane's and the
    frame's edges, so subjects never overlap and each one's outline can be read back whole.

    span (start, frames): only latent frames [start, start + frames), as `window(narrative, start, frames)`
    would be shown inside the whole video (needs temporal stride 1, where a latent frame is a video frame);
    frame, latent_frame and segment count from the window's start."""
    if span is not None:
        if temporal_stride != 1:
            raise ValueError(
                f"a span of latent frames is a span of video frames only at temporal stride 1, got {temporal_stride}"
            )
        start, count = span
        window(narrative, start, count)  # checks the span
        video, notes = render(window(narrative, 0, start + count), height, width, 1)
        first = len(narrative.segments) - len(window(narrative, start, narrative.num_frames - start).segments)
        shifted = [
            {
                **n,
                "frame": n["frame"] - start,
                "latent_frame": n["latent_frame"] - start,
                "segment": n["segment"] - first,
            }
            for n in notes[start:]
        ]
        return video[start:], shifted
    frames = 1 + temporal_stride * (narrative.num_frames - 1)
    starts = [0, *narrative.switch_frames]
    n = len(narrative.subjects)
    unit = min(height, width)
    radius = np.array([s.size for s in narrative.subjects]) * unit
    lane = np.arange(n) / n
    # Where each centre may go (fractions): inside the frame horizontally, inside its lane vertically; a
    # subject taller than its lane stays at the lane's middle.
    bounds = np.stack(
        [
            np.stack([radius / width, 1 - radius / width], 1),
            np.stack([lane + radius / height, lane + 1 / n - radius / height], 1),
        ]
    )  # (axis, subject, low/high)
    bounds = np.where(bounds[..., :1] > bounds[..., 1:], bounds.mean(-1, keepdims=True), bounds)
    rng = np.random.default_rng(narrative.seed)
    pos = rng.uniform(bounds[..., 0], bounds[..., 1]).T  # (subject, axis)
    speed = rng.uniform(0.01, 0.03, size=(n, 1))  # frame fractions per video frame
    angle = rng.uniform(0, 2 * np.pi, size=(n, 1))
    vel = speed * np.concatenate([np.cos(angle), np.sin(angle)], axis=1)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
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
            dx, dy, r = xx - x * width, yy - y * height, s.size * unit
            covered = shape_mask(s.shape, dx, dy, r)
            if s.marking == "ring":
                covered &= ~shape_mask(s.shape, dx, dy, RING_HOLE * r)
            elif s.marking != "solid":
                raise ValueError(f"unknown marking {s.marking!r} (known: {', '.join(MARKINGS)})")
            img[covered] = COLOURS[s.colour]
            visible.append({**asdict(s), "x": round(float(x), 4), "y": round(float(y), 4)})
        notes.append({"frame": f, "latent_frame": lf, "segment": k, "scene": seg.scene, "subjects": visible})
        # Every subject keeps moving while away, so one that returns shows up somewhere else.
        pos += vel
        for axis in range(2):
            low, high = pos[:, axis] < bounds[axis, :, 0], pos[:, axis] > bounds[axis, :, 1]
            vel[low | high, axis] *= -1
            pos[:, axis] = np.clip(pos[:, axis], bounds[axis, :, 0], bounds[axis, :, 1])
    return video, notes


def _jsonl_record(n: Narrative) -> str:
    """The benchmark's {"prompts": [...]} plus switch frames, length and the world that `render` rebuilds."""
    return json.dumps(
        {"prompts": n.prompts, "switch_frames": n.switch_frames, "num_frames": n.num_frames, "world": n.to_json()}
    )


def narratives_jsonl(count: int, segment_frames: list[int], seed: int = 0, num_subjects: int = 3) -> list[str]:
    """Evaluation narratives as JSON lines: the benchmark's {"prompts": [...]} plus switch frames, length and the
    world, from which `render` rebuilds the ground truth."""
    rng = random.Random(seed)
    return [_jsonl_record(sample_narrative(rng, segment_frames, num_subjects)) for _ in range(count)]


def permanence_jsonl(
    count: int, lead_frames: int, present_frames: int, away_frames: int, returns: int, seed: int = 0
) -> list[str]:
    """Object-permanence narratives (`permanence_narrative`) as JSON lines in `narratives_jsonl`'s format."""
    rng = random.Random(seed)
    return [
        _jsonl_record(permanence_narrative(rng, lead_frames, present_frames, away_frames, returns))
        for _ in range(count)
    ]
