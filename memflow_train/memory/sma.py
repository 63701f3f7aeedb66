"""Sparse Memory Activation: per head, attend only the memory frames most relevant to the chunk."""

from __future__ import annotations

import torch


def select_memory_frames(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, for every (sample, head), the topk candidate frames in temporal order.

    q: the chunk's queries (B, H, S, D); k, v: candidate frames (B, H, n, T, D) in temporal
    order. Relevance is the dot product of the chunk's mean query and each frame's mean key.
    Returns keys/values (B, H, k*T, D) and the selected frame positions (B, H, k).
    """
    b, h, n, t, d = k.shape
    if n <= topk:
        index = torch.arange(n, device=k.device).expand(b, h, n)
        return k.flatten(2, 3), v.flatten(2, 3), index
    scores = torch.einsum("bhd,bhnd->bhn", q.float().mean(2), k.float().mean(3))
    index = scores.topk(topk, dim=-1).indices.sort(dim=-1).values
    gather = index[..., None, None].expand(b, h, topk, t, d)
    return k.gather(2, gather).flatten(2, 3), v.gather(2, gather).flatten(2, 3), index
