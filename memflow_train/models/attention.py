"""The attention seam: every attention call of the backbone goes through one named backend.

Tensors are heads-first, (batch, heads, tokens, head_dim). The default is PyTorch SDPA, which
dispatches to flash / memory-efficient kernels on GPU and runs everywhere. Another kernel
(FlashAttention, a compiled FlexAttention) plugs in with `register_attention_backend` and is
selected by name in the backbone config, without touching the model code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


_BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Make `fn(q, k, v) -> out` (heads-first, no mask, scale 1/sqrt(head_dim)) selectable by name."""
    _BACKENDS[name] = fn


def get_attention_backend(name: str) -> AttentionFn:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; registered: {sorted(_BACKENDS)}") from None
