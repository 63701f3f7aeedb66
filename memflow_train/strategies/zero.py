"""Reading and writing parameters that ZeRO-3 or FSDP2 partition across ranks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextmanager
def full_parameters(params: list[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """Inside, every parameter holds its full value (gathered under ZeRO-3; a no-op otherwise).

    modify=True writes changes back (rank 0's values are kept and re-partitioned).
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        with nullcontext():
            yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


def full_value(param: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter (an FSDP2 DTensor is all-gathered: every rank must call this); plain
    tensors (and ZeRO-3 parameters inside full_parameters) come back as they are."""
    return param.full_tensor() if isinstance(param, DTensor) else param


def assign_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """param <- value, a whole tensor equal on every rank (an FSDP2 DTensor keeps its own shard of it)."""
    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


def shards_parameters(strategy: object) -> bool:
    """Whether a Lightning strategy partitions parameters (DeepSpeed ZeRO-3, FSDP): then every forward is a
    collective call, and every rank must run the same sequence of forwards (evaluation, validation)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return bool(strategy.zero_stage_3)
    return isinstance(strategy, FSDPStrategy | ModelParallelStrategy)


class Lockstep:
    """Agreement between ranks on what decides the number of forwards, for a LightningModule's trainer.

    Under parameter sharding every rank must run the same forwards, so data-dependent counts (chunks of the
    longest sample, a recache at a prompt switch, one forward per sample length) are agreed on first; without
    sharding (or outside a trainer) every method returns the local value and communicates nothing."""

    def __init__(self, module: object, everywhere: bool = False) -> None:
        """everywhere: agree over the ranks of any multi-process strategy, not only under sharding (for
        choices that keep ranks in step, like when a carried sequence restarts)."""
        trainer = getattr(module, "_trainer", None)
        strategy = trainer.strategy if trainer is not None else None
        agree = strategy is not None and (trainer.world_size > 1 if everywhere else shards_parameters(strategy))
        self.strategy = strategy if agree else None

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set."""
        return flag if self.strategy is None else bool(self.strategy.reduce_boolean_decision(flag, all=False))

    def max(self, value: int) -> int:
        """The largest value over ranks."""
        if self.strategy is None:
            return value
        return int(self.strategy.reduce(torch.tensor(float(value), device=self.strategy.root_device), reduce_op="max"))

    def min(self, value: int) -> int:
        """The smallest value over ranks."""
        return -self.max(-value)

    def union(self, values: set[int], bound: int) -> set[int]:
        """Every rank's values (integers in [0, bound))."""
        if self.strategy is None:
            return set(values)
        present = torch.zeros(bound, device=self.strategy.root_device)
        present[list(values)] = 1.0
        present = self.strategy.reduce(present, reduce_op="max")
        return {int(i) for i in torch.nonzero(present).flatten().tolist()}
