"""A novelty-gated memory bank: evicted frames enter by how new they are, under a fixed budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memflow_train.checks import number, whole
from memflow_train.memory.frame_store import FrameStore, descriptor, similarity
from memflow_train.memory.policy import LayerMemory, MemoryPolicy, MemoryRead
from memflow_train.memory.relevance import TextKeys, frame_relevance


@dataclass(frozen=True)
class SurpriseGatedBank(MemoryPolicy):
    """Surprise Forcing (arXiv 2607.18436): a bank that admits frames evicted from the local window by their
    novelty, measured on value-token descriptors, under a budget, with relevance-aware routing.

    A frame's descriptor is the unit mean of its value tokens per head. Its novelty is 1 - its highest cosine
    similarity to a held frame (averaged over heads): a frame below novelty_threshold is not admitted. While the
    bank has room an admitted frame is added; once it holds bank_size frames, the candidate replaces the held
    frame most redundant with the others (highest similarity to another held frame or to the candidate) when the
    candidate's novelty exceeds that frame's (priority replacement: the bank keeps its most diverse frames).
    Routing: with read_topk, a chunk reads only the read_topk held frames most relevant to its prompt (NAM's
    relevance, memflow_train.memory.relevance); None reads all. bank_size=0 keeps nothing (MemoryFree).

    Simplified from the paper: novelty against the held frames only (not a learned predictor), one decision per
    batch (similarities averaged over the batch's samples: with one video per GPU, the official setting, this is
    the per-video rule), routing by the prompt only (not by the chunk's queries).
    """

    bank_size: int = 3
    novelty_threshold: float = 0.05
    read_topk: int | None = None

    def __post_init__(self) -> None:
        whole("memory.bank_size", self.bank_size, low=0)
        number("memory.novelty_threshold", self.novelty_threshold, low=0.0, high=2.0)
        if self.read_topk is not None:
            whole("memory.read_topk", self.read_topk, low=1)
            if self.bank_size and self.read_topk >= self.bank_size:
                raise ValueError(
                    f"memory.read_topk ({self.read_topk}) must be below bank_size ({self.bank_size}) to route; "
                    "leave it out (null) to read every held frame"
                )
        super().__post_init__()

    @property
    def budget(self) -> int:
        return self.bank_size

    def new_layer_memory(self) -> LayerMemory | None:
        return NoveltyGatedStore(self) if self.bank_size else None

    def unused_options(self) -> dict[str, str]:
        return {key: "bank_size is 0" for key in ("novelty_threshold", "read_topk")} if not self.bank_size else {}

    @property
    def max_attended_frames(self) -> int:
        read = self.read_topk if self.read_topk is not None else self.bank_size
        return self.sink_size + min(read, self.bank_size) + self.local_attn_size


class NoveltyGatedStore(FrameStore):
    """One layer's SurpriseGatedBank."""

    config: SurpriseGatedBank

    def reset(self) -> None:
        super().reset()
        self.routed: torch.Tensor | None = None  # (B, read_topk) slots read by the next chunk, or None: all

    def admit(self, k: torch.Tensor, v: torch.Tensor, frame: int) -> None:
        if self.held is None:
            self.insert(k, v, frame)
            return
        held = descriptor(self.v)  # (B, H, n, D)
        cand = descriptor(v)
        novelty = 1.0 - float(similarity(cand, held).max())
        if novelty < self.config.novelty_threshold:
            return
        if len(self) < self.config.bank_size:
            self.insert(k, v, frame)
            return
        every = torch.cat([held, cand[:, :, None]], 2)
        pair = torch.einsum("bhnd,bhmd->nm", every, every) / (every.shape[0] * every.shape[1])
        pair.fill_diagonal_(float("-inf"))
        redundancy = pair[:-1].max(1).values  # each held frame's highest similarity to another frame
        slot = int(redundancy.argmax())
        if novelty > 1.0 - float(redundancy[slot]):
            self.drop(slot)
            self.insert(k, v, frame)

    def route(self, text: TextKeys | None) -> None:
        self.routed = None
        topk = self.config.read_topk
        if topk is None or len(self) <= topk:
            return
        if text is None:
            raise ValueError("SurpriseGatedBank's routing (read_topk) needs the current prompt's text keys")
        scores = frame_relevance(self.k, text)  # (B, n)
        self.routed = scores.topk(topk, dim=1).indices.sort(dim=1).values

    def read(self, sink_runs: list) -> MemoryRead | None:
        if not len(self):
            return None
        if self.routed is None:
            return MemoryRead(self.k, self.v)
        b, h, _, t, d = self.k.shape
        index = self.routed[:, None, :, None, None].expand(b, h, self.routed.shape[1], t, d)
        return MemoryRead(self.k.gather(2, index), self.v.gather(2, index))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "routed": self.routed}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.routed = state["routed"]
