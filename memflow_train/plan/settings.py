"""How a traced step runs (precision casts, checkpointing, optimizer path, steady state or next step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TraceSettings:
    """How to run the traced step.

    cast: every floating parameter in this dtype (bf16-true; DeepSpeed's bf16; FSDP2 mixed precision).
    autocast: Lightning's bf16-mixed / 16-mixed autocast on a GPU, emulated in this dtype.
    checkpointing: set every network's gradient_checkpointing (None: as configured).
    foreach: the optimizer's multi-tensor path (torch's default for parameters on a GPU).
    steady: plan the steady state (see the module doc); False plans the module's next step as it is (a
    fresh module: no optimizer states yet, the EMA as configured, its own generator/critic schedule)."""

    cast: torch.dtype | None = None
    autocast: torch.dtype | None = None
    checkpointing: bool | None = None
    foreach: bool = True
    steady: bool = True
