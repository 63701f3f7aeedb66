"""How a streaming generator remembers: sink + local window always, NAM bank and SMA when enabled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memflow_train.memory.window import AttentionWindow


@dataclass(frozen=True)
class MemoryConfig:
    """Streaming attention memory (YAML-configurable).

    enabled=False is the memory-free LongLive baseline: sink + local window only.
    With enabled=True, a Narrative Adaptive Memory (NAM) bank of bank_size past frames per layer
    is attended too. A candidate frame is recorded every record_interval chunks (prototype:
    the chunk's first frame, as MemFlow's code, or its frames merged by text relevance, as
    the paper); it joins the bank once its chunk has left the local window, evicting by
    relevance to the current prompt (raw mean of scaled dot products, or softmax over frames).
    With sma=True, Sparse Memory Activation keeps only the sma_topk memory frames per head
    that are most relevant to the chunk's queries (sink frames compete too if sma_include_sink).
    """

    enabled: bool = True
    bank_size: int = 3
    record_interval: int = 3
    prototype: Literal["first_frame", "relevance_merge"] = "first_frame"
    relevance_softmax: bool = False
    sma: bool = False
    sma_topk: int = 3
    sma_include_sink: bool = True
    sink_size: int = 3
    local_attn_size: int = 9
    num_frame_per_block: int = 3

    def __post_init__(self) -> None:
        self.window  # validates the window geometry  # noqa: B018
        if self.prototype not in ("first_frame", "relevance_merge"):
            raise ValueError(f"memory.prototype must be 'first_frame' or 'relevance_merge', got {self.prototype!r}")
        if not self.enabled:
            return
        if self.bank_size < 1:
            raise ValueError(f"memory.bank_size must be >= 1 when memory is enabled, got {self.bank_size}")
        if self.record_interval < 1:
            raise ValueError(f"memory.record_interval must be >= 1, got {self.record_interval}")
        if self.sma and self.sma_topk < 1:
            raise ValueError(f"memory.sma_topk must be >= 1, got {self.sma_topk}")
        if self.local_attn_size == -1:
            raise ValueError("memory.local_attn_size=-1 (unbounded window) leaves nothing for a memory to recall")

    @property
    def window(self) -> AttentionWindow:
        return AttentionWindow(self.num_frame_per_block, self.local_attn_size, self.sink_size)

    @property
    def max_attended_frames(self) -> int:
        """Upper bound on the frames one chunk's attention reads."""
        if not self.enabled:
            return self.sink_size + self.local_attn_size
        if self.sma:
            sink = 0 if self.sma_include_sink else self.sink_size
            return sink + self.sma_topk + self.local_attn_size
        return self.sink_size + self.bank_size + self.local_attn_size
