"""Streaming long tuning (stage 2): one long rollout carried across training steps.

A sequence lives across steps in a SequenceState: the generator's stream (KV cache, memory bank,
recent clean frames), the prompts and where each starts, and the frames generated so far. Each
step continues the sequence by frames_per_step frames (exit-step gradients on generator steps),
supervises the last `window` frames with the DMD loss only on the new frames, and trains the
critic on the same window. A sequence restarts from the current batch once it reaches
max_length (or the shortest fixed narrative of the batch, agreed over ranks). Decided per sample:
a narrative whose switch frames the data fixes is followed as it is, every prompt from its start
frame, and the teacher and critic see each window frame's own prompt; any other sample (a prompt
pair, or one prompt kept throughout) switches once, from its prompt 0 to its prompt 1, at a random
chunk drawn identically on every rank, and its window is scored under the prompt at the window's
end. At every switch the recent frames are re-encoded under the new prompt (recache). The state is
saved in checkpoints, so a resumed run continues the same sequence.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from memflow_train.checks import whole
from memflow_train.memory import memory_policy
from memflow_train.methods.self_forcing import PromptBatch, SelfForcingDMD, TextBatch
from memflow_train.models.causal_wan import FramePrompts
from memflow_train.rollout import PromptSchedule, Stream
from memflow_train.strategies.zero import Lockstep


@dataclass
class SequenceState:
    stream: Stream
    texts: TextBatch  # every sample's prompts and where each starts (every switch fixed)
    switch_frame: int  # the drawn switch of the samples whose data fixes none
    end: int  # the sequence's length: max_length, or the shortest fixed narrative's when shorter
    history: torch.Tensor | None = None  # (B, C, n, H, W): the last generated frames still in the window
    drawn: torch.Tensor | None = None  # (B,) bool: samples switching at switch_frame (scored at window end)

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
            "drawn": self.drawn,
        }


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
        self._warned_short = False
        self.sequence: SequenceState | None = None
        self._pending_state: dict | None = None

    # ------------------------------------------------------------------------------------ sequence

    def _start_sequence(self, batch: PromptBatch, step: int) -> SequenceState:
        texts = self._texts(batch)
        n = self.memory.num_frame_per_block
        fixed = texts.fixed
        end = self.max_length
        if bool(fixed.any()):
            shortest = int(batch.num_frames.to(fixed.device)[fixed].min())
            if shortest < n:
                raise ValueError(f"narratives of {shortest} latent frames hold no {n}-frame chunk")
            end = min(end, shortest // n * n)
        end = Lockstep(self, everywhere=True).min(end)  # every rank restarts its sequence at the same step
        first, last = -(-self.min_switch_frame // n), end // n - 1
        chunk = int(torch.randint(first, max(first, last) + 1, (1,), generator=self._shared_rng(step, "switch")))
        drawn = ~fixed
        if bool(drawn.any()) and chunk * n >= end and not self._warned_short:
            self._warned_short = True
            warnings.warn(
                f"a sequence ends at frame {end} (the shortest narrative with fixed switches in this step's batch on "
                f"any rank), before "
                f"min_switch_frame takes effect (frame {first * n}): its samples without fixed switches keep their "
                "first prompt throughout; this warning is shown once",
                stacklevel=2,
            )
        return SequenceState(self.sampler.new_stream(), _with_drawn_switch(texts, drawn, chunk * n), chunk * n, end,
                             drawn=drawn)  # fmt: skip

    def _unused_prompts(self, texts: TextBatch) -> str | None:
        """Samples without fixed switches use their first two prompts: name the ones with more."""
        more = texts.unfixed & texts.mask.any(-1)[:, 2:].any(1) if texts.mask.shape[1] > 2 else None
        if more is None or not bool(more.any()):
            return None
        return (
            f"{int(more.sum())} samples of a batch have {texts.mask.shape[1]} prompts and no switch frames fixed by "
            "the data: each switches once, from its first prompt to its second, at a drawn frame; the later prompts "
            "are not used (fix the switch frames in the data to follow every prompt); this warning is shown once"
        )

    def _prompts(self, state: SequenceState, grad: bool) -> PromptSchedule:
        with torch.set_grad_enabled(grad):
            return self.prompt_schedule(state.texts)

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
        """What conditions the teacher and critic on the last `frames` frames: each frame's own prompt for a
        sample with fixed switches; the prompt at the window's end for a sample switching at the drawn frame."""
        prompts = state.texts.frame_prompts(frames, offset=state.length - frames)
        if state.drawn is not None and bool(state.drawn.any()):
            at_end = prompts.frame_prompt[:, -1:].expand_as(prompts.frame_prompt)
            chosen = torch.where(state.drawn[:, None].to(at_end.device), at_end, prompts.frame_prompt)
            prompts = FramePrompts(prompts.embeds, prompts.mask, chosen)
        return prompts.collapsed()

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
        if state.drawn is not None and bool(state.drawn.any()):
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
        if self._pending_state is not None and saved is not None and memory_policy(saved) != self.memory:
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
        end, switch = int(state.get("end", self.max_length)), int(state["switch_frame"])
        drawn = state.get("drawn")
        if drawn is None:  # saved before per-sample switches: one mode for the whole batch
            drawn = torch.full((texts.embeds.shape[0],), switch >= 0, dtype=torch.bool, device=self.device)
            if switch >= 0:
                texts = _with_drawn_switch(texts, drawn, switch)
        return SequenceState(stream, texts, switch, end, history, drawn.to(self.device))


def _with_drawn_switch(texts: TextBatch, drawn: torch.Tensor, switch: int) -> TextBatch:
    """texts with every switch fixed: the drawn samples (B,) start their prompt 1 at `switch` (a sample with
    one prompt keeps it: its slot 1 repeats slot 0), and their later prompts are unused."""
    b, p = texts.embeds.shape[:2]
    embeds = torch.cat([texts.embeds, texts.embeds[:, :1]], 1) if p < 2 else texts.embeds.clone()
    mask = torch.cat([texts.mask, texts.mask[:, :1]], 1) if p < 2 else texts.mask.clone()
    single = drawn & ~mask[:, 1].any(-1)
    embeds[single, 1], mask[single, 1] = embeds[single, 0], mask[single, 0]
    mask[drawn, 2:] = False
    starts = torch.full((b, embeds.shape[1]), -1, dtype=torch.long, device=embeds.device)
    if texts.segment_start is not None:
        starts[:, :p] = texts.segment_start.to(starts.device)
    starts[drawn, 0], starts[drawn, 1] = 0, switch
    starts[drawn, 2:] = -1
    return TextBatch(embeds, mask, texts.negative, texts.negative_mask, starts)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
