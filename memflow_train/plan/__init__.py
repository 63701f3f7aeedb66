"""Memory planner: the per-GPU memory of a training step, traced on meta weights (python -m memflow_train.plan).

From Python: `plan = plan_module(module, gpus=1, strategy=None)` for a LightningModule with real or meta
weights, then `plan.per_gpu_bytes`, `plan.rows` ((what, bytes) at the peak) and `plan.to_markdown()`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Plan", "parse_size", "plan_config", "plan_module"]


def __getattr__(name: str) -> Any:
    """Imported on first use, so `python -m memflow_train.plan` checks its flags before loading torch."""
    if name == "plan_module":
        from memflow_train.plan.planner import plan_module

        return plan_module
    if name == "plan_config":
        from memflow_train.plan.recipe import plan_config

        return plan_config
    if name in ("Plan", "parse_size"):
        from memflow_train.plan import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
