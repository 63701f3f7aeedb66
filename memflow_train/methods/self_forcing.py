"""Self-forcing DMD (stage 1): the causal generator learns from its own streaming rollouts.

Every training step trains the critic (flow matching on fresh generator samples); every
gen_update_ratio-th step also trains the generator with the DMD loss against a frozen
bidirectional teacher with classifier-free guidance. One optimizer object holds both networks'
AdamW groups and steps only the networks that were trained (see methods/optim.py), so
`trainer.global_step` counts training steps and each network keeps its own lr, betas, weight
decay, warmup, clipping and moments. Random draws come from generators seeded by (seed, step,
purpose): exit steps and other shared choices are identical on every rank, noise differs per
rank, and a resumed run draws exactly what an uninterrupted one would.

On generator steps the critic trains on a rollout of the generator as it was before this
step's update (both networks step together at the end of the step); Self-Forcing updates the
generator first. The networks' update rules are unchanged; the critic sees samples one
generator update older on those steps.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from lightning.pytorch import LightningModule

from memflow_train.checks import IgnoredSettingWarning, number, number_range, whole
from memflow_train.memory import NAM, MemoryPolicy, memory_policy
from memflow_train.methods.dmd_losses import critic_flow_loss, dmd_gradient, dmd_loss, guided
from memflow_train.methods.ema import ParameterEMA
from memflow_train.methods.hparams import coerce, save_plain_hyperparameters
from memflow_train.methods.lora import add_lora
from memflow_train.methods.optim import (
    MultiNetworkAdamW,
    NonFiniteGradientError,
    apply_optimizer_specs,
    find_multi_network_optimizer,
    optimizer_diagnosis,
)
from memflow_train.methods.specs import (
    BackboneSpec,
    LoraSpec,
    OnDemandTextEncoder,
    OptimizerSpec,
    TextEncoderSpec,
    check_method_numbers,
)
from memflow_train.methods.step_log import StepLog
from memflow_train.models.causal_wan import CausalWanTransformer, FramePrompts, TextContext
from memflow_train.rollout import PromptSchedule, StreamingGenerator
from memflow_train.sampling import FlowMatchSchedule, SampleNoise, seeded
from memflow_train.strategies.zero import Lockstep

# Wan2.1's default negative prompt (the text its T2V pipeline uses).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


class PromptBatch(Protocol):
    """What the methods read from a batch (data.batch.NarrativeBatch provides it)."""

    prompts: list[list[str]]
    segment_start: torch.Tensor  # (B, P) latent frame where each prompt starts; -1 = the method picks
    prompt_embeds: torch.Tensor | None  # (B, P, L, D)
    prompt_mask: torch.Tensor | None  # (B, P, L)
    negative_embeds: torch.Tensor | None  # (B, L, D)
    negative_mask: torch.Tensor | None  # (B, L)


@dataclass
class TextBatch:
    """Prompt and negative embeddings of a batch on the model's device."""

    embeds: torch.Tensor  # (B, P, L, D)
    mask: torch.Tensor  # (B, P, L)
    negative: torch.Tensor  # (B, L, D)
    negative_mask: torch.Tensor  # (B, L)
    segment_start: torch.Tensor | None = None  # (B, P): where each prompt starts; -1 = the method picks

    @property
    def fixed(self) -> torch.Tensor:
        """(B,) bool: the samples with several prompts whose switch frames the data fixes (they follow them)."""
        if self.segment_start is None or self.embeds.shape[1] < 2:
            return torch.zeros(self.embeds.shape[0], dtype=torch.bool, device=self.embeds.device)
        real = self.mask.any(-1)
        return real[:, 1:].any(1) & ~(real & (self.segment_start < 0)).any(1)

    @property
    def unfixed(self) -> torch.Tensor:
        """(B,) bool: samples with several prompts but switch frames left to the method."""
        several = self.mask.any(-1)[:, 1:].any(1)  # (B,), all False with one prompt slot
        return several & ~self.fixed

    def starts(self) -> torch.Tensor:
        """(B, P) long: the frame where each prompt slot starts. A sample with fixed switches follows them; any
        other sample is conditioned by its first prompt throughout. Unused slots start never (int64 max).
        Decided per sample, so a sample is conditioned alike whatever else its batch (or rank) holds."""
        b, p = self.embeds.shape[:2]
        fixed = self.fixed
        starts = torch.full((b, p), _NEVER, dtype=torch.long, device=self.embeds.device)
        if self.segment_start is not None:
            used = self.mask.any(-1) & fixed[:, None]
            starts = torch.where(used, self.segment_start.to(starts.device), starts)
        starts[~fixed, 0] = 0
        return starts

    def frame_prompts(self, frames: int, offset: int = 0) -> FramePrompts:
        """Every sample's prompt of each frame offset .. offset + frames - 1 (see starts)."""
        return FramePrompts.from_segments(self.embeds, self.mask, self.starts(), frames, offset)


