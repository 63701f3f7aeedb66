"""Independent AdamW updates for several networks behind one optimizer object.

Lightning (and DeepSpeed) drive one optimizer; DMD has a generator and a critic with their own
learning rates, betas, weight decay, clipping and update schedules. MultiNetworkAdamW holds one
named parameter group per network and updates only the groups marked active: AdamW keeps its
moments and step count per parameter, so each network evolves exactly as under its own AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class MultiNetworkAdamW(torch.optim.AdamW):
    def __init__(self, groups: list[dict], foreach: bool | None = None) -> None:
        names = [g.get("name") for g in groups]
        if None in names or len(set(names)) != len(names):
            raise ValueError(f"every parameter group needs a unique name, got {names}")
        super().__init__(groups, foreach=foreach)
        self.active: set[str] = set(names)

    def group(self, name: str) -> dict:
        for g in self.param_groups:
            if g["name"] == name:
                return g
        raise KeyError(f"no parameter group {name!r}")

    def set_active(self, names: Iterable[str]) -> None:
        names = set(names)
        unknown = names - {g["name"] for g in self.param_groups}
        if unknown:
            raise KeyError(f"no parameter groups {sorted(unknown)}")
        self.active = names

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch signature)
        all_groups = self.param_groups
        self.param_groups = [g for g in all_groups if g["name"] in self.active]
        try:
            return super().step(closure)
        finally:
            self.param_groups = all_groups


def clip_group(optimizer: MultiNetworkAdamW, name: str, max_norm: float | None) -> torch.Tensor:
    """Clip one network's gradients by their total norm; returns the norm before clipping."""
    params = [p for p in optimizer.group(name)["params"] if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
