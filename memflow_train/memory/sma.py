"""Sparse Memory Activation: per head, attend only the memory frames most relevant to the chunk."""

from __future__ import annotations

import torch


def select_memory_frames(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, key_means: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, for every (sample, head), the topk candidate frames in temporal order.

    q: the chunk's queries (B, H, S, D); k, v: candidate frames (B, H, n, T, D) in temporal
    order. Relevance is the dot product of the chunk's mean query and each frame's mean key
    (key_means (B, H, n, D) in float32 when the caller keeps them, else computed here).
    Returns keys/values (B, H, k*T, D) and the selected frame positions (B, H, k).
    """
    b, h, n, t, d = k.shape
    if n <= topk:
        index = torch.arange(n, device=k.device).expand(b, h, n)
        return k.flatten(2, 3), v.flatten(2, 3), index
    means = key_means if key_means is not None else k.float().mean(3)
    scores = torch.einsum("bhd,bhnd->bhn", q.float().mean(2), means)
    index = scores.topk(topk, dim=-1).indices.sort(dim=-1).values
    # Whole frames by row index: several times faster than gather with an index expanded to every element.
    rows = (torch.arange(b * h, device=k.device) * n).view(b, h, 1).add(index).flatten()

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b * h * n, t, d).index_select(0, rows).view(b, h, topk * t, d)

    return pick(k), pick(v), index
