"""Per-layer streaming KV cache: sink frames + rolling local window (+ a memory policy) of post-RoPE K/V.

Keys/values are heads-first, (batch, heads, frames * tokens_per_frame, head_dim). The sink and
the local window hold contiguous runs of absolute frame indices. What one chunk attends to is
assembled from parts, in temporal order: [sink | memory | local window | the chunk]. The memory
is the policy's (memory/policy.py): the cache calls its LayerMemory and knows nothing else of it.

Protocol, per chunk (the backbone's streaming forward follows it):
  prepare(...)           once before the chunk: the memory takes in what left the window,
                         retrieving with the current prompt's text keys;
  kv_for_attention(...)  at every denoising step: the keys/values to attend (read only);
  append(...)            at the clean re-run: write the chunk (memory.record), evict what left the
                         window (memory.evict).
At a prompt switch, rewind(...) drops the frames a recache re-encodes (memory/recache.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memflow_train.memory.frames import FrameRun
from memflow_train.memory.policy import MemoryFree, MemoryPolicy, class_path
from memflow_train.memory.relevance import TextKeys
from memflow_train.memory.sma import select_memory_frames
from memflow_train.memory.window import AttentionWindow


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


class LayerKVCache:
    """The frames one self-attention layer can still attend to, and how they are evicted."""

    def __init__(self, config: MemoryPolicy) -> None:
        self.config = config
        self.window = config.window
        self.memory = config.new_layer_memory()
        self.sink: FrameRun | None = None
        self.local: FrameRun | None = None
        self.next_frame = 0
        self.floor = 0  # window frames below this were dropped by a rewind and are not expected
        self.sink_start = 0  # the sink holds the sink_size frames written from here (moved by a 'replace' recache)

    def reset(self) -> None:
        self.sink = self.local = None
        self.next_frame = self.floor = self.sink_start = 0
        if self.memory is not None:
            self.memory.reset()

    def visible_runs(self, chunk_start: int, num_frames: int) -> tuple[list[FrameRun], list[FrameRun]]:
        """Cached runs the chunk [chunk_start, chunk_start + num_frames) sees: (sink outside the window, window).

        The rule (AttentionWindow): the window [end - local_attn_size, chunk_start) plus the sink
        frames. Window frames come from the local run, or from the sink where the local run no
        longer holds them; window frames below `floor` that the sink does not hold were evicted
        before a rewind and are not expected. Any other missing frame is an error.
        """
        if chunk_start > self.next_frame:
            raise ValueError(f"chunk starts at frame {chunk_start} but only {self.next_frame} frames were cached")
        w, sink, local = self.window, self.sink, self.local
        lo = max(0, chunk_start + num_frames - w.local_attn_size) if w.bounded else 0
        outside = [p for p in [sink.slice(sink.start, min(sink.stop, lo)) if sink else None] if p is not None]
        local_start = local.start if local is not None else chunk_start
        inside = [
            p
            for p in (
                sink.slice(lo, min(chunk_start, local_start)) if sink else None,
                local.slice(lo, chunk_start) if local else None,
            )
            if p is not None
        ]
        need_lo = max(lo, self.floor)
        needed = max(0, chunk_start - need_lo)
        found = sum(max(0, min(r.stop, chunk_start) - max(r.start, need_lo)) for r in inside)
        if found != needed:
            raise RuntimeError(
                f"chunk at frame {chunk_start} needs {needed} cached frames from {need_lo} on, "
                f"found {found}: frames were evicted or never written"
            )
        return outside, inside

    def prepare(self, chunk_start: int, num_frames: int, text: TextKeys | None) -> None:
        """Before a chunk: what left the window may enter the memory (retrieval by `text`)."""
        if self.memory is not None:
            window_start = self.window.visible_ranges(chunk_start + num_frames)[-1][0]
            self.memory.commit(window_start, text)

    def kv_for_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_start: int, num_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values the chunk's queries q attend to: [sink | memory | window | the chunk itself]."""
        return self.reader(chunk_start, num_frames)(q, k, v)

    def reader(self, chunk_start: int, num_frames: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """kv_for_attention for this chunk with the cache's state fixed now: read(q, k, v) -> (keys, values).

        A chunk's attention may run again after the cache has moved on (activation checkpointing recomputes
        it in backward, after the rollout wrote later chunks); its reader still sees what the forward saw.
        """
        sink_runs, window_runs = self.visible_runs(chunk_start, num_frames)
        memory = self.memory.read(sink_runs) if self.memory is not None else None
        if memory is not None and memory.sink is not None:
            self.sink = memory.sink
        keys = [] if memory is not None and memory.includes_sink else [r.k for r in sink_runs]
        values = [] if memory is not None and memory.includes_sink else [r.v for r in sink_runs]
        dense = memory is not None and memory.topk is None
        if dense:
            keys.append(memory.k.flatten(2, 3))
            values.append(memory.v.flatten(2, 3))
        sparse = memory if memory is not None and not dense else None
        window_k, window_v = [r.k for r in window_runs], [r.v for r in window_runs]

        def read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            selected_k, selected_v = [], []
            if sparse is not None:
                mk, mv, _ = select_memory_frames(q, sparse.k, sparse.v, sparse.topk, key_means=sparse.key_means)
                selected_k, selected_v = [mk], [mv]
            return _cat([*keys, *selected_k, *window_k, k]), _cat([*values, *selected_v, *window_v, v])

        return read

    def append(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        chunk_start: int,
        num_frames: int,
        text: TextKeys | None = None,
        write_from: int | None = None,
    ) -> None:
        """Write a forward's keys/values (detached), offer them to the memory (record), evict what no later
        chunk's window can see and hand it to the memory (evict).

        Frames below write_from (default chunk_start) were context only (a joint recache) and are
        not written, except into a sink that still lacks them. Raises ValueError when the
        written frames do not continue the cache.
        """
        write_from = chunk_start if write_from is None else write_from
        if write_from != self.next_frame:
            raise ValueError(f"the cache expects frame {self.next_frame} next, got a write from frame {write_from}")
        if not chunk_start <= write_from <= chunk_start + num_frames:
            raise ValueError(f"write_from {write_from} outside the forward's frames {chunk_start}..")
        run = FrameRun(k.detach(), v.detach(), chunk_start, num_frames)
        w = self.window
        if w.bounded and w.sink_size:
            held = self.sink.stop if self.sink is not None else self.sink_start
            part = run.slice(held, self.sink_start + w.sink_size)
            if part is not None:
                if part.start != held:
                    raise ValueError(f"the sink needs frame {held} next, the write starts at {part.start}")
                self.sink = part if self.sink is None else self.sink.append(part, None)
        new = run.slice(write_from, run.stop)
        if new is not None:
            keep = w.cached_window_frames
            self.local = new if self.local is None else self.local.append(new, None)
            if self.memory is not None:
                self.memory.record(new.k, new.v, new.start, new.num_frames, text)
            if keep is not None and self.local.num_frames > keep:
                evicted = self.local.slice(self.local.start, self.local.stop - keep)
                self.local = self.local.slice(self.local.stop - keep, self.local.stop) if keep else None
                if self.memory is not None:
                    self.memory.evict(evicted)
        self.next_frame = run.stop

    def rewind(self, frame: int, new_sink_start: int | None = None) -> None:
        """Drop cached frames >= frame so they can be re-encoded (recache after a prompt switch).

        Frames the window had already evicted stay gone: replayed chunks see the sink, the memory,
        what the window still held below `frame` and the frames replayed before them.
        new_sink_start: drop the whole sink; the next writes rebuild it from that frame on
        (memflow_train.memory.recache). Raises ValueError past the cached frames, or when the
        memory holds frames >= frame.
        """
        if frame > self.next_frame:
            raise ValueError(f"cannot rewind to frame {frame}: only {self.next_frame} frames were cached")
        if self.memory is not None:
            self.memory.rewind(frame)
        if new_sink_start is not None:
            self.sink, self.sink_start = None, new_sink_start
        else:
            self.sink = self.sink.slice(self.sink.start, frame) if self.sink is not None else None
        self.local = self.local.slice(self.local.start, frame) if self.local is not None else None
        self.floor = self.local.start if self.local is not None else frame
        self.next_frame = frame

    def tensors(self) -> list[torch.Tensor]:
        own = [t for part in (self.sink, self.local) if part is not None for t in (part.k, part.v)]
        return own + (self.memory.tensors() if self.memory is not None else [])

    def state_dict(self) -> dict:
        def dump(run: FrameRun | None) -> dict | None:
            return None if run is None else {"k": run.k, "v": run.v, "start": run.start, "num_frames": run.num_frames}

        state = {
            "sink": dump(self.sink),
            "local": dump(self.local),
            "next_frame": self.next_frame,
            "floor": self.floor,
            "sink_start": self.sink_start,
        }
        if self.memory is not None:
            state["memory"] = self.memory.state_dict()
            state["memory_policy"] = class_path(self.config)
        return state

    def load_state_dict(self, state: dict) -> None:
        def load(d: dict | None) -> FrameRun | None:
            return None if d is None else FrameRun(d["k"], d["v"], int(d["start"]), int(d["num_frames"]))

        saved = state.get("memory", state.get("bank"))  # "bank": states saved before memory policies
        if (saved is not None) != (self.memory is not None):
            raise ValueError("cache state and cache disagree on whether a memory is kept (memory policy)")
        policy = state.get("memory_policy", class_path(self.config))
        if policy != class_path(self.config):
            raise ValueError(
                f"cache state was saved under memory policy {policy}, the cache runs {class_path(self.config)}"
            )
        self.sink, self.local = load(state["sink"]), load(state["local"])
        self.next_frame, self.floor = int(state["next_frame"]), int(state["floor"])
        self.sink_start = int(state.get("sink_start", 0))  # states saved before recache_sink existed
        if self.memory is not None:
            self.memory.load_state_dict(saved)


class StreamingKVCache:
    """One LayerKVCache per transformer block, advanced together."""

    def __init__(self, num_layers: int, config: MemoryPolicy | AttentionWindow) -> None:
        if isinstance(config, AttentionWindow):
            config = MemoryFree(
                sink_size=config.sink_size,
                local_attn_size=config.local_attn_size,
                num_frame_per_block=config.num_frame_per_block,
            )
        self.config = config
        self.window = config.window
        self.layers = [LayerKVCache(config) for _ in range(num_layers)]

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def next_frame(self) -> int:
        return self.layers[0].next_frame

    def prepare(self, chunk_start: int, num_frames: int, texts: list[TextKeys] | None) -> None:
        for i, layer in enumerate(self.layers):
            layer.prepare(chunk_start, num_frames, texts[i] if texts is not None else None)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def rewind(self, frame: int, new_sink_start: int | None = None) -> None:
        for layer in self.layers:
            layer.rewind(frame, new_sink_start)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def state_dict(self) -> dict:
        return {"layers": [layer.state_dict() for layer in self.layers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["layers"]) != len(self.layers):
            raise ValueError(f"state has {len(state['layers'])} layers, cache has {len(self.layers)}")
        for layer, s in zip(self.layers, state["layers"], strict=True):
            layer.load_state_dict(s)
