"""Exact consistency on the synthetic world: what a video shows (read from its pixels) against the truth.

The world draws flat-coloured shapes over two-tone scenes, so a frame's content can be read back exactly:
pixels near a subject colour form connected blobs; a blob with a hole is a ring-marked subject (the hole
filled gives its solid outline); its shape and radius are those of the world's shape template that fits the
outline best, and its size is the world's size class nearest that radius; the scene is the one whose two
tones match the top and bottom rows. `annotate` turns a video into per-frame annotations in the renderer's
format, and `WorldConsistency` compares them with the ground truth: per frame (subjects recalled, subjects
invented, scene, size error in pixels, marking), and for every returning subject whether it comes back as it
was shown before: its look (named by the caption) and its size and marking (not named: object permanence).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torchmetrics import Metric

from data.synthetic.world import COLOURS, SCENES, SHAPES, SIZES, shape_mask

Look = tuple[str, str]  # (shape, colour)


_EIGHT = np.ones((3, 3), dtype=bool)  # the 8-neighbourhood


def _components(mask: torch.Tensor) -> torch.Tensor:
    """Connected components (8-neighbourhood) of boolean masks (N, H, W): labels (N, H, W), 0 = background
    (scipy.ndimage.label per mask; a label is unique within its mask)."""
    planes = mask.numpy()
    labels = np.zeros(planes.shape, dtype=np.int64)
    for i, plane in enumerate(planes):
        labels[i] = ndimage.label(plane, structure=_EIGHT)[0]
    return torch.from_numpy(labels)


# Each shape's height in radii, and its centre's distance below the top in radii (a triangle's centre is one
# radius below its apex, its base 0.8 radius below the centre).
_SPANS = {"circle": (2.0, 1.0), "square": (1.7, 0.85), "diamond": (2.0, 1.0), "triangle": (1.8, 1.0)}
_JITTER = (-0.5, -0.25, 0.0, 0.25, 0.5)  # pixel offsets tried for the template's radius and centre


def _fit(blob: np.ndarray) -> tuple[str, float]:
    """The world's shape whose template, fitted to the blob's bounding box, overlaps the blob most (IoU), and
    that template's radius in pixels.

    The template's size and centre come from the box up to a pixel's rounding, so a few offsets are tried.
    The fit depends only on the blob's pixels around its box (translation-invariant), so it is cached."""
    ys, xs = np.nonzero(blob)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = blob[max(0, top - 2) : bottom + 2, max(0, left - 2) : right + 2]
    oy, ox = top - max(0, top - 2), left - max(0, left - 2)  # where the box starts in the crop (frame edges)
    return _fit_crop(np.packbits(crop).tobytes(), crop.shape, oy, ox, bottom - top, right - left)


@functools.lru_cache(maxsize=65536)
def _fit_crop(bits: bytes, size: tuple[int, int], oy: int, ox: int, height: int, width: int) -> tuple[str, float]:
    """_fit of a crop (packed bits, its size) whose blob's box starts at (oy, ox) in it, of that height/width."""
    crop = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=size[0] * size[1]).reshape(size).astype(bool)
    yy, xx = np.mgrid[0 : crop.shape[0], 0 : crop.shape[1]].astype(np.float32) + 0.5
    top, cx = oy, ox + width / 2
    jitter = np.array(np.meshgrid(_JITTER, _JITTER, _JITTER, indexing="ij")).reshape(3, -1, 1, 1)
    best, best_r, best_iou = SHAPES[0], 0.0, -1.0
    for shape, (span, centre_below_top) in _SPANS.items():
        r = height / span + jitter[0]
        templates = shape_mask(shape, xx - cx - jitter[1], yy - (top + centre_below_top * r) - jitter[2], r)
        iou = (templates & crop).sum((1, 2)) / np.maximum(1, (templates | crop).sum((1, 2)))
        i = int(iou.argmax())
        if iou[i] > best_iou:
            best, best_r, best_iou = shape, float(r.reshape(-1)[i]), float(iou[i])
    return best, best_r


