"""Narrative Adaptive Memory: one layer's bank of past frames, refilled by relevance to the prompt.

Frames are stored as post-RoPE keys/values at their original positions, (B, H, n, T, D), with
their absolute frame index per sample (B, n): samples of a batch share the timeline but may
keep different frames. A recorded candidate waits until its chunk has left the local window,
so a bank frame is never also in the sink or the window, and the bank never holds a frame twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memflow_train.memory.frames import FrameRun
from memflow_train.memory.nam import NAM
from memflow_train.memory.policy import LayerMemory, MemoryRead
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


class NarrativeMemoryBank(LayerMemory):
    """One layer's NAM bank (policy memflow_train.memory.NAM), read densely or through SMA."""

    def __init__(self, config: NAM) -> None:
        self.config = config
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.held: torch.Tensor | None = None  # (B, n) absolute frame indices
        self.pending: list[Candidate] = []
        self._candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # see _sma_candidates
        self._candidate_sources: tuple = (None, None)  # the sink run and self.k they were built from

    def frames(self) -> torch.Tensor | None:
        return self.held

    def reset(self) -> None:
        self.k = self.v = self.held = None
        self.pending = []
        self._candidates, self._candidate_sources = None, (None, None)

    def _holds(self, frame: int) -> bool:
        in_bank = self.held is not None and bool((self.held == frame).any())
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
        if self.held is None:
            self.k, self.v, self.held = cand.k[:, :, None], cand.v[:, :, None], new_frames
            return
        cfg = self.config
        if cfg.record_cadence == "every_chunk" and len(self) < cfg.bank_size:
            group = cfg.num_frame_per_block * cfg.record_interval
            if int(self.held[0, -1]) // group == cand.frame // group:  # the open slot is rewritten
                self.k, self.v, self.held = self.k[:, :, :-1], self.v[:, :, :-1], self.held[:, :-1]
        elif len(self) >= cfg.bank_size:
            if text is None:
                raise ValueError("retrieval needs the current prompt's text keys")
            keep = cfg.bank_size - 1
            scores = frame_relevance(self.k, text, softmax=cfg.relevance_softmax)  # (B, n)
            index = scores.topk(keep, dim=1).indices.sort(dim=1).values  # temporal order
            self.k, self.v = _gather_frames(self.k, index), _gather_frames(self.v, index)
            self.held = self.held.gather(1, index)
        self.k = torch.cat([self.k, cand.k[:, :, None]], 2)
        self.v = torch.cat([self.v, cand.v[:, :, None]], 2)
        self.held = torch.cat([self.held, new_frames], 1)

    def rewind(self, frame: int) -> None:
        """Forget candidates whose frame is re-encoded (at or after `frame`); replayed chunks record again."""
        if self.held is not None and bool((self.held >= frame).any()):
            raise ValueError(f"cannot rewind to frame {frame}: the memory bank already holds later frames")
        self.pending = [c for c in self.pending if c.frame < frame]

    def read(self, sink_runs: list[FrameRun]) -> MemoryRead | None:
        """The bank's frames; with SMA, the sink's too when sma_include_sink (they compete for the top-k)."""
        cfg = self.config
        if not cfg.sma:
            return MemoryRead(self.k, self.v) if len(self) else None
        bank = [(self.k, self.v)] if len(self) else []
        sink = [(r.frames_view(r.k), r.frames_view(r.v)) for r in sink_runs] if cfg.sma_include_sink else []
        if not bank and not sink:
            return None
        kept = self._sma_candidates(sink_runs)
        if kept is not None:
            return MemoryRead(kept[0], kept[1], cfg.sma_topk, kept[2], bool(sink), kept[3])
        parts = sink + bank
        k = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], 2)
        v = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], 2)
        return MemoryRead(k, v, cfg.sma_topk, None, bool(sink))

    def _sma_candidates(self, sink_runs: list[FrameRun]) -> tuple | None:
        """SMA's candidate frames as one tensor (B, H, n, T, D) with their mean keys, kept between calls, and
        the sink re-pointed to views of it (or None).

        Concatenating the sink and the bank, and averaging their keys, at every attention call costs as much
        as SMA saves; they only change when the bank takes a frame or the sink is written. So they are built
        once, and the sink and the bank are re-pointed to views of the one tensor (no second copy). None when
        the bank is empty or only part of the sink is visible (first chunks): the caller concatenates.
        """
        cfg = self.config
        whole_sink = len(sink_runs) == 1 and sink_runs[0].num_frames == cfg.sink_size
        if not len(self) or (cfg.sma_include_sink and cfg.sink_size and not whole_sink):
            return None
        sink = sink_runs[0] if cfg.sma_include_sink and cfg.sink_size else None
        built_from = self._candidate_sources
        if self._candidates is None or built_from[0] is not sink or built_from[1] is not self.k:
            if sink is not None:
                n = sink.num_frames
                k = torch.cat([sink.frames_view(sink.k), self.k], 2)
                v = torch.cat([sink.frames_view(sink.v), self.v], 2)
                sink = FrameRun(k[:, :, :n].flatten(2, 3), v[:, :, :n].flatten(2, 3), sink.start, n)
                self.k, self.v = k[:, :, n:], v[:, :, n:]
            else:
                k, v = self.k, self.v
            self._candidates = (k, v, k.float().mean(3))
            self._candidate_sources = (sink, self.k)
            return (*self._candidates, sink)
        return (*self._candidates, None)

    def tensors(self) -> list[torch.Tensor]:
        parts = [t for t in (self.k, self.v) if t is not None]
        return parts + [t for c in self.pending for t in (c.k, c.v)]

    def state_dict(self) -> dict:
        return {
            "k": self.k,
            "v": self.v,
            "frames": self.held,
            "pending": [{"k": c.k, "v": c.v, "frame": c.frame, "source_stop": c.source_stop} for c in self.pending],
        }

    def load_state_dict(self, state: dict) -> None:
        self._candidates, self._candidate_sources = None, (None, None)
        self.k, self.v, self.held = state["k"], state["v"], state["frames"]
        self.pending = [Candidate(c["k"], c["v"], int(c["frame"]), int(c["source_stop"])) for c in state["pending"]]
