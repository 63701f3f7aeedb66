"""Fused attention kernels as backends of the attention seam: "flex" (compiled FlexAttention) and, where
the flash-attn package is installed, "flash" (FlashAttention 2). Importing this module registers them;
select one with `model.set_attention_backend(name)` (SDPA stays the default).

No mask is needed: the streaming cache and the block-causal path hand every attention call exactly
the keys its queries may see. FlexAttention runs only under torch.compile (compiled on first use,
dynamic in the key length, which changes as the cache fills); on CPU it has no backward, so calls
that need gradients there raise instead of failing deep inside autograd.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch
from torch.nn.attention.flex_attention import flex_attention as _flex_attention

from memflow_train.models.attention import register_attention_backend


@cache
def _compiled_flex():
    return torch.compile(_flex_attention)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError("FlexAttention has no backward on CPU: train on CPU with the sdpa attention backend")
    return _compiled_flex()(q, k, v)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention 2 (CUDA, fp16/bf16); it takes (batch, tokens, heads, head_dim)."""
    from flash_attn import flash_attn_func

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


FLASH_AVAILABLE = importlib.util.find_spec("flash_attn") is not None

register_attention_backend("flex", flex_attention)
if FLASH_AVAILABLE:
    register_attention_backend("flash", flash_attention)