def _holes(blob: np.ndarray) -> np.ndarray:
    """Pixels of the blob's complement that the blob encloses (not connected to the outside of its box)."""
    ys, xs = np.nonzero(blob)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.pad(blob[top:bottom, left:right], 1)  # a background border that touches the outside
    outside = ~crop
    labels = _components(torch.from_numpy(outside)[None])[0].numpy()
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    enclosed = outside & ~np.isin(labels, list(border))
    holes = np.zeros_like(blob)
    holes[top:bottom, left:right] = enclosed[1:-1, 1:-1]
    return holes


def annotate(frames: torch.Tensor, tolerance: int = 40, min_area: int = 6) -> list[dict[str, Any]]:
    """Per frame of uint8 video (T, H, W, 3): {"scene": name or None, "unit": min(H, W), "subjects": [{"shape",
    "colour", "marking", "size", "radius_px", "x", "y"}]}. A subject is a blob of at least min_area pixels
    within tolerance (per channel) of a world colour; its marking is "ring" when the blob encloses a hole of
    at least an eighth of its outline's area (the world's ring leaves out a quarter), else "solid"; radius_px
    is the fitted template's radius in pixels, size the world's size class (a fraction of the frame's smaller
    side, like the renderer's) nearest radius_px / unit; x, y are the outline's centre as fractions of the
    frame."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    t, h, w, _ = frames.shape
    unit = min(h, w)
    x = frames.int()
    palette = torch.tensor(list(COLOURS.values()))  # (K, 3)
    near = (x[:, None] - palette[None, :, None, None]).abs().amax(-1) <= tolerance  # (T, K, H, W)
    planes = torch.nonzero(near.sum((2, 3)) >= min_area).tolist()  # (frame, colour) pairs worth a look
    labels = _components(torch.stack([near[f, k] for f, k in planes])).numpy() if planes else None
    found: dict[int, list[dict[str, Any]]] = {f: [] for f in range(t)}
    names = list(COLOURS)
    for i, (f, k) in enumerate(planes):
        ids, counts = np.unique(labels[i], return_counts=True)
        for label, area in zip(ids, counts, strict=True):
            if label == 0 or area < min_area:
                continue
            blob = labels[i] == label
            holes = _holes(blob)
            outline = blob | holes
            shape, radius = _fit(outline)
            ys, xs = np.nonzero(outline)
            found[f].append(
                {
                    "shape": shape,
                    "colour": names[k],
                    "marking": "ring" if holes.sum() >= outline.sum() / 8 else "solid",
                    "size": min(SIZES, key=lambda c: abs(c * unit - radius)),
                    "radius_px": round(radius, 3),
                    "x": round(float(xs.mean() + 0.5) / w, 4),
                    "y": round(float(ys.mean() + 0.5) / h, 4),
                }
            )
    return [{"scene": _scene(x[f], tolerance), "unit": unit, "subjects": found[f]} for f in range(t)]


def _scene(frame: torch.Tensor, tolerance: int) -> str | None:
    """The scene whose upper and lower colours match the frame's top and bottom rows (median), or None."""
    top, bottom = frame[0].median(0).values, frame[-1].median(0).values
    best, best_error = None, tolerance + 1
    for name, (upper, lower, _) in SCENES.items():
        error = max((top - torch.tensor(upper)).abs().max(), (bottom - torch.tensor(lower)).abs().max())
        if error < best_error:
            best, best_error = name, int(error)
    return best


def _looks(note: dict[str, Any]) -> set[Look]:
    return {(s["shape"], s["colour"]) for s in note["subjects"]}


def returning_events(segment_subjects: list[set[int]]) -> list[tuple[int, int, int]]:
    """(subject, segment it returns in, last earlier segment that showed it) for every subject absent from the
    segment before and seen earlier: the world's `returning`."""
    events = []
    for r in range(2, len(segment_subjects)):
        for s in sorted(segment_subjects[r] - segment_subjects[r - 1]):
            earlier = [e for e in range(r - 1) if s in segment_subjects[e]]
            if earlier:
                events.append((s, r, earlier[-1]))
    return events


