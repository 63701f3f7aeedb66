"""Flow-matching fine-tuning of the backbone on users' video latents.

attention "streaming" (diffusion forcing, the causal generator): each chunk gets its own noise
level. The model predicts the flow of the noisy chunk through the streaming path, attending to
the clean earlier chunks in its KV cache and memory (written by the re-run at the context
timestep, without grad, and re-encoded at a prompt switch exactly as generation recaches), so
what is trained is exactly what streaming generation runs.
attention "bidirectional" (a teacher, as Wan is trained): one noise level per sample, every frame
attends every other.
loss = mean over chunks (frames) of MSE(flow_pred, noise - x0).

Prompts: a narrative whose switch frames the data fixes conditions each chunk (streaming: the
prompt at the chunk's start, as generation does) or frame (bidirectional) with its own prompt;
otherwise the first prompt conditions everything. prompt_dropout p: each training sample has, with
probability p, every prompt replaced by the unconditional one (caption dropout, which classifier-free
guidance needs: Ho & Salimans, arXiv 2207.12598; Wan and diffusers' text-to-image scripts train so). The
unconditional prompt is the batch's negative embedding, the one guided sampling and DMD's teacher score
use as their uncond, else the text encoder's `negative_prompt`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from memflow_train.checks import IgnoredSettingWarning, number, number_range, whole
from memflow_train.memory import NAM, MemoryFree, MemoryPolicy, memory_policy
from memflow_train.methods.ema import ParameterEMA
from memflow_train.methods.hparams import coerce, save_plain_hyperparameters
from memflow_train.methods.lora import add_lora
from memflow_train.methods.optim import apply_optimizer_specs, optimizer_diagnosis
from memflow_train.methods.self_forcing import NonFiniteLossError
from memflow_train.methods.specs import (
    BackboneSpec,
    LoraSpec,
    OnDemandTextEncoder,
    OptimizerSpec,
    TextEncoderSpec,
    check_method_numbers,
)
from memflow_train.methods.step_log import StepLog
from memflow_train.models.causal_wan import FramePrompts
from memflow_train.rollout import PromptSchedule, StreamingGenerator
from memflow_train.sampling import FlowMatchSchedule, SampleNoise
from memflow_train.strategies.zero import Lockstep


class LatentBatch(Protocol):
    prompts: list[list[str]]
    latents: torch.Tensor | None  # (B, C, T, H, W)
    num_frames: torch.Tensor  # (B,) real latent frames per sample
    segment_start: torch.Tensor  # (B, P): latent frame where each prompt starts; -1 = not fixed by the data
    prompt_embeds: torch.Tensor | None  # (B, P, L, D): prompt 0 is the caption
    prompt_mask: torch.Tensor | None
    negative_embeds: torch.Tensor | None  # (B, L, D): the unconditional prompt (prompt_dropout)
    negative_mask: torch.Tensor | None


class FlowMatchingFinetune(LightningModule):
    def __init__(
        self,
        model: BackboneSpec,
        memory: MemoryPolicy = NAM(),  # noqa: B008 (frozen dataclass)
        attention: Literal["streaming", "bidirectional"] = "streaming",
        max_frames: int | None = None,
        timestep_shift: float = 5.0,
        timestep_range: tuple[float, float] = (0.0, 1000.0),
        context_timestep: float = 0.0,
        optimizer: OptimizerSpec = OptimizerSpec(lr=1e-5, betas=(0.9, 0.999), grad_clip=1.0),  # noqa: B008
        lora: LoraSpec | None = None,
        gradient_checkpointing: bool = False,
        text_encoder: TextEncoderSpec | None = None,
        ema_decay: float | None = None,
        ema_start_step: int = 0,
        nonfinite: Literal["stop", "skip"] = "stop",
        max_skipped_updates: int = 3,
        prompt_dropout: float = 0.0,
        negative_prompt: str = "",
        seed: int = 0,
    ) -> None:
        """attention: "streaming" trains the causal generator chunk by chunk with its cache and memory,
        "bidirectional" a full-attention model (a teacher or critic); memory then only sets the chunk size.
        max_frames: latent frames used per sample (whole chunks, from the start); default all.
        optimizer.grad_clip is applied by this module; leave the Trainer's gradient clipping off.
        nonfinite: "stop" at the first non-finite loss, or "skip" the step; after more than
        max_skipped_updates skipped steps in a row the run stops.
        prompt_dropout: probability in [0, 1) that a training sample is conditioned by the unconditional prompt
        (the batch's negative embedding, else `negative_prompt` through text_encoder) instead of its own; 0 (the
        default) trains only conditional. Validation is always conditional."""
        super().__init__()
        model, memory = coerce(BackboneSpec, model), memory_policy(memory)
        optimizer, lora = coerce(OptimizerSpec, optimizer), coerce(LoraSpec, lora)
        text_encoder = coerce(TextEncoderSpec, text_encoder)
        save_plain_hyperparameters(self, locals())
        self.optimizer_spec = optimizer
        self.model = model.build()
        if lora is not None:
            add_lora(self.model, lora)
        self.model.gradient_checkpointing = gradient_checkpointing
        self.text_encoder = OnDemandTextEncoder(text_encoder) if text_encoder is not None else None
        if self.text_encoder is not None and self.text_encoder.width != self.model.config.text_dim:
            raise ValueError(
                f"text_encoder width {self.text_encoder.width} differs from model.text_dim {self.model.config.text_dim}"
            )
        check_method_numbers(
            timestep_shift=timestep_shift,
            context_timestep=context_timestep,
            ema_decay=ema_decay,
            ema_start_step=ema_start_step,
            seed=seed,
        )
        if max_frames is not None:
            whole("max_frames", max_frames, low=1)
        number_range("timestep_range", timestep_range, low=0, high=1000)
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        if attention not in ("streaming", "bidirectional"):
            raise ValueError(f"attention must be 'streaming' or 'bidirectional', got {attention!r}")
        whole("max_skipped_updates", max_skipped_updates, low=0)
        number("prompt_dropout", prompt_dropout, low=0, high=1, high_open=True)
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        if negative_prompt and not prompt_dropout:
            warnings.warn(
                f"negative_prompt {negative_prompt!r} is not used: it is the unconditional prompt of prompt_dropout, "
                "which is 0",
                stacklevel=2,
            )
        self.step_log = StepLog(progress_bar=("train/loss",))
        self._warned: set[str] = set()
        self.skipped_in_a_row = 0
        n = memory.num_frame_per_block
        if max_frames is not None and (max_frames < n or max_frames % n):
            raise ValueError(f"max_frames ({max_frames}) must be a positive multiple of num_frame_per_block ({n})")
        self.memory = memory
        self.attention = attention
        if attention == "bidirectional":
            _warn_unused_by_bidirectional(memory, context_timestep)
        self.schedule = FlowMatchSchedule(timestep_shift)
        # Its cache writes and recache are the streaming path's (the denoising steps are not used here).
        self.writer = StreamingGenerator(self.model, self.schedule, [1000], memory, context_timestep)
        self.ema = ParameterEMA(ema_decay, ema_start_step) if ema_decay is not None else None

    def configure_optimizers(self) -> dict:
        spec = self.optimizer_spec
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, spec.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resumed run trains with the configured optimizer settings, not the checkpoint's."""
        apply_optimizer_specs(self.optimizers(), self.lr_schedulers(), {None: self.optimizer_spec})

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ):
        clip = self.optimizer_spec.grad_clip
        if clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def _prompts(self, batch: LatentBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every prompt's embeddings (B, P, L, D), mask (B, P, L) and the starts (B, P) when the data fixes the
        switches of several prompts (padding slots moved past any frame), else (caption only, None)."""
        if batch.prompt_embeds is not None:
            embeds, mask = batch.prompt_embeds, batch.prompt_mask
        elif self.text_encoder is not None:
            counts = [len(p) for p in batch.prompts]
            e, m = self.text_encoder([p for ps in batch.prompts for p in ps], self.device)
            embeds = e.new_zeros(len(counts), max(counts), *e.shape[1:])
            mask = m.new_zeros(len(counts), max(counts), m.shape[1])
            i = 0
            for b, n in enumerate(counts):
                embeds[b, :n], mask[b, :n] = e[i : i + n], m[i : i + n]
                i += n
        else:
            raise ValueError("the batch has no prompt_embeds and no text_encoder is configured")
        embeds, mask = embeds.to(self.device, self.model.dtype), mask.to(self.device)
        real = mask.any(-1)
        starts = getattr(batch, "segment_start", None)
        if starts is None or embeds.shape[1] < 2 or not bool(real[:, 1:].any()):
            return embeds[:, :1], mask[:, :1], None
        starts = starts.to(self.device)
        unfixed = (real & (starts < 0)).any(1)  # switches left to a method: the caption conditions the sample
        if bool(unfixed.any()):
            self._warn_once(
                "unfixed",
                f"{int(unfixed.sum())} samples of a batch have several prompts but no switch frames fixed by the data: "
                "flow matching conditions each of them by its first prompt only (fix the switch frames to follow them)",
            )
            real = real & ~unfixed[:, None]
            real[:, 0] = True
        return embeds, mask, torch.where(real, starts, torch.iinfo(torch.long).max)

    def _drop_prompts(
        self, batch: LatentBatch, embeds: torch.Tensor, mask: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds (B, P, L, D) / mask (B, P, L) with every real prompt slot of the samples drawn for dropout
        (probability prompt_dropout, keyed by step and global sample index) replaced by the unconditional
        prompt; the slots' starts are kept. Raises ValueError when there is no unconditional prompt."""
        b = embeds.shape[0]
        negative, negative_mask = getattr(batch, "negative_embeds", None), getattr(batch, "negative_mask", None)
        if negative is None and self.text_encoder is None:  # checked on every batch, not only when one drops
            raise ValueError(
                "prompt_dropout needs an unconditional prompt: the batch has no negative_embeds (prepare the shards "
                "with a negative prompt and read the 'negative' field) and no text_encoder is configured to embed "
                "negative_prompt"
            )
        if negative is not None and self.hparams.negative_prompt:
            self._warn_once(
                "negative",
                f"negative_prompt {self.hparams.negative_prompt!r} is not used: the batch's negative embeddings (the "
                "shards' negative prompt) are the unconditional prompt of prompt_dropout",
            )
        drop = SampleNoise(self.hparams.seed, step, "prompt_dropout", first_index=self.global_rank * b, count=b)
        drop = (drop.rand() < self.hparams.prompt_dropout).to(self.device)
        if not bool(drop.any()):
            return embeds, mask
        if negative is None:
            negative, negative_mask = self.text_encoder([self.hparams.negative_prompt], self.device)
            negative, negative_mask = negative.expand(b, -1, -1), negative_mask.expand(b, -1)
        negative, negative_mask = negative.to(self.device, embeds.dtype), negative_mask.to(self.device)
        tokens = max(embeds.shape[2], negative.shape[1])
        embeds, mask = F.pad(embeds, (0, 0, 0, tokens - embeds.shape[2])), F.pad(mask, (0, tokens - mask.shape[2]))
        negative = F.pad(negative, (0, 0, 0, tokens - negative.shape[1]))
        negative_mask = F.pad(negative_mask, (0, tokens - negative_mask.shape[1]))
        slot = drop[:, None] & mask.any(-1)  # (B, P): padding slots stay padding
        embeds = torch.where(slot[..., None, None], negative[:, None], embeds)
        mask = torch.where(slot[..., None], negative_mask[:, None], mask)
        return embeds, mask

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _frames(self, batch: LatentBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's latents cut to whole chunks (and max_frames), and each sample's chunk count (B,).

        Samples of a batch may differ in length (zero-padded to the longest): each is trained on its own
        whole chunks, never cut to the shortest. A sample shorter than one chunk is an error naming it:
        the DataModule's min_latent_frames skips such samples before they reach a batch.
        """
        if batch.latents is None:
            raise ValueError("flow-matching fine-tuning needs latents in the batch (prepare shards with a VAE)")
        n = self.memory.num_frame_per_block
        lengths = batch.num_frames.clamp(max=batch.latents.shape[2])
        if self.hparams.max_frames is not None:
            lengths = lengths.clamp(max=self.hparams.max_frames)
        chunks = lengths // n
        names = list(getattr(batch, "keys", range(len(chunks))))
        cut = [(k, int(r)) for k, r in zip(names, (lengths - chunks * n).tolist(), strict=True) if r > 0]
        if cut:
            self._warn_once(
                "cut",
                f"flow matching trains whole {n}-frame chunks: the last frames of samples past their last chunk are "
                f"not trained on (this batch: {', '.join(f'{k} loses {r}' for k, r in cut[:5])}); this warning is "
                "given once",
            )
        short = [k for k, c in zip(names, chunks.tolist(), strict=True) if c < 1]
        if short:
            raise ValueError(
                f"samples {short} have fewer latent frames than one chunk of {n}: set the DataModule's "
                f"min_latent_frames to {n} (or more) to skip them"
            )
        usable = Lockstep(self).max(int(chunks.max())) * n  # under sharding every rank runs as many chunks
        latents = batch.latents[:, :, :usable]
        if latents.shape[2] < usable:  # another rank's sample is longer: padding, outside every loss
            pad = latents.new_zeros((*latents.shape[:2], usable - latents.shape[2], *latents.shape[3:]))
            latents = torch.cat([latents, pad], 2)
        return latents.to(self.device, self.model.dtype), chunks.to(self.device)

    def flow_matching_loss(
        self,
        x0: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        step: int,
        sample_chunks: torch.Tensor | None = None,
        starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean flow-matching MSE over every (sample, chunk) pair; sample_chunks (B,) limits each sample to
        its own first chunks (default: all of x0's). embeds (B, P, L, D) / mask (B, P, L): the prompts;
        starts (B, P): where each starts (None: prompt 0 conditions everything)."""
        n = self.memory.num_frame_per_block
        b, chunks = x0.shape[0], x0.shape[2] // n
        rng = SampleNoise(self.hparams.seed, step, "fm", first_index=self.global_rank * b, count=b)
        lo, hi = self.hparams.timestep_range
        if self.attention == "bidirectional":
            return self._bidirectional_loss(x0, embeds, mask, starts, rng, sample_chunks)
        t = torch.stack([self.schedule.training_timesteps(rng, lo, hi) for _ in range(chunks)], 1).to(self.device)
        noise = rng.randn(tuple(x0.shape), self.device, x0.dtype)
        contexts = self.model.encode_text_slots(embeds, mask)  # one forward, whatever the slot count
        if starts is None:
            prompts = PromptSchedule.single(contexts[0])
        else:
            prompts = PromptSchedule.per_sample(contexts, starts, mask.any(-1))
        stream = self.writer.new_stream()
        losses = []
        for c in range(chunks):
            text = self.writer.prompt_for_chunk(stream, prompts, c * n, b, Lockstep(self).any)  # recache at switches
            x0_c, noise_c = x0[:, :, c * n : (c + 1) * n], noise[:, :, c * n : (c + 1) * n]
            x_t = self.schedule.add_noise(x0_c, noise_c, t[:, c])
            flow = self.model.forward_chunk(x_t, t[:, c], text, stream.cache)
            losses.append(F.mse_loss(flow.float(), (noise_c - x0_c).float(), reduction="none").mean((1, 2, 3, 4)))
            self.writer.write_chunk(stream, x0_c, text, rng)
        return _mean_over_valid(torch.stack(losses, 1), sample_chunks)

    def _bidirectional_loss(
        self,
        x0: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        starts: torch.Tensor | None,
        rng: SampleNoise,
        sample_chunks: torch.Tensor | None,
    ) -> torch.Tensor:
        """One timestep per sample over the whole sequence. Samples of different lengths run in separate
        forwards (one per length), so no sample attends another's padding or is cut to a shorter one; under
        parameter sharding every rank runs every rank's lengths (a length it lacks on its first sample, unused)."""
        n = self.memory.num_frame_per_block
        t = self.schedule.training_timesteps(rng, *self.hparams.timestep_range).to(self.device)
        noise = rng.randn(tuple(x0.shape), self.device, x0.dtype)
        x_t = self.schedule.add_noise(x0, noise, t)
        lengths = torch.full((x0.shape[0],), x0.shape[2] // n, device=self.device)
        lengths = lengths if sample_chunks is None else sample_chunks
        per_chunk = x0.new_zeros(x0.shape[0], x0.shape[2] // n, dtype=torch.float32)
        local = set(lengths.tolist())
        for length in sorted(Lockstep(self).union(local, x0.shape[2] // n + 1)):
            rows, frames = torch.nonzero(lengths == length).squeeze(1), length * n
            if length not in local:  # only another rank has this length: the same forward, discarded
                self.model(x_t[:1, :, :frames], t[:1], embeds[:1, 0])
                continue
            if starts is None:
                text = embeds[rows, 0]
            else:
                text = FramePrompts.from_segments(embeds[rows], mask[rows], starts[rows], frames)
            flow = self.model(x_t[rows, :, :frames], t[rows], text)
            error = F.mse_loss(flow.float(), (noise - x0)[rows, :, :frames].float(), reduction="none")
            per_chunk[rows, :length] = error.mean((1, 3, 4)).unflatten(1, (length, n)).mean(2)
        return _mean_over_valid(per_chunk, lengths)

    def training_step(self, batch: LatentBatch, batch_idx: int) -> torch.Tensor | None:
        embeds, mask, starts = self._prompts(batch)
        if self.hparams.prompt_dropout > 0:
            embeds, mask = self._drop_prompts(batch, embeds, mask, self.global_step)
        frames, sample_chunks = self._frames(batch)
        loss = self.flow_matching_loss(frames, embeds, mask, self.global_step, sample_chunks, starts)
        finite = bool(torch.isfinite(loss))
        self.step_log.put("train/skipped_steps", float(not finite))
        if finite:
            self.skipped_in_a_row = 0
            self.step_log.put("train/loss", loss)
            self.step_log.flush(self, batch_size=len(batch.prompts))
            return loss
        message = f"non-finite flow-matching loss ({loss.item()}) at step {self.global_step}"
        if self.hparams.nonfinite == "stop":
            raise NonFiniteLossError(message + "; set nonfinite: skip to skip such steps")
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row > self.hparams.max_skipped_updates:
            group = self.optimizers().optimizer.param_groups[0]
            raise NonFiniteLossError(
                f"{self.skipped_in_a_row} steps in a row skipped for non-finite losses, the last at step "
                f"{self.global_step} (max_skipped_updates: {self.hparams.max_skipped_updates}); "
                + optimizer_diagnosis("optimizer", {**group, "max_grad_norm": self.optimizer_spec.grad_clip})
            )
        self.step_log.flush(self, batch_size=len(batch.prompts))
        return None  # Lightning skips the optimizer step

    def validation_step(self, batch: LatentBatch, batch_idx: int) -> None:
        """The loss on a held-out batch; draws keyed by the batch index, so every validation is the same."""
        embeds, mask, starts = self._prompts(batch)
        frames, sample_chunks = self._frames(batch)
        with torch.no_grad():
            loss = self.flow_matching_loss(frames, embeds, mask, -1 - batch_idx, sample_chunks, starts)
        self.log("val/loss", loss, sync_dist=True, batch_size=frames.shape[0])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, self.global_step - 1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint["model_ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "model_ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["model_ema"])


def _mean_over_valid(per_chunk: torch.Tensor, sample_chunks: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, chunks) losses over each sample's first sample_chunks[b] chunks (all if None)."""
    if sample_chunks is None:
        return per_chunk.mean()
    valid = torch.arange(per_chunk.shape[1], device=per_chunk.device)[None] < sample_chunks[:, None]
    return (per_chunk * valid).sum() / valid.sum()


def _warn_unused_by_bidirectional(memory: MemoryPolicy, context_timestep: float) -> None:
    """Bidirectional attention reads the memory's chunk grid only and writes no cache: a policy other than NAM
    (the default) or MemoryFree, a memory option other than its default, or a context_timestep other than 0 is
    named in an IgnoredSettingWarning."""
    defaults = {f.name: f.default for f in dataclasses.fields(memory)}
    idle = [
        f"memory.{key}={value!r}"
        for key, value in memory.options().items()
        if key != "num_frame_per_block" and value != defaults[key]
    ]
    if type(memory) not in (NAM, MemoryFree):
        idle.insert(0, f"memory {type(memory).__name__}")
    if context_timestep != 0:
        idle.append(f"context_timestep={context_timestep!r}")
    if idle:
        warnings.warn(
            f"{', '.join(idle)} not used: bidirectional attention reads only memory.num_frame_per_block (the chunk "
            "grid); every frame attends every frame, and no cache is written; drop them or use attention streaming",
            IgnoredSettingWarning,
            stacklevel=3,
        )
