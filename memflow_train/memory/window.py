"""Which frames a chunk attends to: sink frames plus a local window, at chunk granularity."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionWindow:
    """Block-causal attention pattern of a streaming generator.

    A chunk is `num_frame_per_block` consecutive latent frames. Every query of the chunk ending
    (exclusively) at frame e sees the frames j < e with j >= e - local_attn_size (the local
    window, the chunk itself included) or j < sink_size (the sink: the first frames of the
    video). local_attn_size=-1 means an unbounded window (plain block-causal attention).
    """

    num_frame_per_block: int = 3
    local_attn_size: int = 9
    sink_size: int = 3

    def __post_init__(self) -> None:
        if self.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {self.num_frame_per_block}")
        if self.local_attn_size != -1 and self.local_attn_size < self.num_frame_per_block:
            raise ValueError(
                f"local_attn_size ({self.local_attn_size}) must be -1 (unbounded) or at least "
                f"num_frame_per_block ({self.num_frame_per_block}): a chunk must see itself"
            )
        if self.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {self.sink_size}")

    @property
    def bounded(self) -> bool:
        return self.local_attn_size != -1

    @property
    def cached_window_frames(self) -> int | None:
        """Frames before the current chunk the next chunk can still see (None: all of them)."""
        return self.local_attn_size - self.num_frame_per_block if self.bounded else None

    def visible_ranges(self, chunk_end: int) -> list[tuple[int, int]]:
        """Disjoint, increasing [start, stop) frame ranges visible to the chunk that ends at chunk_end."""
        if not self.bounded:
            return [(0, chunk_end)]
        window_start = max(0, chunk_end - self.local_attn_size)
        sink_stop = min(self.sink_size, window_start)
        ranges = [(0, sink_stop)] if sink_stop > 0 else []
        return [*ranges, (window_start, chunk_end)]
