"""The rectified-flow schedule of Wan / Self-Forcing, with timestep shift.

x_t = (1 - sigma) * x0 + sigma * noise, the network predicts the flow noise - x0, and
sigma = t / num_train_timesteps. The training table is sigmas = linspace(1, 0, N+1)[:-1]
warped by shift * s / (1 + (shift - 1) * s); few-step sampling picks its timesteps from that
table (Self-Forcing's warp: step k -> table[N - k]), e.g. [1000, 750, 500, 250] with shift 5
-> [1000, 937.5, 833.3, 625].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memflow_train.checks import number, whole
from memflow_train.sampling.noise import SampleNoise

NUM_TRAIN_TIMESTEPS = 1000  # Wan's timestep is 1000 * sigma (its scheduler's num_train_timesteps)


class FlowMatchSchedule:
    def __init__(self, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        number("timestep_shift", shift, low=0, low_open=True)
        whole("num_train_timesteps", num_train_timesteps, low=1)
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
        self.timesteps = self.shift_sigma(s) * num_train_timesteps  # float64, descending

    def shift_sigma(self, s: torch.Tensor) -> torch.Tensor:
        return self.shift * s / (1 + (self.shift - 1) * s)

    def warp(self, steps: Sequence[int]) -> torch.Tensor:
        """Few-step timesteps (float32) for denoising steps given on the unshifted 0..N scale."""
        bad = [s for s in steps if isinstance(s, bool) or not 0 < s <= self.num_train_timesteps or s != int(s)]
        if bad or not steps:
            raise ValueError(f"denoising steps must be integers in (0, {self.num_train_timesteps}], got {list(steps)}")
        index = torch.tensor([self.num_train_timesteps - int(s) for s in steps])
        return self.timesteps[index].float()

    def table_sigma(self, t: float) -> float:
        """Sigma of the training table entry nearest timestep t: what Self-Forcing's
        FlowMatchScheduler.add_noise uses (argmin |timesteps - t|), e.g. 0.00498 for t=0 at shift 5."""
        index = int((self.timesteps - float(t)).abs().argmin())
        return float(self.timesteps[index]) / self.num_train_timesteps

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.double() / self.num_train_timesteps

    def _expand(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Timesteps (B,) or (B, F) -> sigma broadcastable to x (B, C, F, H, W), float64."""
        s = self.sigma(t.to(x.device))
        if s.ndim == 0:
            return s
        if s.ndim == 1:
            return s.view(-1, 1, 1, 1, 1)
        return s[:, None, :, None, None]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._expand(t, x0)
        return ((1 - s) * x0.double() + s * noise.double()).to(x0.dtype)

    def x0_from_flow(self, x_t: torch.Tensor, flow: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean estimate from the predicted flow, in float64 as Self-Forcing does."""
        s = self._expand(t, x_t)
        return (x_t.double() - s * flow.double()).to(x_t.dtype)

    @staticmethod
    def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def training_timesteps(self, noise: SampleNoise, min_t: float, max_t: float) -> torch.Tensor:
        """Per-sample t: uniform integer in [0, N), shifted, clamped to [min_t, max_t] (DMD, critic)."""
        raw = noise.randint(self.num_train_timesteps).double() / self.num_train_timesteps
        return (self.shift_sigma(raw) * self.num_train_timesteps).clamp(min_t, max_t).float()
