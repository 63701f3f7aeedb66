"""What every streaming forward attends, written out from the documented rule, and a frame-tagging probe.

The reference lists, per forward of a rollout with prompt switches, the cached frames it attends
as (absolute frame, prompt version of its keys/values), per head. It is computed from the rule,
not from the cache code:
- a chunk ending (exclusively) at e attends the frames j < its start with j >= e - local_attn_size
  (the window) or j < sink_size (the sink), among the frames the cache holds; a written frame is
  held while it is a sink frame or within the last local_attn_size - chunk frames written;
- at a switch (before the first chunk starting at or after it) the held non-sink frames are
  re-encoded under the new prompt, in forwards that follow the chunk grid, in order, each
  attending by the same rule (frames evicted before the switch are gone);
- NAM: chunk c (on the grid, c >= sink_size, every record_interval-th chunk) leaves its first
  frame as a candidate; it joins the bank before the first forward whose window starts at or
  after the chunk's end; a full bank keeps its bank_size - 1 frames most relevant to the
  forward's prompt, then takes the candidate; re-encoded chunks drop their old candidates;
- SMA: per head, the sink frames outside the window and the bank frames compete; the top-k by
  the head's score are attended.
The probe backbone writes keys that carry (frame, version) and planted relevance scores, so what
the real KV cache hands to attention can be read back exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from memflow_train.memory import MemoryPolicy, StreamingKVCache, TextKeys
from memflow_train.models.causal_wan import TextContext

D = 8  # key dims: 0-1 NAM relevance under even/odd prompts, 2-3 SMA score of heads 0/1, 4 frame, 5 version
HEADS = 2

Attended = tuple[tuple[tuple[int, int], ...], ...]  # per head, sorted (frame, version) pairs
Forward = tuple[int, int, Attended]  # (first frame, frames, attended)


def nam_score(frame: int, prompt: int) -> float:
    """Planted relevance of a frame to a prompt (distinct across frames for frames < 97)."""
    return ((frame * 37 + (prompt % 2) * 11) % 97) / 97


def sma_score(frame: int, head: int) -> float:
    return ((frame * 53 + head * 29 + 5) % 89) / 89


@dataclass
class ReferenceCache:
    """The rule above, on sets of frames."""

    cfg: MemoryPolicy
    held: dict[int, int] = field(default_factory=dict)  # frame -> version held
    bank: list[tuple[int, int]] = field(default_factory=list)
    pending: list[tuple[int, int]] = field(default_factory=list)  # (chunk start, version)

    def attend(self, start: int, frames: int, prompt: int) -> Attended:
        c = self.cfg
        end = start + frames
        window_lo = max(0, end - c.local_attn_size)
        if c.enabled:
            while self.pending and self.pending[0][0] + c.num_frame_per_block <= window_lo:
                self._insert(self.pending.pop(0), prompt)
        window = {(j, v) for j, v in self.held.items() if window_lo <= j < start}
        sink = {(j, v) for j, v in self.held.items() if j < min(c.sink_size, window_lo)}
        if not c.enabled:
            return tuple(tuple(sorted(window | sink)) for _ in range(HEADS))
        if not c.sma:
            return tuple(tuple(sorted(window | sink | set(self.bank))) for _ in range(HEADS))
        per_head = []
        for h in range(HEADS):
            candidates = sorted(sink) + list(self.bank)
            chosen = sorted(candidates, key=lambda fv: -sma_score(fv[0], h))[: c.sma_topk]
            per_head.append(tuple(sorted(window | set(chosen))))
        return tuple(per_head)

    def _insert(self, candidate: tuple[int, int], prompt: int) -> None:
        if len(self.bank) == self.cfg.bank_size:
            keep = sorted(self.bank, key=lambda fv: -nam_score(fv[0], prompt))[: self.cfg.bank_size - 1]
            self.bank = sorted(keep)
        self.bank.append(candidate)

    def write(self, start: int, frames: int, version: int) -> None:
        c = self.cfg
        n, end = c.num_frame_per_block, start + frames
        for j in range(start, end):
            self.held[j] = version
        keep_from = end - (c.local_attn_size - n)
        self.held = {j: v for j, v in self.held.items() if j < c.sink_size or j >= keep_from}
        if not c.enabled:
            return
        for chunk in range(start, end):
            if chunk % n or chunk < c.sink_size or (chunk // n) % c.record_interval:
                continue
            if any(f == chunk for f, _ in self.bank + self.pending):
                continue
            self.pending.append((chunk, version))

    def switch(self, next_frame: int) -> list[tuple[int, int]]:
        """Forget the frames to re-encode; returns the replay forwards."""
        c = self.cfg
        n = c.num_frame_per_block
        first = min(max(next_frame - (c.local_attn_size - n), c.sink_size), next_frame)
        self.held = {j: v for j, v in self.held.items() if j < first}
        self.pending = [(f, v) for f, v in self.pending if f < first]
        bounds = [first] + [b for b in range(first + 1, next_frame) if b % n == 0] + [next_frame]
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if a < b]


def reference_rollout(cfg: MemoryPolicy, switches: list[int], total: int, steps: int) -> list[Forward]:
    """Every forward of a rollout of `total` frames: `steps` reads and one write per chunk, replays at switches."""
    n = cfg.num_frame_per_block
    ref = ReferenceCache(cfg)
    out: list[Forward] = []
    for start in range(0, total, n):
        prompt = sum(s <= start for s in switches)
        if start > 0 and any(start - n < s <= start for s in switches):
            for a, b in ref.switch(start):
                out.append((a, b - a, ref.attend(a, b - a, prompt)))
                ref.write(a, b - a, prompt)
        attended = ref.attend(start, n, prompt)
        out += [(start, n, attended)] * (steps + 1)
        ref.write(start, n, prompt)
    return out


class FrameTagBackbone:
    """A backbone for the cache protocol (prepare, kv_for_attention, append) whose keys carry
    their frame, the prompt version they were encoded under and planted scores; it records what
    every forward attends. Used with the real StreamingGenerator and caches."""

    def __init__(self) -> None:
        self.forwards: list[Forward] = []

    def new_kv_cache(self, config: MemoryPolicy) -> StreamingKVCache:
        return StreamingKVCache(1, config)

    @staticmethod
    def prompt(index: int) -> TextContext:
        keys = torch.zeros(1, HEADS, 1, D)
        keys[..., index % 2] = 1.0
        keys[..., 7] = float(index)  # the version, for the probe to read (frame keys are 0 there)
        return TextContext([keys], [keys.clone()])

    @staticmethod
    @functools.cache
    def keys(start: int, frames: int, version: int) -> torch.Tensor:
        """(1, HEADS, frames, D); shared between calls (the cache never writes into keys)."""
        k = torch.zeros(1, HEADS, frames, D)
        for i, j in enumerate(range(start, start + frames)):
            k[:, :, i, 0], k[:, :, i, 1] = nam_score(j, 0), nam_score(j, 1)
            k[:, :, i, 2], k[:, :, i, 3] = sma_score(j, 0), sma_score(j, 1)
            k[:, :, i, 4], k[:, :, i, 5] = j, version
        return k

    def forward_chunk(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text: TextContext,
        cache: StreamingKVCache,
        frame_offset: int | None = None,
        update_cache: bool = False,
        write_from: int | None = None,
    ) -> torch.Tensor:
        offset = cache.next_frame if frame_offset is None else frame_offset
        frames = hidden_states.shape[2]
        version = int(text.keys[0][0, 0, 0, 7])
        cache.prepare(offset, frames, [TextKeys(text.keys[0])])
        k = self.keys(offset, frames, version)
        q = torch.zeros(1, HEADS, frames, D)
        q[:, 0, :, 2], q[:, 1, :, 3] = 1.0, 1.0
        keys, _ = cache[0].kv_for_attention(q, k, k, offset, frames)
        cached = keys[0, :, : keys.shape[2] - frames, 4:6].long().tolist()
        self.forwards.append((offset, frames, tuple(tuple(sorted(map(tuple, head))) for head in cached)))
        if update_cache:
            extra = {} if write_from is None else {"write_from": write_from}
            cache[0].append(k, k, offset, frames, TextKeys(text.keys[0]), **extra)
        return torch.zeros_like(hidden_states)
