"""Many-step sampling of a bidirectional model over a whole sequence (a teacher's own samples).

Euler steps of the rectified flow on the shifted schedule: sigma_k = shift * s_k / (1 + (shift - 1) * s_k) for
s_k = 1 - k / steps, and x <- x + (sigma_{k+1} - sigma_k) * flow(x, sigma_k), since d x_sigma / d sigma =
noise - x0 = flow (Wan's flow-matching sampler, UniPC aside). With guidance_scale g != 1 the flow is
flow(uncond) + g * (flow(cond) - flow(uncond)) (classifier-free guidance, as Wan's pipeline).
"""

from __future__ import annotations

from typing import Any

import torch

from memflow_train.checks import number, whole
from memflow_train.sampling.flow_matching import FlowMatchSchedule


@torch.no_grad()
def sample_full_sequence(
    model: torch.nn.Module,
    schedule: FlowMatchSchedule,
    noise: torch.Tensor,
    text: Any,
    steps: int = 20,
    negative: Any | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """x0 (B, C, F, H, W) from noise of that shape. text / negative: what the model takes as its prompt (encoder
    states, a TextContext, FramePrompts); negative is needed when guidance_scale != 1. Raises ValueError for
    steps < 1, a negative guidance scale, or guidance without a negative prompt."""
    whole("steps", steps, low=1)
    number("guidance_scale", guidance_scale, low=0)
    if guidance_scale != 1.0 and negative is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs a negative prompt")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    sigmas = schedule.shift_sigma(s)
    x = noise.double()
    for k in range(steps):
        t = torch.full((noise.shape[0],), float(sigmas[k]) * schedule.num_train_timesteps, device=noise.device)
        flow = model(x.to(noise.dtype), t, text).double()
        if guidance_scale != 1.0:
            unconditional = model(x.to(noise.dtype), t, negative).double()
            flow = unconditional + guidance_scale * (flow - unconditional)
        x = x + (sigmas[k + 1] - sigmas[k]) * flow
    return x.to(noise.dtype)