def _shown_as(note: dict[str, Any], look: Look) -> dict[str, Any] | None:
    """The frame's largest subject with this look, or None."""
    matches = [s for s in note["subjects"] if (s["shape"], s["colour"]) == look]
    return max(matches, key=lambda s: s.get("radius_px", 0.0)) if matches else None


def appearance(notes: list[dict[str, Any]], look: Look) -> tuple[float, str] | None:
    """How these frames show a subject: (median size in pixels, most frequent marking; ties: the first shown),
    over the frames showing its look; None if no frame does."""
    shown = [(s["size"] * n["unit"], s["marking"]) for n in notes if (s := _shown_as(n, look)) is not None]
    if not shown:
        return None
    markings = [m for _, m in shown]
    return float(np.median([size for size, _ in shown])), max(dict.fromkeys(markings), key=markings.count)


class WorldConsistency(Metric):
    """Predicted annotations (annotate's format) against the truth (the renderer's: segment, scene, subjects
    with id, shape, colour, size and marking), frame by frame.

    subject_recall: truth subjects whose look (shape, colour) the frame shows; subject_precision: shown
    subjects that are in the truth; subject_f1 their harmonic mean; scene_accuracy: frames showing the right
    scene. size_error_px: mean |shown size - true size| in pixels over recalled subjects; marking_accuracy:
    the share of recalled subjects shown with their true marking. return_consistency: of the returning subjects
    shown in their earlier segment (in at least `presence` of its frames), the share shown again with the same
    look in the segment they return in; return_events counts those subjects. Of those shown again (reentries),
    reentry_size_error_px is the mean |median size shown on return - median size shown in the earlier segment|
    in pixels, and reentry_marking_accuracy the share whose most frequent marking is the same: both against
    the video's own first appearance of the subject (the first segment that shows it), which the caption does
    not name (object permanence), so a look that drifts a little at every return is counted in full.
    """

    full_state_update = False
    COUNTS = (
        "recalled", "truth", "correct", "shown", "scene_hits", "frames", "kept", "returns",
        "size_error", "marking_hits", "reentries", "reentry_size_error", "reentry_marking_hits",
    )  # fmt: skip

    def __init__(self, presence: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.presence = presence
        for name in self.COUNTS:
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predicted: list[dict[str, Any]], truth: list[dict[str, Any]]) -> None:
        """predicted: annotate's notes; truth: per frame {"segment", "scene", "subjects": [{"id", "shape",
        "colour", "size", "marking"}]}, sizes as fractions of the frame's smaller side. Raises ValueError when
        the frame counts differ."""
        if len(predicted) != len(truth):
            raise ValueError(f"{len(predicted)} predicted frames for {len(truth)} annotated frames")
        for p, t in zip(predicted, truth, strict=True):
            shown, true = _looks(p), _looks(t)
            self.recalled += len(shown & true)
            self.truth += len(true)
            self.correct += len(shown & true)
            self.shown += len(shown)
            self.scene_hits += p["scene"] == t["scene"]
            self.frames += 1
            for s in t["subjects"]:
                if (q := _shown_as(p, (s["shape"], s["colour"]))) is not None:
                    self.size_error += abs(q["size"] - s["size"]) * p["unit"]
                    self.marking_hits += q["marking"] == s["marking"]
        segments = sorted({t["segment"] for t in truth})
        frames_of = {k: [i for i, t in enumerate(truth) if t["segment"] == k] for k in segments}
        members = [{s["id"] for i in frames_of[k] for s in truth[i]["subjects"]} for k in segments]
        look = {s["id"]: (s["shape"], s["colour"]) for t in truth for s in t["subjects"]}

        def present(k: int, subject: int) -> bool:
            hits = sum(look[subject] in _looks(predicted[i]) for i in frames_of[segments[k]])
            return hits >= self.presence * len(frames_of[segments[k]])

        for subject, r, e in returning_events(members):
            if present(e, subject):
                self.returns += 1
                back = present(r, subject)
                self.kept += back
                if back:
                    first = min(k for k in range(r) if subject in members[k] and present(k, subject))
                    before = appearance([predicted[i] for i in frames_of[segments[first]]], look[subject])
                    after = appearance([predicted[i] for i in frames_of[segments[r]]], look[subject])
                    if before is not None and after is not None:  # never shown when introduced: nothing to keep
                        self.reentries += 1
                        self.reentry_size_error += abs(after[0] - before[0])
                        self.reentry_marking_hits += after[1] == before[1]

    def counts(self) -> dict[str, float]:
        """The accumulated counts (what compute divides), e.g. to pool narratives in a bootstrap."""
        return {name: float(getattr(self, name)) for name in self.COUNTS}

    def compute(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in self.ratios(self.counts()).items()}

    @staticmethod
    def ratios(counts: dict[str, float]) -> dict[str, float]:
        """The metrics of summed counts (compute's values; NaN where a denominator is 0)."""
        c = counts

        def ratio(a: float, b: float) -> float:
            return a / b if b else float("nan")

        recall, precision = ratio(c["recalled"], c["truth"]), ratio(c["correct"], c["shown"])
        return {
            "world/subject_recall": recall,
            "world/subject_precision": precision,
            "world/subject_f1": ratio(2 * recall * precision, recall + precision),
            "world/scene_accuracy": ratio(c["scene_hits"], c["frames"]),
            "world/size_error_px": ratio(c["size_error"], c["recalled"]),
            "world/marking_accuracy": ratio(c["marking_hits"], c["recalled"]),
            "world/return_consistency": ratio(c["kept"], c["returns"]),
            "world/return_events": c["returns"],
            "world/reentry_size_error_px": ratio(c["reentry_size_error"], c["reentries"]),
            "world/reentry_marking_accuracy": ratio(c["reentry_marking_hits"], c["reentries"]),
            "world/reentries": c["reentries"],
        }


