"""Test helpers: tiny models and the original (Wan / LongLive) key naming of a diffusers state dict."""

from __future__ import annotations

import torch

from memflow_train.models.causal_wan import CausalWanTransformer
from memflow_train.models.presets import wan_config

# diffusers name piece -> original Wan name piece (inverse of diffusers' convert_wan_transformer_to_diffusers).
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn2", "cross_attn"),
    ("attn1", "self_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
    (".norm2.", ".norm3."),  # diffusers' norm2 is the cross-attention norm, Wan's norm3
]


def to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name == "scale_shift_table":
            out["head.modulation"] = tensor
            continue
        for a, b in _TO_ORIGINAL:
            name = name.replace(a, b)
        out[name.replace("scale_shift_table", "modulation")] = tensor
    return out


def tiny_model(**overrides) -> CausalWanTransformer:
    return CausalWanTransformer(**wan_config("tiny", **overrides)).eval()


def tiny_inputs(batch: int = 1, frames: int = 6, height: int = 4, width: int = 6, text_len: int = 5):
    """Latents, per-frame timesteps and text states for the tiny preset."""
    cfg = wan_config("tiny")
    x = torch.randn(batch, cfg["in_channels"], frames, height, width)
    t = torch.rand(batch, frames) * 1000
    text = torch.randn(batch, text_len, cfg["text_dim"])
    return x, t, text
