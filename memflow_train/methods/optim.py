"""Independent AdamW updates for several networks behind one optimizer object.

Lightning (and DeepSpeed) drive one optimizer; DMD has a generator and a critic with their own
learning rates, betas, weight decay, clipping and update schedules. MultiNetworkAdamW holds one
named parameter group per network and, in step(), updates only the groups marked active, each
clipped by its own gradient norm: AdamW keeps its moments and step count per parameter, so each
network evolves exactly as under its own torch.optim.AdamW with torch's clip_grad_norm_.

Under ZeRO, DeepSpeed hands step() flat fp32 partitions of each group (one group at a time);
with `grad_norm_group` set, a group's norm is all-reduced over that process group, so clipping
still uses the whole network's norm.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


class NonFiniteGradientError(FloatingPointError):
    pass


class MultiNetworkAdamW(torch.optim.AdamW):
    def __init__(
        self,
        groups: list[dict],
        nonfinite: Literal["stop", "skip"] = "stop",
        foreach: bool | None = None,
    ) -> None:
        """groups: AdamW parameter groups, each with a unique "name" and an optional "max_grad_norm"."""
        names = [g.get("name") for g in groups]
        if None in names or len(set(names)) != len(names):
            raise ValueError(f"every parameter group needs a unique name, got {names}")
        super().__init__(groups, foreach=foreach)
        self.active: set[str] = set(names)
        self.nonfinite = nonfinite
        self.grad_norm_group: dist.ProcessGroup | None = None  # set when gradients are partitioned (ZeRO)
        self.grad_norms: dict[str, torch.Tensor] = {}  # the latest norm of each stepped network, before clipping
        self.skipped: list[str] = []  # networks whose non-finite gradients skipped the latest step

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
        self.grad_norms, self.skipped = {}, []

    def _grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        grads = [p.grad for p in params]
        if not grads:
            return torch.zeros(())
        if self.grad_norm_group is None:
            norm = torch.nn.utils.get_total_norm(grads)
            return norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP2: the whole network's norm
        squared = torch.nn.utils.get_total_norm(grads).double() ** 2
        dist.all_reduce(squared, group=self.grad_norm_group)
        return squared.sqrt().float()

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch signature)
        all_groups = self.param_groups
        stepped = []
        for g in all_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if g["name"] not in self.active or not params:
                continue
            norm = self._grad_norm(params)
            self.grad_norms[g["name"]] = norm
            if not torch.isfinite(norm):
                if self.nonfinite == "stop":
                    raise NonFiniteGradientError(f"non-finite {g['name']} gradient norm ({norm.item()})")
                self.skipped.append(g["name"])
                continue
            if g.get("max_grad_norm"):
                torch.nn.utils.clip_grads_with_norm_(params, g["max_grad_norm"], norm)
            stepped.append(g)
        self.param_groups = stepped
        try:
            return super().step(closure)
        finally:
            self.param_groups = all_groups


def find_multi_network_optimizer(optimizer: object) -> MultiNetworkAdamW:
    """The innermost MultiNetworkAdamW inside Lightning's / DeepSpeed's optimizer wrappers.

    Innermost, because LightningOptimizer poses as a subclass of the optimizer it wraps (with a
    copy of its attributes): setting `active` on the wrapper would not reach the real one.
    """
    found, seen = None, optimizer
    for _ in range(4):
        if isinstance(seen, MultiNetworkAdamW):
            found = seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    if found is None:
        raise TypeError(f"no MultiNetworkAdamW inside {type(optimizer).__name__}")
    return found


def apply_optimizer_specs(optimizer: object, scheduler: object, specs: dict[str, Any]) -> None:
    """Make each named param group follow its OptimizerSpec again (lr, betas, eps, weight decay, clip).

    A resumed run loads the checkpoint's optimizer and scheduler states, which carry the old
    hyperparameters; this applies the configured ones (a changed lr takes effect from the resumed
    step, scaled by the schedule's current factor). specs: group name -> OptimizerSpec; a plain
    torch optimizer has one unnamed group, given as specs[None].
    """
    inner = optimizer
    while hasattr(inner, "optimizer") and inner is not inner.optimizer:
        inner = inner.optimizer
    base_lrs = getattr(scheduler, "base_lrs", None)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    step = getattr(scheduler, "last_epoch", 0)
    for i, group in enumerate(inner.param_groups):
        spec = specs.get(group.get("name"))
        if spec is None:
            continue
        factor = lambdas[i](step) if lambdas is not None else 1.0
        group.update(lr=spec.lr * factor, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay)
        if "max_grad_norm" in group:
            group["max_grad_norm"] = spec.grad_clip
        if base_lrs is not None:
            base_lrs[i] = spec.lr


def optimizer_diagnosis(name: str, group: dict) -> str:
    """What a run that keeps producing non-finite values should check in one optimizer's settings."""
    settings = {k: group.get(k) for k in ("lr", "betas", "eps", "weight_decay", "max_grad_norm")}
    bad = [
        k
        for k, v in settings.items()
        if v is not None and not torch.isfinite(torch.tensor(v, dtype=torch.float64)).all()
    ]
    if bad:
        return f"{name} has non-finite settings: " + ", ".join(f"{k} = {settings[k]}" for k in bad)
    return f"its settings are finite ({name}: lr {settings['lr']:g}, grad clip {settings['max_grad_norm']}); a lr too large is the usual cause"
