"""Exponential moving average of a network's trainable parameters (the generator's EMA)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from memflow_train.strategies.zero import assign_full, full_parameters, full_value


class ParameterEMA:
    """shadow <- decay * shadow + (1 - decay) * param after each update from start_update on.

    The shadow starts as a copy at the first update >= start_update (Self-Forcing's EMA_FSDP). It
    is a full fp32 copy on every rank (parameters partitioned by ZeRO-3 or FSDP2 are gathered to update it),
    so rank 0 saves it whole in checkpoints.
    """

    def __init__(self, decay: float, start_update: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.start_update = start_update
        self.shadow: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, update_index: int) -> None:
        if update_index < self.start_update:
            return
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        with full_parameters(list(params.values())):
            if not self.shadow:
                self.shadow = {n: full_value(p.detach()).float().clone() for n, p in params.items()}
                return
            for name, p in params.items():
                self.shadow[name].lerp_(full_value(p.detach()).float(), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights (evaluation, export); restores the live ones after."""
        if not self.shadow:
            yield
            return
        params = dict(module.named_parameters())
        targets = [params[n] for n in self.shadow]
        with full_parameters(targets, modify=True), torch.no_grad():
            live = {n: params[n].detach().clone() for n in self.shadow}
            for n, t in self.shadow.items():
                assign_full(params[n], t)
        try:
            yield
        finally:
            with full_parameters(targets, modify=True), torch.no_grad():
                for n, t in live.items():
                    params[n].copy_(t)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_update": self.start_update, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.start_update = state["decay"], state["start_update"]
        self.shadow = dict(state["shadow"])
