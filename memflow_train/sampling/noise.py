"""Reproducible randomness for training: every draw is a function of (seed, step, purpose, sample).

A sample's noise depends on its index in the global batch, not on the rank that holds it, so a
run on N ranks draws exactly what one process with the whole batch would, and a resumed run
draws what an uninterrupted one would. Draws shared by all ranks (exit steps, switch chunks) use
a generator without a sample index.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def seeded(*parts: Any, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from its parts, stable across processes, runs and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class SampleNoise:
    """Per-sample generators for the samples first_index .. first_index + count - 1 of a global batch."""

    def __init__(self, *parts: Any, first_index: int, count: int) -> None:
        self.generators = [seeded(*parts, first_index + j) for j in range(count)]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        """Standard normal (B, ...) with row j from sample j's generator; drawn on CPU, then moved."""
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} samples requested from {len(self.generators)} generators")
        rows = [torch.randn(shape[1:], generator=g) for g in self.generators]
        return torch.stack(rows).to(device=device, dtype=dtype)

    def rand(self) -> torch.Tensor:
        """One uniform draw in [0, 1) per sample, (B,)."""
        return torch.cat([torch.rand(1, generator=g) for g in self.generators])

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per sample, (B,)."""
        return torch.cat([torch.randint(high, (1,), generator=g) for g in self.generators])
