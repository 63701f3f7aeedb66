"""Streaming text-to-video: prompts in, video frames out chunk by chunk, with bounded memory.

Per chunk: the sampler denoises it with the model's KV cache and memory (recaching at a prompt
switch), the VAE decodes it continuing its causal feature cache, and the caller writes the frames.
Nothing grows with the video's length: the cache holds sink + memory bank + local window, the
decoder one chunk's features, and each chunk's latents and frames are dropped once written.

Timings (both count output video frames: the first latent frame decodes to 1 frame, each later one
to the VAE's temporal stride, 4 for Wan):
- transformer FPS: video frames / seconds inside the transformer (every denoising forward, the clean
  re-run that writes the cache, recache at switches), device-synchronised; text encoding, VAE and
  file writing excluded. This is how MemFlow (18.7 FPS) and LongLive (20.7 FPS) report speed.
- end-to-end FPS: video frames / wall seconds from the start of text encoding to the closed file
  (text encoding, transformer, VAE decoding, conversion to uint8, video encoding and writing).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from memflow_train.generation.narrative import Narrative
from memflow_train.models.causal_wan import TextContext
from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import VideoAutoencoder
from memflow_train.rollout import PromptSchedule, StreamingGenerator
from memflow_train.rollout.streaming import Stream
from memflow_train.sampling import seeded


class FrameSink(Protocol):
    """Where frames go (Mp4Writer): write(uint8 (T, H, W, 3)) as they come, close() at the end."""

    def write(self, frames: torch.Tensor) -> None: ...

    def close(self) -> None: ...


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Chunk:
    """One generated chunk: latents (1, C, n, h, w) and, with a VAE, its video frames uint8 (T, H, W, 3);
    stream: the sampler's state after the chunk (KV cache, memory banks), for observers to read."""

    index: int
    start_frame: int
    prompt_index: int
    latents: torch.Tensor
    frames: torch.Tensor | None
    transformer_s: float
    decode_s: float
    stream: Stream


@dataclass
class GenerationStats:
    """What one video cost; see the module docstring for the FPS definitions."""

    video_frames: int = 0
    latent_frames: int = 0
    chunks: int = 0
    text_s: float = 0.0
    transformer_s: float = 0.0
    decode_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    first_chunk_transformer_s: float = 0.0
    first_chunk_video_frames: int = 0
    prompt_chunks: list[int] = field(default_factory=list)  # prompt index of every chunk
    chunk_transformer_s: list[float] = field(default_factory=list)  # transformer seconds of every chunk
    chunk_video_frames: list[int] = field(default_factory=list)  # video frames of every chunk

    @property
    def transformer_fps(self) -> float:
        return self.video_frames / self.transformer_s if self.transformer_s else float("nan")

    @property
    def steady_transformer_fps(self) -> float:
        """Transformer FPS without the first chunk (kernel selection, compilation and caches warm up there)."""
        seconds = self.transformer_s - self.first_chunk_transformer_s
        return (self.video_frames - self.first_chunk_video_frames) / seconds if seconds > 0 else float("nan")

    @property
    def median_chunk_fps(self) -> float:
        """Median over the chunks after the first of each chunk's video frames per transformer second:
        robust to a slow outlier chunk on a shared machine (the mean FPS of a short video is not)."""
        rates = [f / s for f, s in zip(self.chunk_video_frames[1:], self.chunk_transformer_s[1:], strict=True) if s > 0]
        return statistics.median(rates) if rates else float("nan")

    @property
    def end_to_end_fps(self) -> float:
        return self.video_frames / self.total_s if self.total_s else float("nan")

    def as_dict(self) -> dict:
        keys = [
            k
            for k in self.__dataclass_fields__
            if k not in ("prompt_chunks", "chunk_transformer_s", "chunk_video_frames")
        ]
        return {
            **{k: getattr(self, k) for k in keys},
            "transformer_fps": self.transformer_fps,
            "steady_transformer_fps": self.steady_transformer_fps,
            "median_chunk_fps": self.median_chunk_fps,
            "end_to_end_fps": self.end_to_end_fps,
        }


def video_frames_for(latent_frames: int, temporal_stride: int) -> int:
    """Video frames decoded from this many latent frames (Wan: 1 + 4 * (n - 1))."""
    return 0 if latent_frames == 0 else 1 + temporal_stride * (latent_frames - 1)


