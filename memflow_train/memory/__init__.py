"""Streaming memory of a causal video transformer: KV cache (sink + local window) and memory policies.

Backbone-agnostic: everything here works on per-layer, heads-first keys/values of whole
frames, (batch, heads, frames * tokens_per_frame, head_dim), with absolute frame indices.
Policies (memory/policy.py), selected by class_path in YAML: MemoryFree, NAM (with SMA),
SurpriseGatedBank, SlowFastMemory, or a MemoryPolicy subclass of your own.
"""

from memflow_train.memory.kv_cache import LayerKVCache, StreamingKVCache
from memflow_train.memory.nam import NAM
from memflow_train.memory.policy import LayerMemory, MemoryFree, MemoryPolicy, MemoryRead, memory_policy
from memflow_train.memory.relevance import TextKeys, frame_relevance
from memflow_train.memory.slow_fast import SlowFastMemory
from memflow_train.memory.surprise import SurpriseGatedBank
from memflow_train.memory.window import AttentionWindow

__all__ = [
    "NAM",
    "AttentionWindow",
    "LayerKVCache",
    "LayerMemory",
    "MemoryFree",
    "MemoryPolicy",
    "MemoryRead",
    "SlowFastMemory",
    "StreamingKVCache",
    "SurpriseGatedBank",
    "TextKeys",
    "frame_relevance",
    "memory_policy",
]
