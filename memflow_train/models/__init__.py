"""Backbone models: the causal streaming Wan transformer, its presets and weight loading."""

from memflow_train.models.causal_wan import (
    CausalWanTransformer,
    FramePrompts,
    PromptTrack,
    TextContext,
    cast_keeping_fp32,
)
from memflow_train.models.loading import CheckpointMismatchError, load_transformer
from memflow_train.models.presets import WAN_PRESETS, wan_config

__all__ = [
    "WAN_PRESETS",
    "CausalWanTransformer",
    "CheckpointMismatchError",
    "FramePrompts",
    "PromptTrack",
    "TextContext",
    "cast_keeping_fp32",
    "load_transformer",
    "wan_config",
]
