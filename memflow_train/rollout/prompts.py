"""Which prompt conditions which frames of a long video."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memflow_train.models.causal_wan import TextContext


@dataclass
class PromptSchedule:
    """Prompt segments as (first absolute frame, text context), the first starting at frame 0."""

    segments: list[tuple[int, TextContext]]

    def __post_init__(self) -> None:
        starts = [s for s, _ in self.segments]
        if not starts or starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError(f"prompt segments must start at frame 0 and increase strictly, got starts {starts}")

    @classmethod
    def single(cls, text: TextContext) -> PromptSchedule:
        return cls([(0, text)])

    def at(self, frame: int) -> TextContext:
        current = self.segments[0][1]
        for start, text in self.segments:
            if start > frame:
                break
            current = text
        return current

    def switches_in(self, start: int, stop: int) -> list[int]:
        """Switch frames (segment starts > 0) inside [start, stop)."""
        return [s for s, _ in self.segments if s > 0 and start <= s < stop]


def batch_schedule(contexts: list[TextContext], starts: torch.Tensor, real: torch.Tensor) -> PromptSchedule:
    """The schedule of a batch of narratives: slot p's text (batched) from frame starts[:, p].

    real (B, P) marks the slots a sample uses (padding slots are ignored). Every sample must switch at the same
    frames: a recache re-encodes the whole batch's cache, and one under an unchanged prompt is not a no-op (it
    re-reads the held frames without those the window had evicted), so samples switching at different frames
    cannot share a stream. Raises ValueError naming the starts otherwise."""
    rows = [tuple(int(f) for f, r in zip(row, ok, strict=True) if r) for row, ok in zip(starts, real, strict=True)]
    if len(set(rows)) != 1:
        raise ValueError(
            f"the samples of a batch switch prompts at different frames ({sorted(set(rows))}): streaming "
            "generates a batch in one stream, so its samples must share switch frames (make every narrative of a "
            "dataset switch at the same frames, or use batch_size 1)"
        )
    if not bool(real.all(0)[: len(rows[0])].all()):
        raise ValueError("padding prompt slots must come after the real ones")
    return PromptSchedule([(f, contexts[p]) for p, f in enumerate(rows[0])])