def bootstrap_interval(
    per_narrative: list[list[dict[str, float]]], statistic: str, resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of a world metric over narratives: `per_narrative[v][i]` holds the
    counts (WorldConsistency.counts) of narrative i under variant v; each resample draws narratives with
    replacement, the same for every variant (paired), sums their counts and computes the metric. With one
    variant the interval is the metric's; with two, of variant 0 minus variant 1. None when a resample has no
    value (NaN)."""
    n = len(per_narrative[0])
    if n == 0 or any(len(v) != n for v in per_narrative) or len(per_narrative) not in (1, 2):
        raise ValueError("bootstrap_interval takes one or two variants with counts of the same narratives")
    keys = list(per_narrative[0][0])
    table = torch.tensor([[[row[k] for k in keys] for row in v] for v in per_narrative], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (resamples, n), generator=g)
    sums = table[:, picks].sum(2)  # (variants, resamples, counts)
    values = torch.tensor(
        [[WorldConsistency.ratios(dict(zip(keys, s.tolist(), strict=True)))[statistic] for s in v] for v in sums],
        dtype=torch.float64,
    )
    values = values[0] - values[1] if len(per_narrative) == 2 else values[0]
    if bool(torch.isnan(values).any()):
        return None
    lo, hi = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


@torch.no_grad()
def autoencoder_readback(vae: Any, frames: torch.Tensor, notes: list[dict[str, Any]]) -> dict[str, float]:
    """The readback of frames (N, H, W, 3) uint8 after a round trip through a temporal-stride-1 autoencoder
    (memflow_train.models.vae.FrameVAE), against their truth (the renderer's notes): subject recall, precision
    and F1, scene accuracy, size error in pixels, marking accuracy."""
    video = frames.unsqueeze(0)  # one video of N frames
    decoded = vae.to_uint8(vae.decode(vae.encode(video, batch_size=1), batch_size=1))[0]
    metric = WorldConsistency()
    metric.update(annotate(decoded), notes)
    values = metric.compute()
    keys = ("subject_recall", "subject_precision", "subject_f1", "scene_accuracy", "size_error_px", "marking_accuracy")
    return {k: float(values[f"world/{k}"]) for k in keys}
