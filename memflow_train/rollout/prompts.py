"""Which prompt conditions which frames of a long video."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from memflow_train.models.causal_wan import TextContext

_NEVER = torch.iinfo(torch.long).max


@dataclass
class PromptSchedule:
    """Prompt segments as (first absolute frame, text context), the first starting at frame 0.

    Every sample of the batch switches at these frames; `per_sample` builds one whose samples switch at their
    own frames."""

    segments: list[tuple[int, TextContext]]
    sample_starts: torch.Tensor | None = None  # (B, P): per-sample starts of each segment's text (per_sample)

    def __post_init__(self) -> None:
        starts = [s for s, _ in self.segments]
        if self.sample_starts is None and (not starts or starts[0] != 0 or starts != sorted(set(starts))):
            raise ValueError(f"prompt segments must start at frame 0 and increase strictly, got starts {starts}")

    @classmethod
    def single(cls, text: TextContext) -> PromptSchedule:
        return cls([(0, text)])

    @classmethod
    def per_sample(cls, contexts: list[TextContext], starts: torch.Tensor, real: torch.Tensor) -> PromptSchedule:
        """Slot p's text (batched: row b is sample b's prompt p) conditions sample b from frame starts[b, p].

        real (B, P) marks the slots a sample uses; padding slots never take effect. Raises ValueError when a
        sample's first prompt does not start at frame 0, a used slot's start is not fixed (< 0), or a sample's
        starts do not increase strictly."""
        if len(contexts) != starts.shape[1] or real.shape != starts.shape:
            raise ValueError(f"{len(contexts)} prompt slots, starts {tuple(starts.shape)}, real {tuple(real.shape)}")
        if not bool(real[:, 0].all()) or bool((starts[:, 0] != 0).any()):
            raise ValueError(f"every sample's first prompt must start at frame 0, got starts {starts.tolist()}")
        if bool((real & (starts < 0)).any()):
            raise ValueError(f"switch frames must be fixed (>= 0) for every prompt used, got {starts.tolist()}")
        used = [
            [int(f) for f, r in zip(row, ok, strict=True) if r]
            for row, ok in zip(starts.tolist(), real.tolist(), strict=True)
        ]
        if any(row != sorted(set(row)) for row in used):
            raise ValueError(f"each sample's prompt starts must increase strictly, got {used}")
        if any(ok != sorted(ok, reverse=True) for ok in real.tolist()):
            raise ValueError("padding prompt slots must come after the ones a sample uses")
        masked = torch.where(real, starts, _NEVER)
        shared = masked[:1].expand_as(masked)
        if bool((masked == shared).all()):  # every sample switches at the same frames
            return cls([(int(f), c) for f, c in zip(masked[0], contexts, strict=True) if f != _NEVER])
        return cls([(0, c) for c in contexts], masked)

    def slots(self, frame: int) -> torch.Tensor | int:
        """The segment (slot) active at an absolute frame: one index, or (B,) indices per sample."""
        if self.sample_starts is not None:
            return (self.sample_starts <= frame).sum(1) - 1
        return sum(1 for s, _ in self.segments if s <= frame) - 1

    def at(self, frame: int) -> TextContext:
        slots = self.slots(frame)
        if not isinstance(slots, torch.Tensor):
            return self.segments[slots][1]
        chosen = slots.tolist()
        if len(set(chosen)) == 1:
            return self.segments[chosen[0]][1]
        texts = [self.segments[p][1] for p in chosen]

        def pick(get: Callable[[TextContext], torch.Tensor]) -> torch.Tensor:
            return torch.stack([get(t)[b] for b, t in enumerate(texts)])

        layers = range(len(texts[0].keys))
        mask = None if texts[0].mask is None else pick(lambda t: t.mask)
        return TextContext(
            [pick(lambda t, i=i: t.keys[i]) for i in layers], [pick(lambda t, i=i: t.values[i]) for i in layers], mask
        )

    def switching(self, start: int, frames_per_chunk: int) -> torch.Tensor | bool:
        """Whether the chunk starting at `start` is the first of a new prompt (a switch inside the previous
        chunk or at its start takes effect here): one bool, or (B,) per sample."""
        if start <= 0:
            return False
        before, now = self.slots(start - frames_per_chunk), self.slots(start)
        return before != now

    def switches_in(self, start: int, stop: int) -> list[int]:
        """Frames inside [start, stop) where a segment starts (for any sample), switches only (> 0)."""
        if self.sample_starts is not None:
            s = self.sample_starts
            return sorted({int(f) for f in s[(s >= start) & (s < stop) & (s > 0) & (s != _NEVER)].tolist()})
        return [s for s, _ in self.segments if s > 0 and start <= s < stop]
