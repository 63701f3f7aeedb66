"""The training batch: narratives of different lengths and prompt counts, padded so tensors stack.

Self-forcing DMD reads prompt_embeds / prompt_mask / segment_start (+ negative_*); flow-matching fine-tuning
reads latents with prompt_embeds[:, 0] as the caption. Padding rules:
- prompts: P = most prompts in the batch; a sample's missing prompt slots have zero embeddings, an all-False
  mask and segment_start == num_frames (an empty segment at the end), so `prompt_at` needs no mask.
- text tokens: Wan-style, real tokens then zeros up to text_len; the mask marks the real ones.
- frames: latents / ODE trajectories / video are zero-padded along time to the longest sample; num_frames
  (latent) and video_frames give each sample's real length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from data.format import Sample


@dataclass
class BatchOrigin:
    """Where a batch came from in the stream; the DataModule records it to resume exactly."""

    split: str = "train"
    epoch: int = 0
    worker: int = 0
    cursor: int = 0  # good samples this worker has produced in this epoch, this batch included
    skipped: int = 0  # bad samples this worker met after its previous batch, up to the next good sample


@dataclass
class NarrativeBatch:
    """A collated batch; B samples, P prompt slots, L = text_len tokens, D = text width."""

    keys: list[str]
    prompts: list[list[str]]
    num_prompts: torch.Tensor  # (B,) long
    segment_start: torch.Tensor  # (B, P) long: latent frame where each prompt starts; -1 = the method picks
    num_frames: torch.Tensor  # (B,) long: latent frames of each narrative
    prompt_embeds: torch.Tensor | None = None  # (B, P, L, D)
    prompt_mask: torch.Tensor | None = None  # (B, P, L) bool
    negative_embeds: torch.Tensor | None = None  # (B, L, D)
    negative_mask: torch.Tensor | None = None  # (B, L) bool
    latents: torch.Tensor | None = None  # (B, C, T, H, W)
    video: torch.Tensor | None = None  # (B, T_video, H, W, 3) uint8
    video_frames: torch.Tensor | None = None  # (B,) long
    ode_trajectory: torch.Tensor | None = None  # (B, S, C, T, H, W)
    ode_timesteps: torch.Tensor | None = None  # (B, S)
    annotations: list[list[dict[str, Any]]] | None = None  # per sample, per video frame
    info: list[dict[str, Any]] = field(default_factory=list)
    origin: BatchOrigin = field(default_factory=BatchOrigin)

    def __len__(self) -> int:
        return len(self.keys)

    def prompt_at(self, frame: int) -> torch.Tensor:
        """(B,) index of the prompt active at a latent frame; needs switch frames fixed by the data."""
        if bool((self.segment_start < 0).any()):
            raise ValueError("some switch frames are not fixed by the data (-1): the training method picks them")
        return (self.segment_start <= frame).sum(1) - 1

    def pin_memory(self) -> NarrativeBatch:
        """Called by DataLoader(pin_memory=True) for custom batch types."""
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **pinned)


def _pad_time(tensors: list[torch.Tensor], time_dim: int, what: str, keys: list[str]) -> torch.Tensor:
    """Stack tensors that may differ only in length along time_dim, zero-padding to the longest."""
    shapes = {t.shape[:time_dim] + t.shape[time_dim + 1 :] for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            f"{what} of samples {keys} differ in more than length: {sorted(map(tuple, shapes))}; "
            "set latent_size (and latent_channels) on the DataModule to skip the odd ones"
        )
    longest = max(t.shape[time_dim] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), *tensors[0].shape[:time_dim], longest, *tensors[0].shape[time_dim + 1 :]))
    for i, t in enumerate(tensors):
        out[i].narrow(time_dim, 0, t.shape[time_dim]).copy_(t)
    return out


def _pad_tokens(embeds: list[torch.Tensor], text_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros(len(embeds), text_len, embeds[0].shape[1], dtype=dtype)
    mask = torch.zeros(len(embeds), text_len, dtype=torch.bool)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return out, mask


def collate(
    samples: list[Sample], text_len: int, dtype: torch.dtype, default_num_frames: int, origin: BatchOrigin
) -> NarrativeBatch:
    """Checked samples -> NarrativeBatch. default_num_frames applies to samples that fix no length."""
    keys = [s.key for s in samples]
    num_frames = [
        s.num_frames or (s.latents.shape[1] if s.latents is not None else default_num_frames) for s in samples
    ]
    counts = [len(s.prompts) for s in samples]
    p_max = max(counts)
    segment_start = torch.tensor([[n] * p_max for n in num_frames], dtype=torch.long)
    for i, s in enumerate(samples):
        segment_start[i, 0] = 0
        segment_start[i, 1 : counts[i]] = torch.tensor(s.switch_frames or [-1] * (counts[i] - 1), dtype=torch.long)
    batch = NarrativeBatch(
        keys=keys,
        prompts=[s.prompts for s in samples],
        num_prompts=torch.tensor(counts, dtype=torch.long),
        segment_start=segment_start,
        num_frames=torch.tensor(num_frames, dtype=torch.long),
        info=[s.info for s in samples],
        origin=origin,
    )
    if samples[0].text is not None:
        width = samples[0].text[0].shape[1]
        batch.prompt_embeds = torch.zeros(len(samples), p_max, text_len, width, dtype=dtype)
        batch.prompt_mask = torch.zeros(len(samples), p_max, text_len, dtype=torch.bool)
        for i, s in enumerate(samples):
            batch.prompt_embeds[i, : counts[i]], batch.prompt_mask[i, : counts[i]] = _pad_tokens(
                s.text, text_len, dtype
            )
    if samples[0].negative is not None:
        batch.negative_embeds, batch.negative_mask = _pad_tokens([s.negative for s in samples], text_len, dtype)
    if samples[0].latents is not None:
        batch.latents = _pad_time([s.latents.to(dtype) for s in samples], 1, "latents", keys)
    if samples[0].ode_trajectory is not None:
        batch.ode_trajectory = _pad_time([s.ode_trajectory.to(dtype) for s in samples], 2, "ODE trajectories", keys)
        batch.ode_timesteps = torch.stack([s.ode_timesteps.float() for s in samples])
    if samples[0].video is not None:
        batch.video = _pad_time([s.video for s in samples], 0, "videos", keys)
        batch.video_frames = torch.tensor([s.video.shape[0] for s in samples], dtype=torch.long)
    if samples[0].annotations is not None:
        batch.annotations = [s.annotations for s in samples]
    return batch
