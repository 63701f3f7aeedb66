"""Reading and writing parameters that ZeRO-3 partitions across ranks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch


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


def shards_parameters(strategy: object) -> bool:
    """Whether a Lightning strategy partitions parameters (DeepSpeed ZeRO-3, FSDP): then every forward is a
    collective call, and every rank must run the same sequence of forwards (evaluation, validation)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return bool(strategy.zero_stage_3)
    return isinstance(strategy, FSDPStrategy | ModelParallelStrategy)
