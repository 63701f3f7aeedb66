"""3D rotary position embedding of Wan2.1 with absolute frame positions.

diffusers' WanRotaryPosEmbed tabulates positions 0..rope_max_seq_len-1 and always starts the
temporal axis at 0. Streaming needs the temporal index of a chunk to be its absolute frame
index, for any video length, so the cos/sin are computed for the requested frame indices with
diffusers' own 1-D helper (same frequencies, same float64 math, same float32 result).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed


class WanRope3D(torch.nn.Module):
    """cos/sin tables for (frame, height, width) token grids; the head dim is split t/h/w as in Wan."""

    def __init__(self, attention_head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.h_dim = self.w_dim = 2 * (attention_head_dim // 6)
        self.t_dim = attention_head_dim - self.h_dim - self.w_dim
        self.theta = theta

    def _axis(self, dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return get_1d_rotary_pos_embed(
            dim,
            positions.to(torch.float64),
            self.theta,
            use_real=True,
            repeat_interleave_real=True,
            freqs_dtype=torch.float64,
        )

    def forward(self, frame_indices: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos, sin of shape (1, 1, F*height*width, head_dim), tokens ordered (frame, h, w).

        frame_indices: absolute temporal positions of the F frames (post-patch grid units).
        """
        device = frame_indices.device
        f = frame_indices.numel()
        cos_t, sin_t = self._axis(self.t_dim, frame_indices)
        cos_h, sin_h = self._axis(self.h_dim, torch.arange(height, device=device))
        cos_w, sin_w = self._axis(self.w_dim, torch.arange(width, device=device))

        def grid(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.cat(
                [
                    t.view(f, 1, 1, -1).expand(f, height, width, -1),
                    h.view(1, height, 1, -1).expand(f, height, width, -1),
                    w.view(1, 1, width, -1).expand(f, height, width, -1),
                ],
                dim=-1,
            ).reshape(1, 1, f * height * width, -1)

        return grid(cos_t, cos_h, cos_w), grid(sin_t, sin_h, sin_w)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim (Wan/diffusers convention); math in float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)
