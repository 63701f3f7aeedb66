"""Streaming long-video generation: narratives in, mp4 files out (python -m memflow_train.generation)."""

from memflow_train.generation.mp4 import Mp4Writer
from memflow_train.generation.narrative import Narrative, read_narratives
from memflow_train.generation.pipeline import GenerationStats, StreamingVideoPipeline

__all__ = ["GenerationStats", "Mp4Writer", "Narrative", "StreamingVideoPipeline", "read_narratives"]
