"""LongVideoEvaluation: long multi-prompt videos generated and measured while training (and in validate).

Every `every_n_steps` training steps (and at the end of `train.py validate`) the callback generates the
protocol's narratives with the method's streaming sampler (EMA weights swapped in when there are some),
decodes them, measures them (callbacks/long_video/metrics.py, world.py, memory.py) and logs scalars, a
per-segment table and mp4 videos; report.json, report.md, segments.csv and the mp4s go to a folder per step.

It observes and never changes training: no grad, eval mode, the EMA swap undone exactly, train/eval flags
restored module by module, the global RNG state restored (its own draws come from seeded generators), the
datamodule untouched; models it loaded go back to the CPU afterwards. Distributed: narrative i is generated
on rank i % world_size; metric states and media are gathered after every rank has finished or failed (no
collective inside the part that may raise), so no rank waits for one that gave up. Under parameter sharding
(ZeRO-3, FSDP) every forward is itself a collective, so every rank runs every narrative's forwards in the
same order and only measures its own (Evaluator.run_shard's lockstep). An exception inside the evaluation
is logged and training continues.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.long_video.protocol import EvalProtocol, Evaluator, ShardResult
from callbacks.long_video.report import assemble, log_to, write_report
from data.synthetic.datamodule import DemoDataModule
from data.synthetic.demo import demo_dataset
from memflow_train.checks import frame_rate, whole
from memflow_train.evaluation.narratives import warn_off_grid
from memflow_train.generation.pipeline import StreamingVideoPipeline
from memflow_train.methods.specs import TextEncoderSpec, torch_dtype
from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import VideoAutoencoder, load_vae
from memflow_train.rollout import StreamingGenerator
from memflow_train.strategies.zero import shards_parameters

log = logging.getLogger(__name__)


class LongVideoEvaluation(L.Callback):
    def __init__(
        self,
        protocol: EvalProtocol = EvalProtocol(),  # noqa: B008 (frozen dataclass)
        every_n_steps: int = 0,
        text_encoder: TextEncoderSpec | None = None,
        vae: str | None = None,
        vae_dtype: str = "float32",
        latent_size: tuple[int, int] | None = None,
        denoising_steps: tuple[int, ...] | None = None,
        videos: int = 2,
        video_fps: float = 16.0,
        output_dir: str | None = None,
    ) -> None:
        """every_n_steps: evaluate after every N training steps (0: only in `validate`).
        text_encoder / vae: where prompts are encoded and latents decoded (a local Wan folder); default: the
        method's own text encoder, else the demo dataset's tiny models when training on it.
        latent_size / denoising_steps: for methods that do not define them (flow-matching fine-tuning).
        videos: how many narratives' mp4s are logged; output_dir: default <log dir>/long_video_eval."""
        whole("every_n_steps", every_n_steps, low=0)
        whole("videos", videos, low=0)
        frame_rate("video_fps", video_fps)  # stored exactly in the mp4s
        for side in latent_size or ():
            whole("latent_size", side, low=1)
        if latent_size is not None and len(latent_size) != 2:
            raise ValueError(f"latent_size must be (height, width), got {latent_size}")
        for step in denoising_steps or ():
            whole("denoising_steps", step, low=1, high=1000)
        torch_dtype(vae_dtype)
        self.protocol = protocol
        self.every_n_steps = every_n_steps
        self.text_encoder_spec = text_encoder
        self.vae_path = vae
        self.vae_dtype = vae_dtype
        self.latent_size = tuple(latent_size) if latent_size is not None else None
        self.denoising_steps = list(denoising_steps) if denoising_steps is not None else None
        self.videos = videos
        self.video_fps = video_fps
        self.output_dir = output_dir
        self.evaluator: Evaluator | None = None
        self._text_encoder: WanTextEncoder | None = None
        self._vae: VideoAutoencoder | None = None
        self._last_step: int | None = None
        self._grid_checked = False  # the narratives' chunk-grid warning was given
        self.last_report: dict[str, Any] | None = None  # rank 0: the latest evaluation's report

    # ------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._check_denoising_steps(pl_module)
        if self.evaluator is None:  # a bad narrative file fails here, before training starts
            self.evaluator = Evaluator(self.protocol, self.videos, self.video_fps)

    def _check_denoising_steps(self, module: L.LightningModule) -> None:
        """A method with a sampler generates with its own steps: the callback's denoising_steps, meant for
        methods without one, must then say the same, or the run stops here, naming both."""
        sampler = getattr(module, "sampler", None)
        if sampler is None or self.denoising_steps is None:
            return
        wanted = module.schedule.warp(self.denoising_steps)
        if not torch.equal(wanted, sampler.timesteps.to(wanted.device)):
            own = module.hparams.get("denoising_steps", [round(float(t)) for t in sampler.timesteps])
            raise ValueError(
                f"LongVideoEvaluation.denoising_steps {self.denoising_steps} differ from the denoising steps of "
                f"{type(module).__name__}'s sampler ({list(own)}), which evaluation generates with: drop the "
                "callback's denoising_steps (they are for methods without a sampler, such as flow matching)"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module, step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, trainer.global_step, "validate")

    # ------------------------------------------------------------------------------------ evaluation

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule, step: int, tag: str = "step") -> None:
        """Run the protocol on every rank, then log on rank 0; failures are logged, never raised."""
        evaluator = self.evaluator
        shard: ShardResult | None = None
        try:
            with self._observing(module):
                pipeline = self._pipeline(trainer, module)
                if not self._grid_checked and trainer.is_global_zero:  # once per run, on one rank
                    warn_off_grid(evaluator.narratives, pipeline.sampler.frames_per_chunk)
                self._grid_checked = True
                info = evaluator.protocol_info(pipeline)
                evaluator.reset()
                lockstep = shards_parameters(trainer.strategy)
                shard = evaluator.run_shard(pipeline, trainer.global_rank, trainer.world_size, lockstep)
        except Exception:
            log.exception("long-video evaluation at %s %d failed on rank %d; training continues", tag, step,
                          trainer.global_rank)  # fmt: skip
        finally:
            self._release(evaluator)
        if not trainer.strategy.reduce_boolean_decision(shard is not None, all=True):
            self._log_failure(trainer, step)
            return
        try:  # collectives: every rank is here
            scalars = evaluator.compute()
            parts = _gather(shard)
            evaluator.release()
            folder = self._folder(trainer) / f"{tag}_{step:07d}"
        except Exception:
            log.exception("gathering the long-video evaluation at %s %d failed", tag, step)
            return
        if trainer.is_global_zero:
            try:
                self._publish(trainer, module, step, folder, info, scalars, parts)
            except Exception:
                log.exception("writing the long-video evaluation at %s %d failed", tag, step)

    @contextmanager
    def _observing(self, module: L.LightningModule) -> Iterator[None]:
        """No grad, eval mode, EMA weights in, global RNG state kept; everything restored exactly after."""
        modes = [(m, m.training) for m in module.modules()]
        ema = getattr(module, "ema", None)
        swap = ema.swapped_in(_network(module)) if ema is not None else nullcontext()
        devices = [module.device] if module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), swap:
                module.eval()
                yield
        finally:
            for m, training in modes:
                m.training = training

    def _pipeline(self, trainer: L.Trainer, module: L.LightningModule) -> StreamingVideoPipeline:
        device = module.device
        sampler = getattr(module, "sampler", None)  # its steps equal the callback's (checked in setup)
        if sampler is None:
            if self.denoising_steps is None:
                raise ValueError(f"{type(module).__name__} has no sampler: set the callback's denoising_steps")
            context = float(module.hparams.get("context_timestep", 0.0))
            sampler = StreamingGenerator(module.model, module.schedule, self.denoising_steps, module.memory, context)
        latent_size = self.latent_size or getattr(module, "latent_size", None)
        if latent_size is None:
            raise ValueError(f"{type(module).__name__} has no latent_size: set the callback's latent_size")
        text = self._text_encoder_for(trainer, module).to(device)
        vae = self._vae_for(trainer).to(device)
        return StreamingVideoPipeline(sampler, text, vae, tuple(latent_size))

    def _demo_folder(self, trainer: L.Trainer) -> tuple[Path, int] | None:
        dm = trainer.datamodule
        if isinstance(dm, DemoDataModule):
            return demo_dataset(dm.demo_spec, dm.cache_dir).root, dm.demo_spec.text_len
        return None

    def _text_encoder_for(self, trainer: L.Trainer, module: L.LightningModule) -> WanTextEncoder:
        if self._text_encoder is not None:
            return self._text_encoder
        spec = self.text_encoder_spec
        if spec is None and getattr(module, "text_encoder", None) is not None:
            return module.text_encoder
        if spec is None and (demo := self._demo_folder(trainer)) is not None:
            spec = TextEncoderSpec(path=str(demo[0]), text_len=demo[1], dtype="float32")
        if spec is None:
            raise ValueError("no text encoder: set the callback's text_encoder (the method has none)")
        with torch.random.fork_rng(devices=[]):
            self._text_encoder = spec.build()
        return self._text_encoder

    def _vae_for(self, trainer: L.Trainer) -> VideoAutoencoder:
        if self._vae is None:
            path = self.vae_path
            if path is None and (demo := self._demo_folder(trainer)) is not None:
                path = str(demo[0])
            if path is None:
                raise ValueError("no VAE: set the callback's vae (a Wan folder with vae/, or a VAE folder)")
            with torch.random.fork_rng(devices=[]):
                self._vae = load_vae(path, torch_dtype(self.vae_dtype))
        return self._vae

    def _release(self, evaluator: Evaluator) -> None:
        """Models this callback loaded go back to the CPU; cached accelerator memory is returned."""
        for model in (self._text_encoder, self._vae, *evaluator.models()):
            if model is not None:
                model.to("cpu")
            if hasattr(model, "truncation_summary"):  # the count of cut prompts not named one by one
                model.truncation_summary()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _folder(self, trainer: L.Trainer) -> Path:
        """output_dir, else <log dir>/long_video_eval (trainer.log_dir is a collective call on DDP)."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "long_video_eval"

    def _log_failure(self, trainer: L.Trainer, step: int) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"eval/failed": 1.0}, step)

    def _publish(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        step: int,
        folder: Path,
        info: dict[str, Any],
        scalars: dict[str, float | None],
        parts: list[ShardResult],
    ) -> None:
        ema = getattr(module, "ema", None)
        source = {
            "step": step,
            "weights": "ema" if ema is not None and ema.shadow else "live",
            "method": type(module).__name__,
        }
        report, videos = assemble(info, source, scalars, parts)
        paths = write_report(folder, report, videos)
        log_to(trainer.loggers, report, paths, [v[2] for v in videos], step)
        self.last_report = report


def _network(module: L.LightningModule) -> torch.nn.Module:
    """The network the sampler runs: the generator (DMD methods) or the fine-tuned model."""
    generator = getattr(module, "generator", None)
    return generator if generator is not None else module.model


def _gather(shard: ShardResult) -> list[ShardResult]:
    """Every rank's results (all ranks call this)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [shard]
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, shard)
    return parts
