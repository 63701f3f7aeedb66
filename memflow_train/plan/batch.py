"""The batch a rank's DataLoader would yield for a config, with the shapes of real data (values irrelevant)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch import LightningModule

from memflow_train.plan.config import DataFacts


def _text_dim(module: LightningModule) -> int:
    for name in ("generator", "model"):
        net = getattr(module, name, None)
        if net is not None and hasattr(net, "config"):
            return int(net.config.text_dim)
    raise ValueError(f"{type(module).__name__} has no generator or model network to read text_dim from")


def _in_channels(module: LightningModule) -> int:
    net = getattr(module, "generator", None) or getattr(module, "model", None)
    return int(net.config.in_channels)


def prompts_per_sample(module: LightningModule) -> int:
    """Streaming long tuning trains on prompt pairs (the switch drawn by the method, with a recache); the
    other methods on one prompt per sample."""
    return 2 if hasattr(module, "min_switch_frame") else 1


def synthetic_batch(module: LightningModule, data: DataFacts, latent_frames: int | None = None) -> SimpleNamespace:
    """A NarrativeBatch-like batch: prompt (and negative) embeddings of data.text_len tokens when the data
    carries them, latents (B, C, frames, H, W) when it carries latents. Every prompt token is real (the
    mask's values change no shape). latent_frames: the latents' length (default data.num_frames).
    Raises ValueError when the latent size is needed but unknown."""
    b, p, length, dim = data.batch_size, prompts_per_sample(module), data.text_len, _text_dim(module)
    dtype = data.dtype
    segment_start = torch.full((b, p), -1, dtype=torch.long)
    segment_start[:, 0] = 0
    batch: dict[str, Any] = {
        "keys": [f"plan-{i}" for i in range(b)],
        "prompts": [[f"prompt {j}" for j in range(p)] for _ in range(b)],
        "num_prompts": torch.full((b,), p, dtype=torch.long),
        "segment_start": segment_start,
        "num_frames": torch.full((b,), data.num_frames, dtype=torch.long),
        "prompt_embeds": None,
        "prompt_mask": None,
        "negative_embeds": None,
        "negative_mask": None,
        "latents": None,
    }
    if "text" in data.fields:
        batch["prompt_embeds"] = torch.zeros(b, p, length, dim, dtype=dtype)
        batch["prompt_mask"] = torch.ones(b, p, length, dtype=torch.bool)
    if "negative" in data.fields:
        batch["negative_embeds"] = torch.zeros(b, length, dim, dtype=dtype)
        batch["negative_mask"] = torch.ones(b, length, dtype=torch.bool)
    if "latents" in data.fields:
        size = data.latent_size or getattr(module, "latent_size", None)
        if size is None:
            raise ValueError(
                f"the latent size of {data.source}'s latents is set by the data: pass --latent-size HEIGHT WIDTH"
            )
        frames = latent_frames or data.num_frames
        batch["latents"] = torch.zeros(b, _in_channels(module), frames, *size, dtype=dtype)
    return SimpleNamespace(**batch)
