"""A layer memory of whole past frames, offered one by one as they leave the local window.

The shared part of the per-frame policies (SurpriseGatedBank, SlowFastMemory): the frames the local window drops
(LayerMemory.evict: views of the cache's storage, no copy while the window holds them) wait until the next
chunk's commit, where the policy's `admit` decides what enters. Frames inside the sink are never offered (the sink keeps them in view). Held frames
are (B, H, n, T, D) post-RoPE keys/values at their original positions, in temporal order, with their absolute
frame index (B, n). Decisions are made per batch: samples of a batch share the timeline and hold the same frame
slots (their contents differ).
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from memflow_train.memory.frames import FrameRun
from memflow_train.memory.policy import LayerMemory, MemoryPolicy, MemoryRead
from memflow_train.memory.relevance import TextKeys


def descriptor(x: torch.Tensor) -> torch.Tensor:
    """A frame's unit descriptor per head: x (B, H, T, D) or (B, H, n, T, D) -> (B, H, D) or (B, H, n, D) float32,
    the mean over its tokens scaled to unit length."""
    mean = x.float().mean(-2)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of descriptors a (B, H, D) to b (B, H, n, D), averaged over samples and heads: (n,)."""
    return torch.einsum("bhd,bhnd->n", a, b) / (a.shape[0] * a.shape[1])


class FrameStore(LayerMemory):
    """Held frames + pending candidates; subclasses decide admission in `admit`."""

    def __init__(self, config: MemoryPolicy) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.k: torch.Tensor | None = None  # (B, H, n, T, D)
        self.v: torch.Tensor | None = None
        self.held: torch.Tensor | None = None  # (B, n) absolute frame index of each slot
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (k (B, H, T, D), v, frame)

    def frames(self) -> torch.Tensor | None:
        return self.held

    def evict(self, run: FrameRun) -> None:
        kf, vf = run.frames_view(run.k), run.frames_view(run.v)
        for i in range(run.num_frames):
            if run.start + i >= self.config.sink_size:
                self.pending.append((kf[:, :, i], vf[:, :, i], run.start + i))

    def commit(self, window_start: int, text: TextKeys | None) -> None:
        while self.pending and self.pending[0][2] < window_start:
            k, v, frame = self.pending.pop(0)
            self.admit(k, v, frame)
        self.route(text)

    @abstractmethod
    def admit(self, k: torch.Tensor, v: torch.Tensor, frame: int) -> None:
        """A frame (B, H, T, D) that left the window: take it in, merge it, or drop it."""

    def route(self, text: TextKeys | None) -> None:
        """Before the chunk, with its prompt: choose what `read` returns (default: every held frame)."""

    def read(self, sink_runs: list[FrameRun]) -> MemoryRead | None:
        return MemoryRead(self.k, self.v) if len(self) else None

    def insert(self, k: torch.Tensor, v: torch.Tensor, frame: int) -> None:
        """Add a slot, keeping temporal order."""
        b = k.shape[0]
        new = torch.full((b, 1), frame, dtype=torch.long, device=k.device)
        if self.held is None:
            self.k, self.v, self.held = k[:, :, None], v[:, :, None], new
            return
        at = int((self.held[0] < frame).sum())
        self.k = torch.cat([self.k[:, :, :at], k[:, :, None], self.k[:, :, at:]], 2)
        self.v = torch.cat([self.v[:, :, :at], v[:, :, None], self.v[:, :, at:]], 2)
        self.held = torch.cat([self.held[:, :at], new, self.held[:, at:]], 1)

    def drop(self, slot: int) -> None:
        keep = [i for i in range(len(self)) if i != slot]
        if not keep:
            self.k = self.v = self.held = None
            return
        index = torch.tensor(keep, device=self.held.device)
        self.k, self.v = self.k.index_select(2, index), self.v.index_select(2, index)
        self.held = self.held.index_select(1, index)

    def newest_frame(self) -> int:
        """The newest frame any held slot stands for (-1 when empty)."""
        return -1 if self.held is None else int(self.held.max())

    def rewind(self, frame: int) -> None:
        if self.newest_frame() >= frame:
            raise ValueError(f"cannot rewind to frame {frame}: the memory already holds later frames")
        self.pending = [c for c in self.pending if c[2] < frame]

    def tensors(self) -> list[torch.Tensor]:
        parts = [t for t in (self.k, self.v) if t is not None]
        return parts + [t for c in self.pending for t in c[:2]]

    def state_dict(self) -> dict:
        return {
            "k": self.k,
            "v": self.v,
            "frames": self.held,
            "pending": [{"k": k, "v": v, "frame": f} for k, v, f in self.pending],
        }

    def load_state_dict(self, state: dict) -> None:
        self.k, self.v, self.held = state["k"], state["v"], state["frames"]
        self.pending = [(c["k"], c["v"], int(c["frame"])) for c in state["pending"]]
