"""How a streaming generator remembers: sink + local window always, NAM bank and SMA when enabled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memflow_train.checks import whole
from memflow_train.memory.window import AttentionWindow

CHOICES = {  # the allowed values of every option that names a mode
    "prototype": ("first_frame", "relevance_merge"),
    "record_cadence": ("interval", "every_chunk"),
    "recache": ("chunkwise", "joint"),
    "recache_sink": ("keep", "reencode_early", "replace"),
    "context_noise": ("none", "schedule_table"),
}


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

    Official-parity modes (the public MemFlow / LongLive code; README, "differences" table):
    - record_cadence: "interval" records a candidate on chunks whose index is a multiple of
      record_interval (MemFlow's interactive inference and stage 2). "every_chunk" records every
      chunk: while the bank has room, a candidate overwrites the open (newest) slot unless that
      slot's frame came from an earlier group of record_interval chunks, which seals it and
      opens the next; once full, every candidate triggers retrieval (MemFlow's single-prompt
      inference and stage 1). Either way a chunk overlapping the sink records nothing (the sink
      keeps it in view), and a candidate joins once its chunk left the window.
    - recache: "chunkwise" re-encodes, at a prompt switch, the frames the window still holds
      chunk by chunk, block-causally; "joint" re-encodes the last sink_size + local_attn_size
      frames (the official local_attn_size, which counts the sink) in ONE forward in which every
      re-encoded frame attends every other; only the frames the window holds are kept.
    - recache_sink: "keep" never re-encodes the sink; "reencode_early" (MemFlow's global_sink
      true) re-encodes everything from frame 0 under the new prompt, sink included, when the
      chunk at which the switch takes effect starts at frame <= sink_size + local_attn_size
      (chunkwise replays those frames from their kept latents, also those the window had
      evicted); "replace" (LongLive's global_sink false, memory-free only) makes the first
      sink_size re-encoded frames the sink for the rest of the video.
    - context_noise: "none" writes the clean chunk into the cache; "schedule_table" first adds
      noise at the sigma of the training table's entry nearest the context timestep, as the
      official training rollout does (about 0.005 at timestep 0 with shift 5). It applies to the
      write of each generated chunk; recache re-encodes clean latents (as the official recache).
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
    record_cadence: Literal["interval", "every_chunk"] = "interval"
    recache: Literal["chunkwise", "joint"] = "chunkwise"
    recache_sink: Literal["keep", "reencode_early", "replace"] = "keep"
    context_noise: Literal["none", "schedule_table"] = "none"

    def __post_init__(self) -> None:
        # Ranges hold whatever `enabled` and `sma` say (a memory-free config can be switched on at a stage
        # boundary or by a flag, and a value that is never in range is a mistake either way).
        for key in ("bank_size", "record_interval", "sma_topk"):
            whole(f"memory.{key}", getattr(self, key), low=1)
        for key in ("sink_size", "local_attn_size", "num_frame_per_block"):
            whole(f"memory.{key}", getattr(self, key))
        for key in ("enabled", "relevance_softmax", "sma", "sma_include_sink"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"memory.{key} must be true or false, got {getattr(self, key)!r}")
        self.window  # validates the window geometry  # noqa: B018
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"memory.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.recache_sink == "replace" and self.enabled:
            raise ValueError(
                "memory.recache_sink='replace' (LongLive's global_sink false) is for memory-free runs: the new "
                "sink could hold frames the bank holds too; turn the memory off (memory.enabled: false in YAML, "
                "--memory off in generation) or choose another recache_sink"
            )
        if self.enabled and self.local_attn_size == -1:
            raise ValueError("memory.local_attn_size=-1 (unbounded window) leaves nothing for a memory to recall")

    def unused_options(self) -> tuple[str, ...]:
        """The options this mode does not read: the bank's when the memory is off, SMA's when SMA is off."""
        bank = ("bank_size", "record_interval", "prototype", "relevance_softmax", "record_cadence")
        sma = ("sma_topk", "sma_include_sink")
        return (*bank, *sma) if not self.enabled else sma if not self.sma else ()

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
