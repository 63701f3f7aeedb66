"""Narrative Adaptive Memory: one layer's bank of past frames, refilled by relevance to the prompt.

Frames are stored as post-RoPE keys/values at their original positions, (B, H, n, T, D), with
their absolute frame index per sample (B, n): samples of a batch share the timeline but may
keep different frames. A recorded candidate waits until its chunk has left the local window,
so a bank frame is never also in the sink or the window, and the bank never holds a frame twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memflow_train.memory.config import MemoryConfig
from memflow_train.memory.relevance import TextKeys, frame_relevance


@dataclass
class Candidate:
    k: torch.Tensor  # (B, H, T, D)
    v: torch.Tensor
    frame: int  # absolute index of the frame (first_frame) or of the merged chunk's first frame
    source_stop: int  # the source chunk ends (exclusively) here; it joins the bank once this left the window


def _gather_frames(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, n, T, D), index (B, k) -> (B, H, k, T, D)."""
    b, h, _, t, d = x.shape
    return x.gather(2, index[:, None, :, None, None].expand(b, h, index.shape[1], t, d))


class NarrativeMemoryBank:
    def __init__(self, config: MemoryConfig) -> None:
        self.config = config
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.frames: torch.Tensor | None = None
        self.pending: list[Candidate] = []

    def __len__(self) -> int:
        return 0 if self.frames is None else self.frames.shape[1]

    def reset(self) -> None:
        self.k = self.v = self.frames = None
        self.pending = []

    def _holds(self, frame: int) -> bool:
        in_bank = self.frames is not None and bool((self.frames == frame).any())
        return in_bank or any(c.frame == frame for c in self.pending)

    def record(self, k: torch.Tensor, v: torch.Tensor, chunk_start: int, num_frames: int, text: TextKeys | None):
        """Offer a freshly cached chunk (B, H, F*T, D); every record_interval-th chunk leaves a candidate.

        Chunks overlapping the sink are skipped: the sink already keeps them in view.
        """
        cfg = self.config
        if (chunk_start // cfg.num_frame_per_block) % cfg.record_interval or chunk_start < cfg.sink_size:
            return
        if self._holds(chunk_start):
            return
        kf = k.detach().unflatten(2, (num_frames, -1))  # (B, H, F, T, D)
        vf = v.detach().unflatten(2, (num_frames, -1))
        if cfg.prototype == "first_frame":
            proto_k, proto_v = kf[:, :, 0], vf[:, :, 0]
        else:
            if text is None:
                raise ValueError("the relevance_merge prototype needs the prompt's text keys")
            scores = frame_relevance(kf, text, softmax=cfg.relevance_softmax)
            weights = scores if cfg.relevance_softmax else scores.softmax(-1)  # (B, F), sums to 1
            w = weights[:, None, :, None, None]
            proto_k = (kf.float() * w).sum(2).to(kf.dtype)
            proto_v = (vf.float() * w).sum(2).to(vf.dtype)
        self.pending.append(
            Candidate(proto_k.contiguous(), proto_v.contiguous(), chunk_start, chunk_start + num_frames)
        )

    def commit(self, window_start: int, text: TextKeys | None) -> None:
        """Move candidates whose chunk left the window into the bank; when full, keep the
        bank_size - 1 frames most relevant to the CURRENT prompt plus the newest candidate."""
        while self.pending and self.pending[0].source_stop <= window_start:
            self._insert(self.pending.pop(0), text)

    def _insert(self, cand: Candidate, text: TextKeys | None) -> None:
        b = cand.k.shape[0]
        new_frames = torch.full((b, 1), cand.frame, dtype=torch.long, device=cand.k.device)
        if self.frames is None:
            self.k, self.v, self.frames = cand.k[:, :, None], cand.v[:, :, None], new_frames
            return
        if len(self) >= self.config.bank_size:
            if text is None:
                raise ValueError("retrieval needs the current prompt's text keys")
            keep = self.config.bank_size - 1
            scores = frame_relevance(self.k, text, softmax=self.config.relevance_softmax)  # (B, n)
            index = scores.topk(keep, dim=1).indices.sort(dim=1).values  # temporal order
            self.k, self.v = _gather_frames(self.k, index), _gather_frames(self.v, index)
            self.frames = self.frames.gather(1, index)
        self.k = torch.cat([self.k, cand.k[:, :, None]], 2)
        self.v = torch.cat([self.v, cand.v[:, :, None]], 2)
        self.frames = torch.cat([self.frames, new_frames], 1)

    def rewind(self, frame: int) -> None:
        """Forget candidates from chunks at or after `frame` (they are re-recorded when replayed)."""
        if self.frames is not None and bool((self.frames >= frame).any()):
            raise ValueError(f"cannot rewind to frame {frame}: the memory bank already holds later frames")
        self.pending = [c for c in self.pending if c.source_stop <= frame]

    def tensors(self) -> list[torch.Tensor]:
        parts = [t for t in (self.k, self.v) if t is not None]
        return parts + [t for c in self.pending for t in (c.k, c.v)]

    def state_dict(self) -> dict:
        return {
            "k": self.k,
            "v": self.v,
            "frames": self.frames,
            "pending": [{"k": c.k, "v": c.v, "frame": c.frame, "source_stop": c.source_stop} for c in self.pending],
        }

    def load_state_dict(self, state: dict) -> None:
        self.k, self.v, self.frames = state["k"], state["v"], state["frames"]
        self.pending = [Candidate(c["k"], c["v"], int(c["frame"]), int(c["source_stop"])) for c in state["pending"]]
