"""Which prompt conditions which frames of a long video."""

from __future__ import annotations

from dataclasses import dataclass

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
