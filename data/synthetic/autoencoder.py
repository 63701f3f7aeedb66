"""The synthetic world's autoencoder: a PatchAutoencoder (memflow_train.models.vae) fitted to rendered world
frames, so that what a video shows survives encoding and decoding (checked by
`callbacks.long_video.world.autoencoder_readback`).

The world draws flat shapes in 16 colours over two-tone scenes: the principal components of its 8x8 patches
hold a frame in a third of its values, and snapping the decoded pixels to the world's palette removes the
blur a linear decoder leaves at edges. Fitting is one SVD over the frames of `narratives` rendered
narratives (random ones and object-permanence ones, so every shape, colour, size, marking and scene appears).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from data.synthetic.world import permanence_narrative, render, sample_narrative
from memflow_train.checks import number, whole
from memflow_train.models.vae import PatchAutoencoder


@dataclass(frozen=True)
class AutoencoderSpec:
    """Frames of height x width px to latents of z_dim channels at a spatial stride of patch_size."""

    height: int = 64
    width: int = 64
    patch_size: int = 8
    z_dim: int = 64
    whitening: float = 0.0  # PatchAutoencoder.fit's: 0 one scale (the study's), 1 unit variance per channel
    narratives: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("height", "width", "patch_size", "z_dim", "narratives"):
            whole(f"autoencoder.{name}", getattr(self, name), low=1)
        whole("autoencoder.seed", self.seed, low=0)
        number("autoencoder.whitening", self.whitening, low=0, high=1)
        if self.height % self.patch_size or self.width % self.patch_size:
            raise ValueError(
                f"autoencoder height and width ({self.height}x{self.width}) must be multiples of patch_size "
                f"{self.patch_size}"
            )
        whole("autoencoder.z_dim", self.z_dim, low=1, high=3 * self.patch_size**2)

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.patch_size, self.width // self.patch_size


def world_frames(spec: AutoencoderSpec, count: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """Frames (N, H, W, 3) uint8 and their annotations from `count` narratives, every third frame (neighbours
    are near copies): half random narratives, half object-permanence ones."""
    rng = random.Random(seed)
    videos, notes = [], []
    for i in range(count):
        narrative = permanence_narrative(rng, 3, 6, 6, 1) if i % 2 else sample_narrative(rng, [6, 6, 6])
        video, note = render(narrative, spec.height, spec.width, temporal_stride=1)
        videos.append(video[::3])
        notes += note[::3]
    return torch.from_numpy(np.concatenate(videos)), notes


def fit_autoencoder(spec: AutoencoderSpec) -> PatchAutoencoder:
    """The world autoencoder, fitted to frames of spec.narratives narratives (deterministic for spec.seed)."""
    frames, _ = world_frames(spec, spec.narratives, spec.seed)
    return PatchAutoencoder.fit(frames, spec.patch_size, spec.z_dim, spec.whitening)
