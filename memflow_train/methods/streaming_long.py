"""Streaming long tuning (stage 2): one long rollout carried across training steps.

A sequence lives across steps in a SequenceState: the generator's stream (KV cache, memory bank,
recent clean frames), the prompt pair, the switch frame and the frames generated so far. Each
step continues the sequence by frames_per_step frames (exit-step gradients on generator steps),
supervises the last `window` frames with the DMD loss only on the new frames, and trains the
critic on the same window. A sequence restarts from the current batch once it reaches
max_length. A narrative whose switch frames the data fixes is followed as it is: every prompt
from its start frame, and the teacher and critic see each window frame's own prompt. Otherwise
(prompt pairs, switch -1) each sequence switches prompt once, at a random chunk drawn identically
on every rank, and the window is scored under the prompt at its end. At every switch the recent
frames are re-encoded under the new prompt (recache). The state is saved in checkpoints, so a
resumed run continues the same sequence.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from memflow_train.checks import whole
from memflow_train.memory import MemoryConfig
from memflow_train.methods.hparams import coerce
from memflow_train.methods.self_forcing import PromptBatch, SelfForcingDMD, TextBatch
from memflow_train.models.causal_wan import FramePrompts
from memflow_train.rollout import PromptSchedule, Stream
from memflow_train.strategies.zero import Lockstep


@dataclass
class SequenceState:
    stream: Stream
    texts: TextBatch  # prompt slots 0 (before the switch) and 1 (after it), or the narrative's (switches fixed)
    switch_frame: int  # the drawn switch (-1 when the narrative fixes its switches)
    end: int  # the sequence's length: max_length, or the narrative's when shorter
    history: torch.Tensor | None = None  # (B, C, n, H, W): the last generated frames still in the window

    @property
    def length(self) -> int:
        return self.stream.next_frame

    def state_dict(self) -> dict:
        t = self.texts
        texts = {"embeds": t.embeds, "mask": t.mask, "negative": t.negative, "negative_mask": t.negative_mask}
        return {
            "stream": self.stream.state_dict(),
            "texts": {**texts, "segment_start": t.segment_start},
            "switch_frame": self.switch_frame,
            "end": self.end,
            "history": self.history,
        }

    @property
    def narrative(self) -> bool:
        """The data fixes the switches: the narrative's prompts are followed."""
        return self.switch_frame < 0


