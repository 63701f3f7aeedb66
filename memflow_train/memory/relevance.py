"""NAM relevance of stored frames to a prompt: S_i = mean_h,t,j <K_text[t], K_i[j]> / sqrt(d)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextKeys:
    """One layer's text keys, heads-first (B, H, L, D), and the mask of real tokens (B, L)."""

    keys: torch.Tensor
    mask: torch.Tensor | None = None


def frame_relevance(frame_keys: torch.Tensor, text: TextKeys, softmax: bool = False) -> torch.Tensor:
    """Relevance (B, F) of F frames, frame_keys (B, H, F, T, D), to the prompt.

    Raw mode is the mean over heads, real text tokens and frame tokens of the scaled dot
    products (MemFlow's code); by linearity it is a dot product of means. Softmax mode (the
    paper) normalises over frames for every head and text token before averaging, so a frame
    that stands out for a few tokens is not drowned by the rest.
    """
    d = frame_keys.shape[-1]
    frame_mean = frame_keys.float().mean(3)  # (B, H, F, D)
    per_token = torch.einsum("bhld,bhfd->bhlf", text.keys.float(), frame_mean) / d**0.5
    if softmax:
        per_token = per_token.softmax(-1)
    if text.mask is None:
        return per_token.mean((1, 2))
    m = text.mask.to(per_token.dtype)[:, None, :, None]  # (B, 1, L, 1)
    if (m.sum(2) == 0).any():
        raise ValueError("a prompt has no real text tokens: its mask is all False")
    return ((per_token * m).sum(2) / m.sum(2)).mean(1)
