"""When a carried rollout (streaming long tuning) reaches its steady state: KV cache and bank full.

The cache's geometry (sink, window, bank cadence, eviction) does not depend on values, so the real cache
classes are run on one-token frames until they stop growing. The planner then shortens the traced sequence
to that point plus two steps (and lets the prompt switch, with its recache, fall in between), since what a
sequence holds stops growing there: the recent latents and the supervised window are bounded too.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule

from memflow_train.memory import MemoryPolicy, StreamingKVCache
from memflow_train.memory.relevance import TextKeys


def settled_frames(memory: MemoryPolicy, limit: int) -> int:
    """Latent frames after which a stream's KV cache + bank hold no more (at most `limit`)."""
    n = memory.num_frame_per_block
    cache = StreamingKVCache(1, memory)
    text = TextKeys(torch.zeros(1, 1, 1, 2), torch.ones(1, 1, dtype=torch.bool))
    frames = torch.zeros(1, 1, n, 2)
    grown, last = n, -1
    for start in range(0, max(limit, n), n):
        cache.prepare(start, n, [text])
        cache[0].append(frames, frames, start, n, text)
        size = cache.nbytes()
        if size > last:
            grown, last = start + n, size
    return grown


def shorten_for_planning(module: LightningModule) -> None:
    """A carried-sequence method (max_length, frames_per_step, min_switch_frame) made to reach its steady
    state and its prompt switch within a few steps: the switch no earlier than the cache settles, the
    sequence two steps longer. No-op for other methods."""
    if not all(hasattr(module, k) for k in ("max_length", "frames_per_step", "min_switch_frame", "memory")):
        return
    n = module.memory.num_frame_per_block
    settle = -(-settled_frames(module.memory, module.max_length) // n) * n
    switch = max(n, settle)
    length = min(module.max_length, switch + 2 * module.frames_per_step)
    if -(-switch // n) * n >= length:
        return  # the configured sequence is already this short
    module.min_switch_frame, module.max_length = switch, length
