"""Which frames a prompt switch re-encodes, in which forwards, and what happens to the sink.

At a switch, the frames the next chunks still attend are re-encoded under the new prompt from
their clean latents ("recache", LongLive). The plan is a pure function of the memory config and
the frame where the next chunk starts; the rollout runs its forwards, the KV cache follows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from memflow_train.memory.policy import MemoryPolicy


@dataclass(frozen=True)
class RecachePlan:
    """rewind_to: the cache drops its frames >= this and the forwards write them again.
    pieces: the forwards as (start, stop) frame ranges, in order; frames of a piece below
    rewind_to are context only (attended by the piece, not written).
    new_sink_start: None keeps the sink; otherwise the sink is dropped and rebuilt from the
    sink_size frames written from this frame on."""

    rewind_to: int
    pieces: tuple[tuple[int, int], ...]
    new_sink_start: int | None = None

    @property
    def start(self) -> int:
        """First frame the plan re-encodes (its clean latent is needed)."""
        return self.pieces[0][0] if self.pieces else self.rewind_to


def recache_latent_frames(config: MemoryPolicy) -> int | None:
    """How many of the newest clean latents a stream keeps for recache (None: all of them)."""
    w = config.window
    if not w.bounded:
        return None
    if config.recache == "chunkwise" and config.recache_sink == "keep":
        return w.cached_window_frames
    return config.sink_size + config.local_attn_size


def plan_recache(config: MemoryPolicy, next_frame: int) -> RecachePlan:
    """The recache before the chunk starting at next_frame (chunk-aligned), after a switch.

    chunkwise: the frames the window still holds, [next - (local_attn_size - chunk), next), are
    replayed in forwards that follow the original chunk boundaries (a first piece may be the
    tail of a chunk whose head is in the sink), each attending block-causally what it attended
    when generated, minus frames evicted before the switch. joint: the last sink_size +
    local_attn_size frames in one forward (MemFlow / LongLive `_recache_after_switch`). The sink
    (frames below sink_size) is excluded unless recache_sink re-encodes or replaces it.
    Unbounded windows re-encode every frame.
    """
    t, n, w = next_frame, config.num_frame_per_block, config.window
    if t % n:
        raise ValueError(f"a recache happens before a chunk; frame {t} is not a multiple of {n}")
    if not w.bounded:
        start = rewind = 0
        sink_start = None
    else:
        held = w.cached_window_frames
        span = held if config.recache == "chunkwise" else config.sink_size + config.local_attn_size
        start, rewind, sink_start = max(t - span, 0), max(t - held, 0), None
        early = t <= config.sink_size + config.local_attn_size
        if config.recache_sink == "reencode_early" and early:
            start = rewind = sink_start = 0
        elif config.recache_sink == "replace" and config.sink_size:
            sink_start = start  # the writes below rewind_to fill the new sink
        else:  # the sink keeps its frames
            start, rewind = min(max(start, config.sink_size), t), min(max(rewind, config.sink_size), t)
    if config.recache == "joint" or start == t:
        pieces = ((start, t),) if start < t else ()
    else:
        cuts = [start, *range((start // n + 1) * n, t, n), t]
        pieces = tuple(zip(cuts[:-1], cuts[1:], strict=True))
    return RecachePlan(rewind, pieces, sink_start)
