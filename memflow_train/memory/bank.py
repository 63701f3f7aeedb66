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

    def record(self, k: torch.Tensor, v: torch.Tensor, start: int, num_frames: int, text: TextKeys | None):
        """Offer freshly written frames [start, start + num_frames), keys/values (B, H, F*T, D).

        Every chunk that starts inside them and is recorded by the cadence (record_cadence:
        every record_interval-th chunk, or every chunk) leaves a candidate. Chunks overlapping
        the sink are skipped (the sink keeps them in view), and so is a chunk whose candidate is
        already held. A piece that starts inside a chunk (a replay's first piece) records nothing.
        """
        cfg = self.config
        n = cfg.num_frame_per_block
        kf = k.detach().unflatten(2, (num_frames, -1))  # (B, H, F, T, D)
        vf = v.detach().unflatten(2, (num_frames, -1))
        for chunk in range(-(-start // n) * n, start + num_frames, n):
            interval = cfg.record_cadence == "interval" and (chunk // n) % cfg.record_interval
            if interval or chunk < cfg.sink_size or self._holds(chunk):
                continue
            a, b = chunk - start, min(chunk - start + n, num_frames)
            proto_k, proto_v = self._prototype(kf[:, :, a:b], vf[:, :, a:b], text)
            self.pending.append(Candidate(proto_k, proto_v, chunk, chunk + n))

    def _prototype(
        self, kf: torch.Tensor, vf: torch.Tensor, text: TextKeys | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame (B, H, T, D) standing for a chunk's frames (B, H, F, T, D)."""
        if self.config.prototype == "first_frame":
            return kf[:, :, 0].contiguous(), vf[:, :, 0].contiguous()
        if text is None:
            raise ValueError("the relevance_merge prototype needs the prompt's text keys")
        softmax = self.config.relevance_softmax
        scores = frame_relevance(kf, text, softmax=softmax)
        weights = scores if softmax else scores.softmax(-1)  # (B, F), sums to 1
        w = weights[:, None, :, None, None]
        return (kf.float() * w).sum(2).to(kf.dtype).contiguous(), (vf.float() * w).sum(2).to(vf.dtype).contiguous()

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
        cfg = self.config
        if cfg.record_cadence == "every_chunk" and len(self) < cfg.bank_size:
            group = cfg.num_frame_per_block * cfg.record_interval
            if int(self.frames[0, -1]) // group == cand.frame // group:  # the open slot is rewritten
                self.k, self.v, self.frames = self.k[:, :, :-1], self.v[:, :, :-1], self.frames[:, :-1]
        elif len(self) >= cfg.bank_size:
            if text is None:
                raise ValueError("retrieval needs the current prompt's text keys")
            keep = cfg.bank_size - 1
            scores = frame_relevance(self.k, text, softmax=cfg.relevance_softmax)  # (B, n)
            index = scores.topk(keep, dim=1).indices.sort(dim=1).values  # temporal order
            self.k, self.v = _gather_frames(self.k, index), _gather_frames(self.v, index)
            self.frames = self.frames.gather(1, index)
        self.k = torch.cat([self.k, cand.k[:, :, None]], 2)
        self.v = torch.cat([self.v, cand.v[:, :, None]], 2)
        self.frames = torch.cat([self.frames, new_frames], 1)

    def rewind(self, frame: int) -> None:
        """Forget candidates whose frame is re-encoded (at or after `frame`); replayed chunks record again."""
        if self.frames is not None and bool((self.frames >= frame).any()):
            raise ValueError(f"cannot rewind to frame {frame}: the memory bank already holds later frames")
        self.pending = [c for c in self.pending if c.frame < frame]

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
