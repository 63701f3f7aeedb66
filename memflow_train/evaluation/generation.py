"""Generating an evaluation video with the streaming pipeline, tracing what the memory banks hold.

The video is exactly what `python -m memflow_train.generation` writes for the same narrative and seed
(StreamingVideoPipeline: the method's sampler with prompt switches and recache, chunk-wise VAE decoding,
transformer timings). Between chunks, the frames each layer's NAM bank held for the chunk just generated
are read from the stream (the clean re-run that ends a chunk commits nothing new to the bank).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from memflow_train.generation.narrative import Narrative
from memflow_train.generation.pipeline import GenerationStats, StreamingVideoPipeline
from memflow_train.memory.bank import NarrativeMemoryBank


@dataclass
class EvaluationVideo:
    frames: torch.Tensor | None  # uint8 (T, H, W, 3) on CPU; None without a VAE
    stats: GenerationStats
    chunk_starts: list[int]
    bank_frames: list[list[list[int]]]  # [chunk][layer]: absolute latent frames the layer's bank held


def _held(bank: NarrativeMemoryBank | None) -> list[int]:
    return [] if bank is None or bank.frames is None else bank.frames[0].tolist()


@torch.no_grad()
def generate_traced(
    pipeline: StreamingVideoPipeline, narrative: Narrative, seed: int, memory: bool = True, decode: bool = True
) -> EvaluationVideo:
    """Generate one narrative (batch of one) with the pipeline's sampler, or memory-free (sink + local window
    only: LongLive's baseline) with memory=False; frames are decoded if decode and the pipeline has a VAE."""
    sampler = pipeline.sampler
    if not memory:
        sampler = sampler.with_memory(replace(sampler.memory, enabled=False))
    vae = pipeline.vae if decode else None
    run = StreamingVideoPipeline(sampler, pipeline.text_encoder, vae, pipeline.latent_size)
    stats = GenerationStats()
    frames, starts, banks = [], [], []
    for chunk in run.chunks(narrative, seed, stats):
        starts.append(chunk.start_frame)
        banks.append([_held(layer.bank) for layer in chunk.stream.cache.layers])
        if chunk.frames is not None:
            frames.append(chunk.frames.cpu())
    return EvaluationVideo(torch.cat(frames) if frames else None, stats, starts, banks)
