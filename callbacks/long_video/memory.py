"""Memory diagnostics: which frames the layers' memories held, against the narrative's segments.

From a generation's memory trace (per chunk, per layer, the absolute latent frames the layer's memory held while
the chunk was generated; any memory policy, a consolidated slot counted as its first frame): the share of held
frames from the chunk's own segment, and, for a subject that returns after an absence (synthetic-world
narratives), the share of frames held during its returning segment that come from the segment it was last seen
in, which is where the memory should look.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class MemoryRetrieval(Metric):
    full_state_update = False
    COUNTS = ("held", "same_segment", "layer_chunks", "return_held", "return_hits")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in self.COUNTS:
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        bank_frames: list[list[list[int]]],
        chunk_starts: list[int],
        latent_segments: torch.Tensor,
        returns: list[tuple[int, int]],
    ) -> None:
        """bank_frames[c][layer]: frames held for chunk c starting at chunk_starts[c]; latent_segments (F,):
        each latent frame's segment; returns: (segment returned in, segment last seen in) per returning subject."""
        if len(bank_frames) != len(chunk_starts):
            raise ValueError(f"{len(bank_frames)} bank records for {len(chunk_starts)} chunks")
        segment = latent_segments.tolist()
        for layers, start in zip(bank_frames, chunk_starts, strict=True):
            current = segment[start]
            for frames in layers:
                self.layer_chunks += 1
                self.held += len(frames)
                self.same_segment += sum(segment[f] == current for f in frames)
                for returned_in, seen_in in returns:
                    if current == returned_in:
                        self.return_held += len(frames)
                        self.return_hits += sum(segment[f] == seen_in for f in frames)

    def compute(self) -> dict[str, torch.Tensor]:
        def ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a / b if b else torch.tensor(float("nan"), dtype=torch.float64, device=b.device)

        return {
            "memory/frames_held": ratio(self.held, self.layer_chunks),  # per layer and chunk
            "memory/same_segment_share": ratio(self.same_segment, self.held),
            "memory/returning_subject_share": ratio(self.return_hits, self.return_held),
        }
