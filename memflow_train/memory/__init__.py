"""Streaming memory of a causal video transformer: KV cache (sink + local window), NAM bank, SMA.

Backbone-agnostic: everything here works on per-layer, heads-first keys/values of whole
frames, (batch, heads, frames * tokens_per_frame, head_dim), with absolute frame indices.
"""

from memflow_train.memory.config import MemoryConfig
from memflow_train.memory.kv_cache import LayerKVCache, StreamingKVCache
from memflow_train.memory.relevance import TextKeys, frame_relevance
from memflow_train.memory.window import AttentionWindow

__all__ = ["AttentionWindow", "LayerKVCache", "MemoryConfig", "StreamingKVCache", "TextKeys", "frame_relevance"]
