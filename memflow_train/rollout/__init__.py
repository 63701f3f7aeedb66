"""The streaming generator loop: chunks, few-step denoising, cache writes, prompt switches with recache."""

from memflow_train.rollout.prompts import PromptSchedule
from memflow_train.rollout.streaming import Stream, StreamingGenerator

__all__ = ["PromptSchedule", "Stream", "StreamingGenerator"]
