"""What a backbone's network output means, and the flow every forward returns from it.

"flow_prediction" (Wan): the output is the flow. "sample" (JiT's x-prediction): the output is the clean
latents x0. "preconditioned" (EDM): x0 = c_skip x_t + c_out * output. Samplers, DMD and flow matching only
ever see the flow, so they need no change per type.
"""

from __future__ import annotations

import warnings

import torch

from memflow_train.checks import IgnoredSettingWarning, number
from memflow_train.sampling.flow_matching import NUM_TRAIN_TIMESTEPS

PREDICTION_TYPES = ("flow_prediction", "sample", "preconditioned")


def check_prediction(
    prediction_type: str, sample_sigma_floor: float, sigma_data: float | list[float], channels: int
) -> None:
    """Validate the prediction settings (ValueError) and name a setting the type does not read
    (IgnoredSettingWarning)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    number("sample_sigma_floor", sample_sigma_floor, low=0, low_open=True, high=1)
    values = list(sigma_data) if isinstance(sigma_data, (list, tuple)) else [sigma_data]
    if isinstance(sigma_data, (list, tuple)) and len(values) != channels:
        raise ValueError(f"sigma_data: one value per latent channel ({channels}), got {len(values)}")
    for value in values:
        number("sigma_data", value, low=0, low_open=True)
    for key, value, default, reader in (
        ("sample_sigma_floor", sample_sigma_floor, 0.05, "sample"),
        ("sigma_data", sigma_data, 1.0, "preconditioned"),
    ):
        if value != default and prediction_type != reader:
            warnings.warn(
                f"{key}={value!r} is not used: only prediction_type {reader!r} reads it, this network's is "
                f"{prediction_type!r}; drop it or set prediction_type {reader!r}",
                IgnoredSettingWarning,
                stacklevel=3,
            )


def frame_sigma(timestep: torch.Tensor, batch: int) -> torch.Tensor:
    """sigma = timestep / NUM_TRAIN_TIMESTEPS as (B, 1, F or 1, 1, 1) from () / (B,) / (B, F)."""
    sigma = timestep.float() / NUM_TRAIN_TIMESTEPS
    if sigma.ndim < 2:
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma
        sigma = sigma[:, None]
    return sigma[:, None, :, None, None]


def flow_of_sample(x0: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor, floor: float) -> torch.Tensor:
    """The flow (x_t - x0) / sigma of a clean-sample prediction x0 (B, C, F, H, W) at sigma = timestep /
    NUM_TRAIN_TIMESTEPS (timestep () / (B,) / (B, F)), sigma floored at `floor` (JiT, Li & He, "Back to
    Basics: Let Denoising Generative Models Denoise", arXiv 2511.13720, Sec. 4: x-prediction with a v-loss,
    t_eps = 0.05). Above the floor, x_t - sigma * flow gives x0 back exactly."""
    sigma = frame_sigma(timestep, x_t.shape[0]).clamp(min=floor)
    return ((x_t.float() - x0.float()) / sigma).to(x0.dtype)


def flow_of_preconditioned(
    out: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor, sigma_data: float | list[float]
) -> torch.Tensor:
    """The flow of x0 = c_skip * x_t + c_out * out on the rectified-flow path x_t = (1 - sigma) x0 + sigma n.

    EDM's preconditioning (Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
    Models", arXiv 2206.00364, Sec. 5 and Table 1) written for this path: with a = 1 - sigma, data RMS
    sigma_data (one value, or one per channel) and D = sqrt(a^2 sigma_data^2 + sigma^2) (the RMS of x_t),
    c_skip = a sigma_data^2 / D^2 and c_out = sigma sigma_data / D make the network's target
    (x0 - c_skip x_t) / c_out of unit variance at every sigma. The flow (x_t - x0) / sigma simplifies to
    ((sigma - a sigma_data^2) x_t - sigma_data D out) / D^2, finite at sigma = 0 (no floor), and
    x_t - sigma * flow is that x0 exactly. EDM's input scaling c_in is left out, so the streaming cache and
    every forward see the same input as the other prediction types.
    out, x_t: (B, C, F, H, W); timestep () / (B,) / (B, F) in [0, NUM_TRAIN_TIMESTEPS]."""
    sigma = frame_sigma(timestep, x_t.shape[0])
    data = sigma_data
    if isinstance(data, (list, tuple)):
        data = torch.tensor(data, device=x_t.device)[None, :, None, None, None]
    a = 1 - sigma
    d2 = a**2 * data**2 + sigma**2
    flow = ((sigma - a * data**2) * x_t.float() - data * d2.sqrt() * out.float()) / d2
    return flow.to(out.dtype)
