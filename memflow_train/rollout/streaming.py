"""Chunk-by-chunk generation with the model's own KV cache (self-forcing rollouts and inference).

Per chunk: denoise the noise through the few-step timesteps, predicting x0 and renoising to the
next timestep; then run the model once more on the clean chunk at the context timestep to write
its keys/values into the cache (and the memory). For training, a chunk may stop at an exit step
whose forward keeps gradients; everything else runs without grad, and the cache stores detached
tensors, so no gradient flows through the history.

At a prompt switch the recent frames are re-encoded under the new prompt (recache): the cache
rewinds and the clean latents kept in `Stream.recent` are run again as its plan says
(memflow_train.memory.recache: chunkwise or joint, what happens to the sink), so the next chunk
sees them with the new prompt's cross-attention. The memory bank keeps what it had; its next
retrieval scores with the new prompt. When only some samples of a batch switch, the others keep
their cache exactly as it was (a recache is not a no-op even under an unchanged prompt: it
re-reads the held frames without those the window had evicted).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from memflow_train.memory import MemoryPolicy, StreamingKVCache
from memflow_train.memory.recache import plan_recache, recache_latent_frames
from memflow_train.models.causal_wan import CausalWanTransformer, TextContext
from memflow_train.rollout.prompts import PromptSchedule
from memflow_train.sampling import FlowMatchSchedule, SampleNoise


class Stream:
    """One ongoing video: the KV cache with its memory, and the clean latents its window holds."""

    def __init__(self, cache: StreamingKVCache) -> None:
        self.cache = cache
        self.recent: torch.Tensor | None = None  # (B, C, n, H, W): clean latents of frames [next - n, next)
        self.keep = recache_latent_frames(cache.config)  # how many recent latents a recache may need

    @property
    def next_frame(self) -> int:
        return self.cache.next_frame

    def remember(self, clean: torch.Tensor) -> None:
        keep = self.keep
        recent = clean.detach() if self.recent is None else torch.cat([self.recent, clean.detach()], 2)
        self.recent = recent if keep is None else recent[:, :, max(0, recent.shape[2] - keep) :]

    def state_dict(self) -> dict:
        return {"cache": self.cache.state_dict(), "recent": self.recent}

    def load_state_dict(self, state: dict) -> None:
        self.cache.load_state_dict(state["cache"])
        self.recent = state["recent"]


class StreamingGenerator:
    """Few-step streaming sampler around a causal backbone."""

    def __init__(
        self,
        model: CausalWanTransformer,
        schedule: FlowMatchSchedule,
        denoising_steps: list[int],
        memory: MemoryPolicy,
        context_timestep: float = 0.0,
    ) -> None:
        self.model = model
        self.schedule = schedule
        self.timesteps = schedule.warp(denoising_steps)
        self.memory = memory
        self.context_timestep = context_timestep

    @property
    def frames_per_chunk(self) -> int:
        return self.memory.num_frame_per_block

    def new_stream(self) -> Stream:
        return Stream(self.model.new_kv_cache(self.memory))

    def with_memory(self, memory: MemoryPolicy) -> StreamingGenerator:
        """The same model, schedule and steps with another memory configuration (e.g. memory-free)."""
        other = copy.copy(self)
        other.memory = memory
        return other

    def _t(self, value: float, like: torch.Tensor) -> torch.Tensor:
        return torch.full((like.shape[0],), float(value), device=like.device)

    def denoise_chunk(
        self,
        stream: Stream,
        noise: torch.Tensor,
        text: TextContext,
        exit_step: int | None = None,
        grad: bool = False,
        generator: torch.Generator | SampleNoise | None = None,
    ) -> torch.Tensor:
        """x0 of one chunk from noise (B, C, n, H, W). Only the exit step's forward keeps a graph (if grad).

        generator: where the renoising draws come from (per-sample SampleNoise in training, a
        torch.Generator or the global RNG in generation).
        """
        last = len(self.timesteps) - 1 if exit_step is None else exit_step
        if not 0 <= last < len(self.timesteps):
            raise ValueError(f"exit step {exit_step} outside the {len(self.timesteps)} denoising steps")
        x = noise
        for i in range(last + 1):
            t = self._t(self.timesteps[i], x)
            with torch.set_grad_enabled(grad and i == last):
                flow = self.model.forward_chunk(x, t, text, stream.cache)
                x0 = self.schedule.x0_from_flow(x, flow, t)
            if i < last:
                fresh = _randn_like(x, generator)
                x = self.schedule.add_noise(x0, fresh, self._t(self.timesteps[i + 1], x))
        return x0

    @torch.no_grad()
    def write_chunk(
        self,
        stream: Stream,
        clean: torch.Tensor,
        text: TextContext,
        generator: torch.Generator | SampleNoise | None = None,
    ) -> None:
        """The clean re-run at the context timestep that writes the chunk into the cache.

        With memory.context_noise "schedule_table" the chunk is first noised at the sigma the
        official rollout uses (Self-Forcing `context_noise`: the table entry nearest the context
        timestep); noise comes from `generator`.
        """
        t = self._t(self.context_timestep, clean)
        x = clean
        if self.memory.context_noise == "schedule_table":
            sigma = self.schedule.table_sigma(self.context_timestep)
            x = ((1 - sigma) * clean.double() + sigma * _randn_like(clean, generator).double()).to(clean.dtype)
        self.model.forward_chunk(x, t, text, stream.cache, update_cache=True)
        stream.remember(clean)

    @torch.no_grad()
    def recache(self, stream: Stream, text: TextContext, rows: torch.Tensor | None = None) -> None:
        """Re-encode the frames the next chunks attend under a new prompt (memflow_train.memory.recache).

        rows (B,) bool: the samples that switch; the others' cache is left exactly as it was (default: all
        switch). Raises RuntimeError when the recache moves frames so that rows cannot be kept apart (the
        'replace' sink of a batch whose samples switch at different frames)."""
        if stream.recent is None:
            return
        if rows is not None and not bool(rows.all()):
            before = stream.cache.state_dict()
            self.recache(stream, text)
            stream.cache.load_state_dict(_keep_rows(before, stream.cache.state_dict(), ~rows.to(stream.recent.device)))
            return
        t = stream.next_frame
        plan = plan_recache(self.memory, t)
        if t - plan.start > stream.recent.shape[2]:
            raise RuntimeError(
                f"recache needs the latents from frame {plan.start}, the stream kept {stream.recent.shape[2]}"
            )
        stream.cache.rewind(plan.rewind_to, plan.new_sink_start)
        for a, b in plan.pieces:
            piece = stream.recent[:, :, stream.recent.shape[2] - (t - a) : stream.recent.shape[2] - (t - b) or None]
            self.model.forward_chunk(
                piece,
                self._t(self.context_timestep, piece),
                text,
                stream.cache,
                frame_offset=a,
                update_cache=True,
                write_from=max(a, plan.rewind_to),
            )

    def prompt_for_chunk(
        self,
        stream: Stream,
        prompts: PromptSchedule,
        start: int,
        batch: int,
        any_rank: Callable[[bool], bool] | None = None,
    ) -> TextContext:
        """The text of the chunk starting at `start`; first, if it is the first chunk of a new prompt for some
        samples (a switch frame inside the previous chunk or at its start), their recache. any_rank: see
        rollout."""
        text = prompts.at(start)
        rows = prompts.switching(start, self.frames_per_chunk)
        rows = torch.full((batch,), rows) if isinstance(rows, bool) else rows
        switch = bool(rows.any())
        if any_rank(switch) if any_rank is not None else switch:
            self.recache(stream, text, rows)
        return text

    def rollout(
        self,
        stream: Stream,
        noise: torch.Tensor,
        prompts: PromptSchedule,
        exit_steps: list[int] | None = None,
        grad_from_frame: int | None = None,
        generator: torch.Generator | SampleNoise | None = None,
        any_rank: Callable[[bool], bool] | None = None,
    ) -> torch.Tensor:
        """Generate noise.shape[2] frames (whole chunks) continuing `stream`; returns their x0.

        exit_steps[c] is chunk c's exit step (default: all steps). Chunks starting at or after
        absolute frame grad_from_frame keep the exit step's graph (None: no gradients).
        A prompt switch inside the generated span triggers a recache before its chunk (of the samples
        that switch). any_rank(flag) -> whether any rank's flag is set: under parameter sharding every
        rank must run the same forwards, so a rank recaches (keeping all its rows) when another does.
        """
        n = self.frames_per_chunk
        if noise.shape[2] % n:
            raise ValueError(f"{noise.shape[2]} frames are not a whole number of {n}-frame chunks")
        chunks = noise.shape[2] // n
        if exit_steps is not None and len(exit_steps) != chunks:
            raise ValueError(f"got {len(exit_steps)} exit steps for {chunks} chunks")
        outputs = []
        for c in range(chunks):
            start = stream.next_frame
            text = self.prompt_for_chunk(stream, prompts, start, noise.shape[0], any_rank)
            grad = grad_from_frame is not None and start >= grad_from_frame
            exit_step = None if exit_steps is None else exit_steps[c]
            x0 = self.denoise_chunk(stream, noise[:, :, c * n : (c + 1) * n], text, exit_step, grad, generator)
            self.write_chunk(stream, x0.detach(), text, generator)
            outputs.append(x0)
        return torch.cat(outputs, 2)


def _keep_rows(before: object, after: object, keep: torch.Tensor) -> object:
    """A cache state whose rows `keep` (batch dimension 0 of every tensor) are `before`'s, the others `after`'s.
    Raises RuntimeError when the two differ in anything but tensor values."""
    if isinstance(before, dict) and isinstance(after, dict) and before.keys() == after.keys():
        # floor: the lowest frame a rewind kept, the same frames for every row (their values differ)
        return {k: after[k] if k == "floor" else _keep_rows(before[k], after[k], keep) for k in before}
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [_keep_rows(b, a, keep) for b, a in zip(before, after, strict=True)]
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.shape == after.shape:
        return torch.where(keep.view(-1, *[1] * (before.ndim - 1)), before, after)
    if before == after:
        return after
    raise RuntimeError(
        "a recache of some samples of a batch moved the cache of all (e.g. recache_sink 'replace'): samples "
        "switching at different frames cannot share a stream in this mode; use batch_size 1 or shared switch frames"
    )


def _randn_like(x: torch.Tensor, source: torch.Generator | SampleNoise | None) -> torch.Tensor:
    if isinstance(source, SampleNoise):
        return source.randn(tuple(x.shape), x.device, x.dtype)
    return torch.randn(x.shape, generator=source, device=x.device, dtype=x.dtype)