class StreamingLongTuning(SelfForcingDMD):
    def __init__(
        self,
        *args: Any,
        max_length: int = 240,
        frames_per_step: int = 21,
        window: int = 21,
        min_switch_frame: int | None = None,
        **kwargs: Any,
    ) -> None:
        """max_length: latent frames per sequence; frames_per_step: new frames each step (whole
        chunks); window: supervised frames (the newest; loss on the new ones only);
        min_switch_frame: earliest switch (default: one window in). Other arguments: SelfForcingDMD."""
        super().__init__(*args, **kwargs)
        self.hparams.update(
            max_length=max_length, frames_per_step=frames_per_step, window=window, min_switch_frame=min_switch_frame
        )
        n = self.memory.num_frame_per_block
        for name, value in (("max_length", max_length), ("frames_per_step", frames_per_step), ("window", window)):
            whole(name, value, low=1)
        if min_switch_frame is not None:
            whole("min_switch_frame", min_switch_frame, low=1)
        for name, value in (("max_length", max_length), ("frames_per_step", frames_per_step)):
            if value < n or value % n:
                raise ValueError(f"{name} ({value}) must be a positive multiple of memory.num_frame_per_block ({n})")
        if window < frames_per_step:
            raise ValueError(f"window ({window}) must be at least frames_per_step ({frames_per_step})")
        if max_length < frames_per_step:
            raise ValueError(f"max_length ({max_length}) must be at least frames_per_step ({frames_per_step})")
        self.max_length = max_length
        self.frames_per_step = frames_per_step
        self.window = window
        self.min_switch_frame = window if min_switch_frame is None else min_switch_frame
        if not 0 < self.min_switch_frame < max_length:
            raise ValueError(f"min_switch_frame ({self.min_switch_frame}) must lie in (0, max_length={max_length})")
        if -(-self.min_switch_frame // n) * n >= max_length:
            raise ValueError(
                f"min_switch_frame ({self.min_switch_frame}) takes effect at the next {n}-frame chunk boundary, frame "
                f"{-(-self.min_switch_frame // n) * n}, which is not before max_length ({max_length}): no sequence "
                "would ever switch prompt"
            )
        self._warned_prompts = False
        self.sequence: SequenceState | None = None
        self._pending_state: dict | None = None

    # ------------------------------------------------------------------------------------ sequence

    def _start_sequence(self, batch: PromptBatch, step: int) -> SequenceState:
        texts = self._texts(batch)
        if texts.switches_fixed:
            n = self.memory.num_frame_per_block
            end = min(self.max_length, int(batch.num_frames.min()) // n * n)
            if end < n:
                raise ValueError(f"narratives of {int(batch.num_frames.min())} latent frames hold no {n}-frame chunk")
            return SequenceState(self.sampler.new_stream(), texts, -1, end)
        if texts.mask.shape[1] > 2 and bool(texts.mask[:, 2:].any()) and not self._warned_prompts:
            self._warned_prompts = True
            warnings.warn(
                f"samples with {texts.mask.shape[1]} prompts and no switch frames fixed by the data: a sequence switches "
                "once, from the first prompt to the second; the later prompts are not used (fix the switch frames in "
                "the data to follow every prompt)",
                stacklevel=2,
            )
        # Samples with one prompt keep it after the switch (their padded slot 1 is empty).
        single = ~texts.mask[:, 1:2].any(-1) if texts.mask.shape[1] > 1 else None
        if single is None:
            embeds, mask = texts.embeds.repeat(1, 2, 1, 1), texts.mask.repeat(1, 2, 1)
        else:
            embeds, mask = texts.embeds[:, :2].clone(), texts.mask[:, :2].clone()
            embeds[single.squeeze(1), 1], mask[single.squeeze(1), 1] = (
                embeds[single.squeeze(1), 0],
                mask[single.squeeze(1), 0],
            )
        n = self.memory.num_frame_per_block
        first, last = -(-self.min_switch_frame // n), self.max_length // n - 1
        chunk = int(torch.randint(first, max(first, last) + 1, (1,), generator=self._shared_rng(step, "switch")))
        return SequenceState(
            self.sampler.new_stream(),
            TextBatch(embeds, mask, texts.negative, texts.negative_mask),
            chunk * n,
            self.max_length,
        )

    def _prompts(self, state: SequenceState, grad: bool) -> PromptSchedule:
        t = state.texts
        with torch.set_grad_enabled(grad):
            if state.narrative:
                contexts = [
                    self._context(self.generator, t.embeds[:, p], t.mask[:, p]) for p in range(t.embeds.shape[1])
                ]
                return PromptSchedule.per_sample(contexts, t.segment_start, t.mask.any(-1))
            a = self._context(self.generator, t.embeds[:, 0], t.mask[:, 0])
            b = self._context(self.generator, t.embeds[:, 1], t.mask[:, 1])
        return PromptSchedule([(0, a), (state.switch_frame, b)])

    def continue_sequence(self, state: SequenceState, step: int, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate the next frames; returns the supervised window and the mask of its new frames."""
        b, c = state.texts.embeds.shape[0], self.generator.config.in_channels
        new = min(self.frames_per_step, state.end - state.length)
        rng = self._sample_noise(step, "stream/noise", b)
        noise = rng.randn((b, c, new, *self.latent_size), self.device, self.generator.dtype)
        exit_steps = self._draw_exit_steps(
            new // self.memory.num_frame_per_block, self._shared_rng(step, "stream/exit")
        )
        self.last_exit_steps = exit_steps
        start = state.length
        x_new = self.sampler.rollout(
            state.stream,
            noise,
            self._prompts(state, grad),
            exit_steps,
            start if grad else None,
            rng,
            Lockstep(self).any,
        ).float()
        past = state.history if state.history is not None else x_new[:, :, :0]
        window = torch.cat([past, x_new], 2)[:, :, -self.window :]
        keep = self.window - self.frames_per_step  # frames of this window the next one still shows
        state.history = window.detach()[:, :, window.shape[2] - keep :] if keep > 0 else None
        mask = torch.zeros(1, 1, window.shape[2], 1, 1, dtype=torch.bool, device=window.device)
        mask[:, :, -new:] = True
        return window, mask

    def _window_condition(self, state: SequenceState, frames: int) -> torch.Tensor | FramePrompts:
        """What conditions the teacher and critic on the last `frames` frames: each frame's own prompt when the
        narrative fixes them, else the prompt at the window's end."""
        if state.narrative:
            return state.texts.frame_prompts(frames, offset=state.length - frames)
        slot = 1 if state.length - 1 >= state.switch_frame else 0
        return state.texts.embeds[:, slot]

    # ------------------------------------------------------------------------------------ training

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        step = self.global_step
        if self._pending_state is not None:
            self.sequence = self._restore_sequence(self._pending_state)
            self._pending_state = None
        if self.sequence is None or self.sequence.length >= self.sequence.end:
            self.sequence = self._start_sequence(batch, step)
        state = self.sequence
        train_generator = step % self.hparams.gen_update_ratio == 0
        switched_before = state.length >= state.switch_frame

        window, mask = self.continue_sequence(state, step, grad=train_generator)
        cond = self._window_condition(state, window.shape[2])
        losses: dict[str, torch.Tensor] = {}
        if train_generator:
            losses["generator"], logs = self.distribution_matching_loss(window, cond, state.texts.negative, step, mask)
            for k, v in logs.items():
                self.step_log.put(f"train/{k}", v)
        losses["critic"] = self.critic_loss(window.detach(), cond, step)
        self.update_networks(losses, step)
        self.step_log.put("train/sequence_length", float(state.length))
        if not state.narrative:
            self.step_log.put(
                "train/prompt_switched", float(not switched_before and state.length >= state.switch_frame)
            )
        self.step_log.flush(self)

    # ------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.sequence is not None:
            checkpoint["sequence_state"] = self.sequence.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._pending_state = checkpoint.get("sequence_state")  # restored on the right device at the next step
        saved = (checkpoint.get("hyper_parameters") or {}).get("memory")
        if self._pending_state is not None and saved is not None and coerce(MemoryConfig, saved) != self.memory:
            warnings.warn(
                "the memory settings changed at resume: the carried sequence (its KV cache and bank were built "
                "under the old ones) is dropped and the next step starts a new sequence",
                stacklevel=2,
            )
            self._pending_state = None

    def _restore_sequence(self, state: dict) -> SequenceState:
        stream = self.sampler.new_stream()
        stream.load_state_dict(_to_device(state["stream"], self.device))
        t = _to_device(state["texts"], self.device)
        texts = TextBatch(t["embeds"], t["mask"], t["negative"], t["negative_mask"], t.get("segment_start"))
        history = state["history"].to(self.device) if state["history"] is not None else None
        end = int(state.get("end", self.max_length))
        return SequenceState(stream, texts, int(state["switch_frame"]), end, history)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