_NEVER = torch.iinfo(torch.long).max


class NonFiniteLossError(FloatingPointError):
    pass


class SelfForcingDMD(LightningModule):
    def __init__(
        self,
        generator: BackboneSpec,
        teacher: BackboneSpec,
        critic: BackboneSpec | None = None,
        memory: MemoryPolicy = NAM(),  # noqa: B008 (frozen dataclass)
        num_frames: int = 21,
        latent_size: tuple[int, int] = (60, 104),
        denoising_steps: tuple[int, ...] = (1000, 750, 500, 250),
        timestep_shift: float = 5.0,
        context_timestep: float = 0.0,
        guidance_scale: float = 3.0,
        score_timestep_range: tuple[float, float] = (20.0, 980.0),
        gen_update_ratio: int = 5,
        same_exit_step_for_all_chunks: bool = False,
        generator_optimizer: OptimizerSpec = OptimizerSpec(lr=2e-6),  # noqa: B008
        critic_optimizer: OptimizerSpec = OptimizerSpec(lr=4e-7),  # noqa: B008
        ema_decay: float | None = 0.99,
        ema_start_step: int = 200,
        generator_lora: LoraSpec | None = None,
        critic_lora: LoraSpec | None = None,
        gradient_checkpointing: bool = False,
        text_encoder: TextEncoderSpec | None = None,
        negative_prompt: str = WAN_NEGATIVE_PROMPT,
        nonfinite: Literal["stop", "skip"] = "stop",
        max_skipped_updates: int = 3,
        seed: int = 0,
    ) -> None:
        """generator: the causal student; teacher: the frozen real score; critic: the fake score
        (default: a trainable copy of the teacher). Shapes: num_frames latent frames per rollout
        (whole chunks of memory.num_frame_per_block) of latent_size (H, W).
        nonfinite: "stop" at the first non-finite loss or gradient norm, or "skip" that network's
        update; after more than max_skipped_updates skipped updates in a row of one network the
        run stops, naming the step, the network and its optimizer settings."""
        super().__init__()
        self.automatic_optimization = False
        generator, teacher, critic = (coerce(BackboneSpec, s) for s in (generator, teacher, critic))
        memory = memory_policy(memory)
        generator_optimizer, critic_optimizer = (
            coerce(OptimizerSpec, generator_optimizer),
            coerce(OptimizerSpec, critic_optimizer),
        )
        generator_lora, critic_lora = coerce(LoraSpec, generator_lora), coerce(LoraSpec, critic_lora)
        text_encoder = coerce(TextEncoderSpec, text_encoder)
        save_plain_hyperparameters(self, locals())
        self.optimizer_specs = {"generator": generator_optimizer, "critic": critic_optimizer}
        whole("gen_update_ratio", gen_update_ratio, low=1)
        whole("max_skipped_updates", max_skipped_updates, low=0)
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        check_method_numbers(
            timestep_shift=timestep_shift,
            context_timestep=context_timestep,
            ema_decay=ema_decay,
            ema_start_step=ema_start_step,
            seed=seed,
            num_frames=num_frames,
            latent_size=latent_size,
        )
        number("guidance_scale", guidance_scale, low=0)
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        if guidance_scale == 0 and negative_prompt != WAN_NEGATIVE_PROMPT:
            warnings.warn(
                f"negative_prompt {negative_prompt!r} is not used: it is the teacher's unconditional prompt, and "
                "guidance_scale 0 runs no unconditional pass; drop it or set guidance_scale above 0",
                IgnoredSettingWarning,
                stacklevel=2,
            )
        number_range("score_timestep_range", score_timestep_range, low=0, high=1000)
        if num_frames < memory.num_frame_per_block or num_frames % memory.num_frame_per_block:
            raise ValueError(
                f"num_frames ({num_frames}) must be a positive multiple of memory.num_frame_per_block "
                f"({memory.num_frame_per_block})"
            )

        self.generator = generator.build()
        self.teacher = teacher.build().requires_grad_(False)
        self.critic = critic.build() if critic is not None else copy.deepcopy(self.teacher).requires_grad_(True)
        self.text_encoder = OnDemandTextEncoder(text_encoder) if text_encoder is not None else None
        self._check_shapes(latent_size)
        if generator_lora is not None:
            add_lora(self.generator, generator_lora)
        if critic_lora is not None:
            add_lora(self.critic, critic_lora)
        self.generator.gradient_checkpointing = self.critic.gradient_checkpointing = gradient_checkpointing

        self.memory = memory
        self.num_frames = num_frames
        self.latent_size = tuple(latent_size)
        self.schedule = FlowMatchSchedule(timestep_shift)
        self.sampler = StreamingGenerator(
            self.generator, self.schedule, list(denoising_steps), memory, context_timestep
        )
        self.ema = ParameterEMA(ema_decay, ema_start_step) if ema_decay is not None else None
        self._negative_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.step_log = StepLog(progress_bar=("train/generator_loss", "train/critic_loss"))
        self._warned_unfixed = False
        self._warned_negative = False
        self.skipped_in_a_row = {"generator": 0, "critic": 0}
        self.last_exit_steps: list[int] = []  # the latest rollout's exit steps, for inspection

    # ------------------------------------------------------------------------------------ set-up

    def _check_shapes(self, latent_size: tuple[int, int]) -> None:
        g, t, c = self.generator.config, self.teacher.config, self.critic.config
        for name, other in (("teacher", t), ("critic", c)):
            for key in ("in_channels", "out_channels", "text_dim", "patch_size"):
                if tuple(_as_tuple(g[key])) != tuple(_as_tuple(other[key])):
                    raise ValueError(f"{name}.{key} = {other[key]} differs from generator.{key} = {g[key]}")
        h, w = latent_size
        if h % g.patch_size[1] or w % g.patch_size[2]:
            raise ValueError(f"latent_size {tuple(latent_size)} is not divisible by the patch size {g.patch_size}")
        if self.text_encoder is not None and self.text_encoder.width != g.text_dim:
            raise ValueError(
                f"text_encoder width {self.text_encoder.width} differs from generator.text_dim {g.text_dim}"
            )

    def configure_optimizers(self) -> dict:
        specs = self.optimizer_specs
        groups = []
        for name, net in (("generator", self.generator), ("critic", self.critic)):
            spec = specs[name]
            params = [p for p in net.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"the {name} has no trainable parameters")
            groups.append(
                {
                    "name": name,
                    "params": params,
                    "lr": spec.lr,
                    "betas": tuple(spec.betas),
                    "eps": spec.eps,
                    "weight_decay": spec.weight_decay,
                    "max_grad_norm": spec.grad_clip,
                }
            )
        optimizer = MultiNetworkAdamW(groups, nonfinite=self.hparams.nonfinite)
        ratio = self.hparams.gen_update_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            [lambda it: specs["generator"].lr_factor(it // ratio), lambda it: specs["critic"].lr_factor(it)],
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resumed run trains with the configured optimizer settings, not the checkpoint's."""
        apply_optimizer_specs(self.optimizers(), self.lr_schedulers(), self.optimizer_specs)

    # ------------------------------------------------------------------------------------ helpers

    def _shared_rng(self, step: int, purpose: str) -> torch.Generator:
        """Draws every rank makes identically (exit steps, switch chunks)."""
        return seeded(self.hparams.seed, step, purpose)

    def _sample_noise(self, step: int, purpose: str, batch: int) -> SampleNoise:
        """Per-sample draws keyed by the sample's index in the global batch (ranks hold equal batches)."""
        return SampleNoise(self.hparams.seed, step, purpose, first_index=self.global_rank * batch, count=batch)

    def _texts(self, batch: PromptBatch) -> TextBatch:
        """Prompt and negative embeddings from the batch, else from the configured text encoder."""
        dtype = self.generator.dtype
        if batch.prompt_embeds is not None:
            embeds, mask = batch.prompt_embeds, batch.prompt_mask
        elif self.text_encoder is not None:
            counts = [len(p) for p in batch.prompts]
            flat = [p for ps in batch.prompts for p in ps]
            e, m = self.text_encoder(flat, self.device)
            embeds = torch.zeros(len(counts), max(counts), *e.shape[1:], dtype=e.dtype, device=e.device)
            mask = torch.zeros(len(counts), max(counts), e.shape[1], dtype=torch.bool, device=e.device)
            i = 0
            for b, n in enumerate(counts):
                embeds[b, :n], mask[b, :n] = e[i : i + n], m[i : i + n]
                i += n
        else:
            raise ValueError("the batch has no prompt_embeds and no text_encoder is configured")
        if batch.negative_embeds is not None:
            negative, negative_mask = batch.negative_embeds, batch.negative_mask
            given = self.hparams.negative_prompt
            if given != WAN_NEGATIVE_PROMPT and self.hparams.guidance_scale and not self._warned_negative:
                self._warned_negative = True
                warnings.warn(
                    f"negative_prompt {given!r} is not used: the batch's negative embeddings (the shards' negative "
                    "prompt) are the teacher's unconditional prompt; prepare the shards with this negative prompt",
                    IgnoredSettingWarning,
                    stacklevel=3,
                )
        elif self.text_encoder is not None:
            if self._negative_cache is None:
                self._negative_cache = self.text_encoder([self.hparams.negative_prompt], self.device)
            n, nm = self._negative_cache
            negative, negative_mask = n.expand(embeds.shape[0], -1, -1), nm.expand(embeds.shape[0], -1)
        else:
            raise ValueError("the batch has no negative_embeds and no text_encoder is configured")
        segment_start = getattr(batch, "segment_start", None)
        texts = TextBatch(
            embeds.to(self.device, dtype),
            mask.to(self.device),
            negative.to(self.device, dtype),
            negative_mask.to(self.device),
            segment_start.to(self.device) if segment_start is not None else None,
        )
        message = self._unused_prompts(texts)
        if message is not None and not self._warned_unfixed:
            self._warned_unfixed = True
            warnings.warn(message, stacklevel=3)
        return texts

    def _unused_prompts(self, texts: TextBatch) -> str | None:
        """The warning naming the prompts this method leaves unused, if any."""
        count = int(texts.unfixed.sum())
        if not count:
            return None
        return (
            f"{count} samples of a batch have several prompts but no switch frames fixed by the data: self-forcing "
            "conditions each of them by its first prompt only (fix the switch frames to follow every prompt); "
            "this warning is shown once"
        )

    def _predict_x0(
        self,
        model: CausalWanTransformer,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor | TextContext | FramePrompts,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bidirectional flow prediction and its x0 estimate, in float32."""
        flow = model(x_t.to(model.dtype), t, text if isinstance(text, TextContext) else text.to(model.dtype)).float()
        return flow, self.schedule.x0_from_flow(x_t.float(), flow, t)

    def condition(self, texts: TextBatch, frames: int) -> torch.Tensor | FramePrompts:
        """What conditions the teacher and critic on a rollout of `frames` frames from frame 0: each sample's
        prompt per frame (TextBatch.starts); the plain (B, L, D) states when no sample switches inside."""
        return texts.frame_prompts(frames).collapsed()

    def prompt_schedule(self, texts: TextBatch) -> PromptSchedule:
        """The generator's prompt schedule of the batch (TextBatch.starts), every slot encoded in one forward."""
        starts = texts.starts()
        contexts = self.generator.encode_text_slots(texts.embeds.to(self.generator.dtype), texts.mask)
        return PromptSchedule.per_sample(contexts, starts, starts != _NEVER)

    def _draw_exit_steps(self, chunks: int, generator: torch.Generator) -> list[int]:
        steps = len(self.sampler.timesteps)
        if self.hparams.same_exit_step_for_all_chunks:
            return [int(torch.randint(steps, (1,), generator=generator))] * chunks
        return torch.randint(steps, (chunks,), generator=generator).tolist()

    def _check_finite(self, value: torch.Tensor, network: str, step: int, what: str = "loss") -> bool:
        """The same decision on every rank: one rank's non-finite loss skips (or stops) everywhere."""
        finite = bool(torch.isfinite(value).all())
        if self._trainer is not None:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return True
        message = f"non-finite {network} {what} ({value.item()}) at step {step}"
        if self.hparams.nonfinite == "stop":
            raise NonFiniteLossError(message + "; set nonfinite: skip to skip such updates")
        warnings.warn(message + "; skipping this update of the " + network, stacklevel=2)
        return False

    # ------------------------------------------------------------------------------------ rollout + losses

    def rollout(self, texts: TextBatch, step: int, purpose: str, grad: bool) -> torch.Tensor:
        """Generate num_frames latent frames from noise with the generator's own cache: each sample's prompts
        at its fixed switch frames (recache at each switch), a sample without fixed switches its prompt 0."""
        b = texts.embeds.shape[0]
        c = self.generator.config.in_channels
        noise_rng = self._sample_noise(step, purpose + "/noise", b)
        noise = noise_rng.randn((b, c, self.num_frames, *self.latent_size), self.device, self.generator.dtype)
        chunks = self.num_frames // self.memory.num_frame_per_block
        exit_steps = self._draw_exit_steps(chunks, self._shared_rng(step, purpose + "/exit"))
        self.last_exit_steps = exit_steps
        with torch.set_grad_enabled(grad):
            prompts = self.prompt_schedule(texts)
        stream = self.sampler.new_stream()
        return self.sampler.rollout(
            stream, noise, prompts, exit_steps, 0 if grad else None, noise_rng, Lockstep(self).any
        ).float()

    def distribution_matching_loss(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | FramePrompts,
        uncond: torch.Tensor,
        step: int,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DMD loss of generated latents x (with graph) under prompt embeddings cond (B, L, D) or a prompt per
        frame, against the negative uncond (B, L, D)."""
        rng = self._sample_noise(step, "dmd", x.shape[0])
        t = self.schedule.training_timesteps(rng, *self.hparams.score_timestep_range).to(self.device)
        x_t = self.schedule.add_noise(x.detach(), rng.randn(tuple(x.shape), self.device, x.dtype), t)
        with torch.no_grad():
            _, fake_x0 = self._predict_x0(self.critic, x_t, t, cond)
            if self.hparams.guidance_scale == 0:  # cond + 0 * (cond - uncond): the unconditional pass is not run
                _, real_x0 = self._predict_x0(self.teacher, x_t, t, cond)
            else:
                _, real = self._predict_x0(
                    self.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), _with_negative(cond, uncond)
                )
                real_x0 = guided(*real.chunk(2), self.hparams.guidance_scale)
        grad = dmd_gradient(x, fake_x0, real_x0)
        return dmd_loss(x, grad, mask), {"dmd_grad_abs": grad.abs().mean().float(), "dmd_t": t.float().mean()}

    def critic_loss(self, x: torch.Tensor, cond: torch.Tensor | FramePrompts, step: int) -> torch.Tensor:
        """Flow-matching loss of the critic on generated latents x (no graph into the generator)."""
        rng = self._sample_noise(step, "critic", x.shape[0])
        t = self.schedule.training_timesteps(rng, *self.hparams.score_timestep_range).to(self.device)
        noise = rng.randn(tuple(x.shape), self.device, x.dtype)
        x_t = self.schedule.add_noise(x.detach(), noise, t)
        flow, _ = self._predict_x0(self.critic, x_t, t, cond)
        return critic_flow_loss(flow, x.detach(), noise)

    def generator_loss(self, texts: TextBatch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.rollout(texts, step, "generator", grad=True)
        return self.distribution_matching_loss(x, self.condition(texts, x.shape[2]), texts.negative, step)

    def critic_samples(self, texts: TextBatch, step: int) -> torch.Tensor:
        with torch.no_grad():
            return self.rollout(texts, step, "critic", grad=False)

    # ------------------------------------------------------------------------------------ training

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        step = self.global_step
        texts = self._texts(batch)
        losses: dict[str, torch.Tensor] = {}
        if step % self.hparams.gen_update_ratio == 0:
            losses["generator"], logs = self.generator_loss(texts, step)
            for k, v in logs.items():
                self.step_log.put(f"train/{k}", v)
        losses["critic"] = self.critic_loss(
            self.critic_samples(texts, step), self.condition(texts, self.num_frames), step
        )
        self.update_networks(losses, step)
        self.step_log.flush(self)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Both losses on a held-out batch, without updates: a fresh rollout per batch, its draws keyed by the
        batch index (negative "steps", disjoint from training's) so every validation is the same."""
        key = -1 - batch_idx
        texts = self._texts(batch)
        with torch.no_grad():
            x = self.rollout(texts, key, "val", grad=False)
            cond = self.condition(texts, x.shape[2])
            generator_loss, _ = self.distribution_matching_loss(x, cond, texts.negative, key)
            critic_loss = self.critic_loss(x, cond, key)
        b = x.shape[0]
        self.log("val/generator_loss", generator_loss.float(), sync_dist=True, batch_size=b)
        self.log("val/critic_loss", critic_loss.float(), sync_dist=True, batch_size=b)

    def update_networks(self, losses: dict[str, torch.Tensor], step: int) -> None:
        """One backward over the finite losses, then one optimizer step of the networks they trained.

        The generator's and the critic's graphs are disjoint, so one backward of their sum gives
        each network exactly its own loss's gradients, and DDP sees one backward per step.
        """
        trained = [name for name, loss in losses.items() if self._check_finite(loss, name, step)]
        for name in trained:
            self.step_log.put(f"train/{name}_loss", losses[name].float())
        if trained:
            self.manual_backward(sum(losses[name] for name in trained))
        stepped = self._step_networks(self.optimizers(), trained, step)
        self.lr_schedulers().step()
        if self.ema is not None and "generator" in stepped:
            self.ema.update(self.generator, step)
        for name in losses:
            self._count_skips(name, skipped=name not in stepped, step=step)

    def _count_skips(self, network: str, skipped: bool, step: int) -> None:
        """Stop after more than max_skipped_updates skipped updates in a row of one network."""
        self.step_log.put(f"train/{network}_skipped_updates", float(skipped))
        self.skipped_in_a_row[network] = self.skipped_in_a_row[network] + 1 if skipped else 0
        if self.skipped_in_a_row[network] <= self.hparams.max_skipped_updates:
            return
        group = find_multi_network_optimizer(self.optimizers()).group(network)
        raise NonFiniteLossError(
            f"{self.skipped_in_a_row[network]} {network} updates in a row skipped for non-finite losses or "
            f"gradients, the last at step {step} (max_skipped_updates: {self.hparams.max_skipped_updates}); "
            + optimizer_diagnosis(f"{network}_optimizer", group)
        )

    def _step_networks(self, optimizer: Any, trained: list[str], step: int) -> list[str]:
        """Step the trained networks; each is clipped by its own norm inside the optimizer (ZeRO-aware).
        Returns the networks actually updated (a non-finite gradient norm skips one under nonfinite: skip)."""
        inner = find_multi_network_optimizer(optimizer)
        inner.set_active(trained)
        try:
            optimizer.step()
        except NonFiniteGradientError as err:
            raise NonFiniteGradientError(f"{err} at step {step}; set nonfinite: skip to skip such updates") from err
        optimizer.zero_grad(set_to_none=True)
        for name, norm in inner.grad_norms.items():
            self.step_log.put(f"train/{name}_grad_norm", norm.float())
        for name in inner.skipped:
            warnings.warn(f"non-finite {name} gradient norm at step {step}; skipped this update", stacklevel=2)
        for name in ("generator", "critic"):
            self.step_log.put(f"train/{name}_lr", inner.group(name)["lr"])
        return [name for name in trained if name not in inner.skipped]

    # ------------------------------------------------------------------------------------ checkpoints

    _FROZEN_PREFIXES = ("teacher.",)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Frozen networks come from their configured weights; keep them out of every checkpoint.

        (Under DeepSpeed the engine saves the module itself, excluding frozen parameters.)
        """
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(self._FROZEN_PREFIXES)]:
            del state[key]
        if self.ema is not None:
            checkpoint["generator_ema"] = self.ema.state_dict()
        checkpoint["skipped_in_a_row"] = dict(self.skipped_in_a_row)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        for prefix in self._FROZEN_PREFIXES:
            module = getattr(self, prefix[:-1])
            if module is not None and state is not None:
                state.update({prefix + k: v for k, v in module.state_dict().items()})
        if self.ema is not None and "generator_ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["generator_ema"])
        self.skipped_in_a_row.update(checkpoint.get("skipped_in_a_row", {}))


def _with_negative(cond: torch.Tensor | FramePrompts, negative: torch.Tensor) -> torch.Tensor | FramePrompts:
    """The conditional and unconditional texts as one batch (cond first), for one guided teacher call."""
    if isinstance(cond, FramePrompts):
        ones = torch.ones(negative.shape[:2], dtype=torch.bool, device=negative.device)
        return FramePrompts.cat(
            [cond, FramePrompts.single(negative.to(cond.embeds.dtype), ones, cond.frame_prompt.shape[1])]
        )
    return torch.cat([cond, negative.to(cond.dtype)])


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)