class StreamingVideoPipeline:
    """A causal generator with its sampler, text encoder and (optionally) VAE, generating one video at a time."""

    def __init__(
        self,
        sampler: StreamingGenerator,
        text_encoder: WanTextEncoder,
        vae: VideoAutoencoder | None,
        latent_size: tuple[int, int],
    ) -> None:
        self.sampler = sampler
        self.model = sampler.model
        self.text_encoder = text_encoder
        self.vae = vae
        self.latent_size = tuple(latent_size)
        patch = self.model.config.patch_size
        if self.latent_size[0] % patch[1] or self.latent_size[1] % patch[2]:
            raise ValueError(f"latent size {self.latent_size} is not divisible by the patch size {tuple(patch)}")
        if text_encoder.d_model != self.model.config.text_dim:
            raise ValueError(
                f"text encoder width {text_encoder.d_model} differs from the transformer's text_dim "
                f"{self.model.config.text_dim}"
            )
        if vae is not None and vae.z_dim != self.model.config.in_channels:
            raise ValueError(f"VAE z_dim {vae.z_dim} differs from the transformer's in_channels")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def temporal_stride(self) -> int:
        return self.vae.temporal_stride if self.vae is not None else 1

    def check(self, narrative: Narrative) -> None:
        """Refuse a narrative whose length is not whole chunks, or with a prompt that would condition no
        chunk (a switch takes effect at the first chunk starting at or after it)."""
        n = self.sampler.frames_per_chunk
        if narrative.num_frames % n:
            raise ValueError(
                f"{narrative.source}: {narrative.num_frames} latent frames are not a whole number of {n}-frame chunks"
            )
        takes_effect = [-(-s // n) * n for s in narrative.starts] + [narrative.num_frames]
        for k, (a, b) in enumerate(zip(takes_effect, takes_effect[1:], strict=False)):
            if a >= b:
                raise ValueError(
                    f"{narrative.source}: prompt {k} (from frame {narrative.starts[k]}) would condition no chunk: "
                    f"it takes effect at the next {n}-frame chunk boundary, frame {a}, and the "
                    + ("video ends" if k == len(narrative.starts) - 1 else f"next prompt takes over at frame {b}")
                    + f" (num_frames {narrative.num_frames}); move the switch frames or lengthen the video"
                )

    def prompt_schedule(self, narrative: Narrative) -> PromptSchedule:
        """Encode every prompt once; each segment's per-layer cross-attention K/V are reused by all its chunks."""
        embeds, mask = self.text_encoder(list(narrative.prompts))
        dtype = self.model.dtype
        contexts: list[TextContext] = [
            self.model.encode_text(embeds[i : i + 1].to(self.device, dtype), mask[i : i + 1].to(self.device))
            for i in range(len(narrative.prompts))
        ]
        return PromptSchedule(list(zip(narrative.starts, contexts, strict=True)))

    @torch.no_grad()
    def chunks(self, narrative: Narrative, seed: int = 0, stats: GenerationStats | None = None) -> Iterator[Chunk]:
        """Generate the narrative chunk by chunk. Chunk c's initial noise is the c-th draw of a generator
        seeded by (seed, "noise"); the renoising between steps draws from one seeded by (seed, "steps")."""
        self.check(narrative)
        stats = stats if stats is not None else GenerationStats()
        device, n = self.device, self.sampler.frames_per_chunk
        start = time.perf_counter()
        prompts = self.prompt_schedule(narrative)
        synchronize(device)
        stats.text_s += time.perf_counter() - start
        noise_rng, step_rng = seeded(seed, "noise", device=device), seeded(seed, "steps", device=device)
        shape = (1, self.model.config.in_channels, n, *self.latent_size)
        stream = self.sampler.new_stream()
        decoder = self.vae.streaming_decoder() if self.vae is not None else None
        for c in range(narrative.num_frames // n):
            first = stream.next_frame
            noise = torch.randn(shape, generator=noise_rng, device=device).to(self.model.dtype)
            synchronize(device)
            t0 = time.perf_counter()
            latents = self.sampler.rollout(stream, noise, prompts, generator=step_rng)
            synchronize(device)
            t1 = time.perf_counter()
            frames = VideoAutoencoder.to_uint8(decoder.decode(latents))[0] if decoder is not None else None
            synchronize(device)
            t2 = time.perf_counter()
            prompt = sum(1 for s in narrative.starts if s <= first) - 1
            video = video_frames_for(first + n, self.temporal_stride) - video_frames_for(first, self.temporal_stride)
            if c == 0:
                stats.first_chunk_transformer_s, stats.first_chunk_video_frames = t1 - t0, video
            stats.transformer_s += t1 - t0
            stats.decode_s += t2 - t1
            stats.video_frames += video
            stats.latent_frames += n
            stats.chunks += 1
            stats.prompt_chunks.append(prompt)
            stats.chunk_transformer_s.append(t1 - t0)
            stats.chunk_video_frames.append(video)
            yield Chunk(c, first, prompt, latents, frames, t1 - t0, t2 - t1, stream)

    def generate(
        self,
        narrative: Narrative,
        sink: FrameSink,
        seed: int = 0,
        on_chunk: Callable[[Chunk, GenerationStats], None] | None = None,
    ) -> GenerationStats:
        """Generate, hand each chunk's frames to the sink as soon as they are decoded, close the sink."""
        if self.vae is None:
            raise ValueError("writing video frames needs a VAE")
        stats = GenerationStats()
        start = time.perf_counter()
        for chunk in self.chunks(narrative, seed, stats):
            t = time.perf_counter()
            sink.write(chunk.frames)
            stats.write_s += time.perf_counter() - t
            if on_chunk is not None:
                on_chunk(chunk, stats)
            del chunk
        t = time.perf_counter()
        sink.close()
        stats.write_s += time.perf_counter() - t
        stats.total_s = time.perf_counter() - start
        return stats
