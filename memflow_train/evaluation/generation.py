"""Generating an evaluation video with the streaming pipeline, tracing what the memory banks hold.

The video is exactly what `python -m memflow_train.generation` writes for the same narrative and seed
(StreamingVideoPipeline: the method's sampler with prompt switches and recache, chunk-wise VAE decoding,
transformer timings). Between chunks, the frames each layer's memory held for the chunk just generated
are read from the stream (the clean re-run that ends a chunk commits nothing new to the memory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from memflow_train.generation.narrative import Narrative
from memflow_train.generation.pipeline import GenerationStats, StreamingVideoPipeline, synchronize, video_frames_for
from memflow_train.memory import LayerMemory
from memflow_train.models.causal_wan import FramePrompts
from memflow_train.sampling import seeded
from memflow_train.sampling.full_sequence import sample_full_sequence


@dataclass
class EvaluationVideo:
    frames: torch.Tensor | None  # uint8 (T, H, W, 3) on CPU; None without a VAE
    stats: GenerationStats
    chunk_starts: list[int]
    bank_frames: list[list[list[int]]]  # [chunk][layer]: absolute latent frames the layer's memory held


def _held(memory: LayerMemory | None) -> list[int]:
    frames = memory.frames() if memory is not None else None
    return [] if frames is None else frames[0].tolist()


@torch.no_grad()
def generate_traced(
    pipeline: StreamingVideoPipeline, narrative: Narrative, seed: int, memory: bool = True, decode: bool = True
) -> EvaluationVideo:
    """Generate one narrative (batch of one) with the pipeline's sampler, or memory-free (sink + local window
    only: LongLive's baseline) with memory=False; frames are decoded if decode and the pipeline has a VAE."""
    sampler = pipeline.sampler
    if not memory:
        sampler = sampler.with_memory(sampler.memory.memory_free())
    vae = pipeline.vae if decode else None
    run = StreamingVideoPipeline(sampler, pipeline.text_encoder, vae, pipeline.latent_size)
    stats = GenerationStats()
    frames, starts, banks = [], [], []
    for chunk in run.chunks(narrative, seed, stats):
        starts.append(chunk.start_frame)
        banks.append([_held(layer.memory) for layer in chunk.stream.cache.layers])
        if chunk.frames is not None:
            frames.append(chunk.frames.cpu())
    return EvaluationVideo(torch.cat(frames) if frames else None, stats, starts, banks)


@torch.no_grad()
def generate_full_sequence(
    pipeline: StreamingVideoPipeline,
    narrative: Narrative,
    seed: int,
    steps: int,
    decode: bool = True,
    guidance_scale: float = 1.0,
    negative_prompt: str = "",
) -> EvaluationVideo:
    """Generate one narrative with the pipeline's model as a bidirectional model (a teacher): `steps` Euler
    steps over the whole sequence from noise seeded by (seed, "noise"), each frame conditioned by its own
    prompt (memflow_train.sampling.full_sequence), with classifier-free guidance against negative_prompt when
    guidance_scale != 1 (the model must have been trained with prompt dropout for that to mean anything). The
    stats count the whole sampling as one chunk."""
    model, device = pipeline.model, pipeline.device
    embeds, mask = pipeline.text_encoder(list(narrative.prompts))
    starts = torch.tensor([narrative.starts], device=device)
    text = FramePrompts.from_segments(
        embeds[None].to(device, model.dtype), mask[None].to(device), starts, narrative.num_frames
    )
    negative = None
    if guidance_scale != 1.0:
        n_embeds, n_mask = pipeline.text_encoder([negative_prompt])
        negative = FramePrompts.single(n_embeds.to(device, model.dtype), n_mask.to(device), narrative.num_frames)
    shape = (1, model.config.in_channels, narrative.num_frames, *pipeline.latent_size)
    noise = torch.randn(shape, generator=seeded(seed, "noise", device=device), device=device).to(model.dtype)
    stats = GenerationStats()
    synchronize(device)
    start = time.perf_counter()
    latents = sample_full_sequence(model, pipeline.sampler.schedule, noise, text, steps, negative, guidance_scale)
    synchronize(device)
    seconds = time.perf_counter() - start
    frames = None
    if decode and pipeline.vae is not None:
        frames = pipeline.vae.to_uint8(pipeline.vae.decode(latents))[0].cpu()
    video = video_frames_for(narrative.num_frames, pipeline.temporal_stride)
    stats.transformer_s, stats.video_frames, stats.latent_frames, stats.chunks = seconds, video, narrative.num_frames, 1
    stats.chunk_transformer_s, stats.chunk_video_frames = [seconds], [video]
    stats.first_chunk_transformer_s, stats.first_chunk_video_frames = seconds, video
    return EvaluationVideo(frames, stats, [0], [[]])
