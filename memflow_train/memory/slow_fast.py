"""A slow-fast memory: a slow store of consolidated frames beside the fast FIFO window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memflow_train.checks import number, whole
from memflow_train.memory.frame_store import FrameStore, descriptor, similarity
from memflow_train.memory.policy import LayerMemory, MemoryPolicy


@dataclass(frozen=True)
class SlowFastMemory(MemoryPolicy):
    """Context Forcing: sink + a slow memory, where frames are consolidated by surprisal, + a fast FIFO.

    The fast memory is the local window (FIFO). A frame leaving it meets the slow store of at most slow_size
    slots. Its surprisal is 1 - its highest cosine similarity (unit mean key per head, averaged over heads) to a
    slot: how badly the slow store already explains it. Below surprise_threshold it is consolidated into that
    slot (the slot's keys/values become the running mean of the frames merged into it); at or above, it opens a
    new slot, and when the store is full the two most similar slots are first consolidated into one. A slot
    stands at the position of its first frame. slow_size=0 keeps nothing (MemoryFree).

    Simplified: surprisal is measured on attention keys against the store, not by a predictor's error; merged
    keys average post-RoPE keys of different positions (as MemFlow's relevance_merge prototype does within a
    chunk); one decision per batch (similarities averaged over the batch's samples).
    """

    slow_size: int = 3
    surprise_threshold: float = 0.1

    def __post_init__(self) -> None:
        whole("memory.slow_size", self.slow_size, low=0)
        number("memory.surprise_threshold", self.surprise_threshold, low=0.0, high=2.0)
        super().__post_init__()

    @property
    def budget(self) -> int:
        return self.slow_size

    def new_layer_memory(self) -> LayerMemory | None:
        return SlowStore(self) if self.slow_size else None

    def unused_options(self) -> dict[str, str]:
        return {"surprise_threshold": "slow_size is 0"} if not self.slow_size else {}


class SlowStore(FrameStore):
    """One layer's slow store (SlowFastMemory)."""

    config: SlowFastMemory

    def reset(self) -> None:
        super().reset()
        # (B, n), the same in every row (decisions are per batch); batch-first like every state tensor, so that a
        # recache of some samples keeps the other samples' rows (rollout.streaming._keep_rows)
        self.counts: torch.Tensor | None = None  # frames merged into each slot
        self.last: torch.Tensor | None = None  # newest frame merged into each slot

    def newest_frame(self) -> int:
        return -1 if self.last is None else int(self.last.max())

    def admit(self, k: torch.Tensor, v: torch.Tensor, frame: int) -> None:
        if self.held is None:
            self._open(k, v, frame)
            return
        slots = descriptor(self.k)  # (B, H, n, D)
        sims = similarity(descriptor(k), slots)
        best = int(sims.argmax())
        if 1.0 - float(sims[best]) < self.config.surprise_threshold:
            self._merge_into(best, k[:, :, None], v[:, :, None], 1, frame)
            return
        if len(self) >= self.config.slow_size:
            pair = torch.einsum("bhnd,bhmd->nm", slots, slots)
            pair.fill_diagonal_(float("-inf"))
            i, j = divmod(int(pair.argmax()), pair.shape[1])
            i, j = min(i, j), max(i, j)
            self._merge_into(
                i, self.k[:, :, j : j + 1], self.v[:, :, j : j + 1], int(self.counts[0, j]), int(self.last[0, j])
            )
            self.drop(j)
        self._open(k, v, frame)

    def _open(self, k: torch.Tensor, v: torch.Tensor, frame: int) -> None:
        self.insert(k, v, frame)
        at = int((self.held[0] == frame).nonzero()[0])
        b = self.held.shape[0]
        one = torch.ones(b, 1, dtype=torch.long, device=self.held.device)
        it = torch.full((b, 1), frame, dtype=torch.long, device=self.held.device)
        if self.counts is None:
            self.counts, self.last = one, it
        else:
            self.counts = torch.cat([self.counts[:, :at], one, self.counts[:, at:]], 1)
            self.last = torch.cat([self.last[:, :at], it, self.last[:, at:]], 1)

    def _merge_into(self, slot: int, k: torch.Tensor, v: torch.Tensor, count: int, last: int) -> None:
        """Consolidate `count` frames whose mean is k, v (B, H, 1, T, D) into slot: running mean, in float32."""
        c = int(self.counts[0, slot])
        w = count / (c + count)

        def mix(store: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            merged = store[:, :, slot : slot + 1].float() * (1 - w) + new.float() * w
            return torch.cat([store[:, :, :slot], merged.to(store.dtype), store[:, :, slot + 1 :]], 2)

        self.k, self.v = mix(self.k, k), mix(self.v, v)
        self.counts = self.counts.clone()
        self.counts[:, slot] = c + count
        self.last = self.last.clone()
        self.last[:, slot] = max(int(self.last[0, slot]), last)

    def drop(self, slot: int) -> None:
        keep = [i for i in range(len(self)) if i != slot]
        super().drop(slot)
        self.counts, self.last = self.counts[:, keep], self.last[:, keep]
        if not keep:
            self.counts = self.last = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "counts": self.counts, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.counts, self.last = state["counts"], state["last"]
