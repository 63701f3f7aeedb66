"""MemFlow's memory as one policy: Narrative Adaptive Memory (NAM), read through Sparse Memory Activation (SMA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memflow_train.checks import whole
from memflow_train.memory.policy import LayerMemory, MemoryPolicy

CHOICES = {
    "prototype": ("first_frame", "relevance_merge"),
    "record_cadence": ("interval", "every_chunk"),
}


@dataclass(frozen=True)
class NAM(MemoryPolicy):
    """MemFlow (arXiv 2512.14699): a bank of bank_size past frames per layer, refilled by relevance to the prompt.

    A candidate frame is recorded every record_interval chunks (prototype: the chunk's first frame, as MemFlow's
    code, or its frames merged by text relevance, as the paper); it joins the bank once its chunk has left the
    local window, evicting by relevance to the current prompt (raw mean of scaled dot products, or softmax over
    frames). With sma=True, Sparse Memory Activation keeps only the sma_topk memory frames per head that are most
    relevant to the chunk's queries (sink frames compete too if sma_include_sink). bank_size=0 keeps nothing
    and equals MemoryFree.

    record_cadence (official-parity modes; README, "differences" table): "interval" records a candidate on
    chunks whose index is a multiple of record_interval (MemFlow's interactive inference and stage 2).
    "every_chunk" records every chunk: while the bank has room, a candidate overwrites the open (newest) slot
    unless that slot's frame came from an earlier group of record_interval chunks, which seals it and opens the
    next; once full, every candidate triggers retrieval (MemFlow's single-prompt inference and stage 1). Either
    way a chunk overlapping the sink records nothing (the sink keeps it in view), and a candidate joins once its
    chunk left the window.
    """

    bank_size: int = 3
    record_interval: int = 3
    prototype: Literal["first_frame", "relevance_merge"] = "first_frame"
    relevance_softmax: bool = False
    sma: bool = False
    sma_topk: int = 3
    sma_include_sink: bool = True
    record_cadence: Literal["interval", "every_chunk"] = "interval"

    def __post_init__(self) -> None:
        # Ranges hold whatever `sma` says (a value that is never in range is a mistake either way).
        whole("memory.bank_size", self.bank_size, low=0)
        for key in ("record_interval", "sma_topk"):
            whole(f"memory.{key}", getattr(self, key), low=1)
        for key in ("relevance_softmax", "sma", "sma_include_sink"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"memory.{key} must be true or false, got {getattr(self, key)!r}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"memory.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        super().__post_init__()

    @property
    def budget(self) -> int:
        return self.bank_size

    def new_layer_memory(self) -> LayerMemory | None:
        from memflow_train.memory.bank import NarrativeMemoryBank

        return NarrativeMemoryBank(self) if self.bank_size else None

    def unused_options(self) -> dict[str, str]:
        """The bank's and SMA's options when the bank is empty (bank_size 0), SMA's when SMA is off."""
        bank = ("record_interval", "prototype", "relevance_softmax", "record_cadence", "sma")
        sma = ("sma_topk", "sma_include_sink")
        if not self.bank_size:
            return {key: "bank_size is 0" for key in (*bank, *sma)}
        return {key: "sma is false" for key in sma} if not self.sma else {}

    @property
    def max_attended_frames(self) -> int:
        if self.sma and self.bank_size:
            sink = 0 if self.sma_include_sink else self.sink_size
            return sink + self.sma_topk + self.local_attn_size
        return super().max_attended_frames
