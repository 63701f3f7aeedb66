"""Video metrics as torchmetrics Metrics: their sum states sync across ranks on compute().

Every metric keeps per-segment sums (segment k = prompt k of a narrative), so compute() gives the mean over
all (video, segment) pairs, the mean per segment index, and the drift: the mean over videos of the last
segment's value minus the first's. Calling a metric (forward) returns the same for that one video, which
is what the per-segment table shows, while accumulating it.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class PerSegmentMean(Metric):
    """Per-segment means of one measure; subclasses turn a video into one value per segment (NaN: none)."""

    full_state_update = False
    higher_is_better: bool | None = None

    def __init__(self, num_segments: int, name: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_segments < 1:
            raise ValueError(f"num_segments must be positive, got {num_segments}")
        self.num_segments = num_segments
        self.name = name
        zeros = torch.zeros(num_segments, dtype=torch.float64)
        self.add_state("total", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("count", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("drift_total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("drift_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, values: torch.Tensor) -> None:
        values = values.to(self.total.device, torch.float64)
        k = values.numel()
        if k > self.num_segments:
            raise ValueError(f"{self.name}: a video with {k} segments, the metric holds {self.num_segments}")
        ok = ~torch.isnan(values)
        self.total[:k] += torch.where(ok, values, 0.0)
        self.count[:k] += ok
        if k >= 2 and ok[0] and ok[-1]:
            self.drift_total += values[-1] - values[0]
            self.drift_count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.total.device)
        out = {
            self.name: self.total.sum() / self.count.sum() if self.count.sum() else nan,
            f"{self.name}/drift": self.drift_total / self.drift_count if self.drift_count else nan,
        }
        for k in range(self.num_segments):
            out[f"{self.name}/segment_{k}"] = self.total[k] / self.count[k] if self.count[k] else nan
        return out


def _per_segment(segments: torch.Tensor, fn) -> torch.Tensor:
    """fn(indices of segment k's frames) for every segment 0..max, NaN where fn returns None."""
    out = []
    for k in range(int(segments.max()) + 1):
        value = fn(torch.nonzero(segments == k).flatten())
        out.append(float("nan") if value is None else float(value))
    return torch.tensor(out, dtype=torch.float64)


class SegmentClipScore(PerSegmentMean):
    """CLIP score of each segment against its prompt: mean over its frames of max(100 * cos(image, text), 0),
    torchmetrics' CLIPScore per frame."""

    higher_is_better = True

    def __init__(self, num_segments: int, name: str = "clip_score", **kwargs) -> None:
        super().__init__(num_segments, name, **kwargs)

    def update(self, image_features: torch.Tensor, text_features: torch.Tensor, segments: torch.Tensor) -> None:
        """image_features (T, D) and text_features (S, D) unit-norm; segments (T,) the prompt of each frame."""
        if int(segments.max()) >= text_features.shape[0]:
            raise ValueError(f"frames of segment {int(segments.max())} but {text_features.shape[0]} prompts")
        score = (100 * (image_features.float() * text_features.float()[segments]).sum(-1)).clamp_min(0)
        self._add(_per_segment(segments, lambda i: score[i].mean() if len(i) else None))


def vbench_consistency(features: torch.Tensor) -> float | None:
    """VBench's subject/background consistency of unit-norm frame features (T, D): the mean over frames t >= 1
    of (max(cos(f_t, f_0), 0) + max(cos(f_t, f_t-1), 0)) / 2; None for fewer than two frames."""
    if features.shape[0] < 2:
        return None
    f = features.float()
    to_first = (f[1:] @ f[0]).clamp_min(0)
    to_previous = (f[1:] * f[:-1]).sum(-1).clamp_min(0)
    return float(((to_first + to_previous) / 2).mean())


class SegmentConsistency(PerSegmentMean):
    """Feature consistency within each segment (anchored at the segment's first frame) and across segments
    (the whole video, anchored at its first frame, adjacent pairs spanning the switches)."""

    higher_is_better = True

    def __init__(self, num_segments: int, name: str = "consistency", **kwargs) -> None:
        super().__init__(num_segments, name, **kwargs)
        self.add_state("across_total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("across_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, segments: torch.Tensor) -> None:
        """features (T, D) unit-norm per frame; segments (T,)."""
        self._add(_per_segment(segments, lambda i: vbench_consistency(features[i])))
        across = vbench_consistency(features)
        if across is not None:
            self.across_total += across
            self.across_count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        out = super().compute()
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.across_total.device)
        out[f"{self.name}/across"] = self.across_total / self.across_count if self.across_count else nan
        return out


def _pixels(frames: torch.Tensor) -> torch.Tensor:
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return frames.float() / 255.0


class TemporalFlicker(PerSegmentMean):
    """Mean absolute difference of consecutive frames inside each segment (pixels in [0, 1]); 0 for a still
    video. Pairs across a prompt switch are left out: a scene change there is asked for."""

    higher_is_better = False

    def __init__(self, num_segments: int, name: str = "flicker", **kwargs) -> None:
        super().__init__(num_segments, name, **kwargs)

    def update(self, frames: torch.Tensor, segments: torch.Tensor) -> None:
        x = _pixels(frames)
        diffs = (x[1:] - x[:-1]).abs().mean((1, 2, 3))  # pair (t-1, t) at index t-1
        same = segments[1:] == segments[:-1]
        pair_segment = torch.where(same, segments[1:], -1)
        self._add(_per_segment_pairs(diffs, pair_segment, int(segments.max()) + 1))


def _per_segment_pairs(values: torch.Tensor, pair_segment: torch.Tensor, count: int) -> torch.Tensor:
    out = torch.full((count,), float("nan"), dtype=torch.float64)
    for k in range(count):
        picked = values[pair_segment == k]
        if len(picked):
            out[k] = picked.double().mean()
    return out


def frame_quality(frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-frame image statistics whose drift over a long rollout shows degradation, each (T,) in [0, 1]:
    sharpness (mean |Laplacian| of the luma), saturation (mean (max - min) / max over RGB), brightness (mean
    luma)."""
    x = _pixels(frames)
    luma = x @ torch.tensor([0.299, 0.587, 0.114])
    lap = luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1] + luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:] - 4 * luma[:, 1:-1, 1:-1]
    high, low = x.amax(-1), x.amin(-1)
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-6), 0.0)
    return {
        "sharpness": lap.abs().mean((1, 2)) / 4,
        "saturation": saturation.mean((1, 2)),
        "brightness": luma.mean((1, 2)),
    }


class SegmentQuality(PerSegmentMean):
    """One frame_quality statistic per segment; its drift (last segment minus first) is the quality drift."""

    MEASURES = ("sharpness", "saturation", "brightness")

    def __init__(self, num_segments: int, name: str = "sharpness", **kwargs) -> None:
        if name not in self.MEASURES:
            raise ValueError(f"quality measure must be one of {self.MEASURES}, got {name!r}")
        super().__init__(num_segments, name, **kwargs)

    def update(self, frames: torch.Tensor, segments: torch.Tensor) -> None:
        values = frame_quality(frames)[self.name]
        self._add(_per_segment(segments, lambda i: values[i].mean() if len(i) else None))
