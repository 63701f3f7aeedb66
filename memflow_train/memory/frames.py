"""A contiguous run of cached frames: per-layer, heads-first keys/values with their absolute frame indices."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FrameRun:
    """Keys/values of the contiguous frames start .. start + num_frames - 1."""

    k: torch.Tensor
    v: torch.Tensor
    start: int
    num_frames: int

    @property
    def stop(self) -> int:
        return self.start + self.num_frames

    def slice(self, lo: int, hi: int) -> FrameRun | None:
        """The frames of this run inside [lo, hi), or None."""
        lo, hi = max(lo, self.start), min(hi, self.stop)
        if lo >= hi:
            return None
        if (lo, hi) == (self.start, self.stop):
            return self
        tpf = self.k.shape[2] // self.num_frames
        a, b = (lo - self.start) * tpf, (hi - self.start) * tpf
        return FrameRun(self.k[:, :, a:b], self.v[:, :, a:b], lo, hi - lo)

    def append(self, other: FrameRun, keep_last: int | None) -> FrameRun:
        if other.start != self.stop:
            raise ValueError(f"frames must be appended in order: run ends at {self.stop}, got {other.start}")
        k, v = torch.cat([self.k, other.k], 2), torch.cat([self.v, other.v], 2)
        run = FrameRun(k, v, self.start, self.num_frames + other.num_frames)
        if keep_last is not None and run.num_frames > keep_last:
            run = run.slice(run.stop - keep_last, run.stop)
        return run

    def frames_view(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, F*T, D) -> (B, H, F, T, D)."""
        return t.unflatten(2, (self.num_frames, -1))
