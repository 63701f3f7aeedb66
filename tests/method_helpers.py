"""Test helpers for the training methods: tiny modules and prompt batches with known embeddings."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import torch

from memflow_train.memory import NAM
from memflow_train.methods import BackboneSpec, OptimizerSpec, SelfForcingDMD, StreamingLongTuning

TEXT_LEN, TEXT_DIM = 6, 16


def prompt_batch(batch: int = 2, prompts: int = 1, seed: int = 0, latents: bool = False) -> SimpleNamespace:
    """A batch with the attributes the methods read (data.batch.NarrativeBatch has the same)."""
    g = torch.Generator().manual_seed(seed)
    out = SimpleNamespace(
        prompts=[[f"prompt {i}" for i in range(prompts)]] * batch,
        segment_start=torch.full((batch, prompts), -1),
        prompt_embeds=torch.randn(batch, prompts, TEXT_LEN, TEXT_DIM, generator=g),
        prompt_mask=torch.ones(batch, prompts, TEXT_LEN, dtype=torch.bool),
        negative_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
        negative_mask=torch.ones(batch, TEXT_LEN, dtype=torch.bool),
        num_frames=torch.full((batch,), 6),
        latents=torch.randn(batch, 4, 6, 4, 4, generator=g) if latents else None,
    )
    out.segment_start[:, 0] = 0
    return out


def loader(batches: int = 32, **kwargs) -> torch.utils.data.DataLoader:
    data = [prompt_batch(seed=i, **kwargs) for i in range(batches)]
    return torch.utils.data.DataLoader(data, batch_size=None, collate_fn=lambda b: b)


def dmd_module(cls: type = SelfForcingDMD, **overrides) -> SelfForcingDMD:
    kwargs = dict(
        generator=BackboneSpec(),
        teacher=BackboneSpec(),
        memory=NAM(record_interval=1),
        num_frames=6,
        latent_size=(4, 4),
        gen_update_ratio=2,
        generator_optimizer=OptimizerSpec(lr=1e-3),
        critic_optimizer=OptimizerSpec(lr=1e-3),
        ema_start_step=0,
    )
    if cls is StreamingLongTuning:
        kwargs.update(max_length=18, frames_per_step=6, window=9)
    kwargs.update(overrides)
    return cls(**kwargs)


def fit(module: L.LightningModule, steps: int, **loader_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(**loader_kwargs))
    return trainer
