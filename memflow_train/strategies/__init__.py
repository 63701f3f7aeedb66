"""Training strategies: DeepSpeed ZeRO for the two-network DMD, on GPUs or CPU."""

from memflow_train.strategies.deepspeed import MemflowDeepSpeedStrategy

__all__ = ["MemflowDeepSpeedStrategy"]
