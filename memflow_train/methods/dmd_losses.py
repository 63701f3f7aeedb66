"""Distribution matching distillation (DMD) losses, as pure functions on tensors.

Generator: the DMD gradient of a generated sample x is
    grad = (fake_x0 - real_x0) / mean(|x - real_x0|)     (per sample, float64)
where fake_x0 / real_x0 are the critic's and the CFG teacher's clean estimates at a renoised x,
and the loss 0.5 * MSE(x, stopgrad(x - grad)) has exactly grad / numel as its gradient.
Critic: flow matching on generated samples, MSE(flow_pred, noise - x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Self-Forcing's CFG convention: cond + scale * (cond - uncond) (scale 3.0 = standard weight 4.0)."""
    return cond + scale * (cond - uncond)


def dmd_gradient(x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """(fake - real) normalised by the mean |x - real| of each sample, in float64, NaN-free."""
    x, fake_x0, real_x0 = x.detach().double(), fake_x0.double(), real_x0.double()
    normalizer = (x - real_x0).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / normalizer)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * MSE(x, stopgrad(x - grad)), optionally over the masked elements only (new frames)."""
    x = x.double()
    target = (x - grad).detach()
    if mask is None:
        return 0.5 * F.mse_loss(x, target)
    mask = mask.expand_as(x)
    return 0.5 * F.mse_loss(x[mask], target[mask])


def critic_flow_loss(flow_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(flow_pred.float(), (noise - x0).float())
