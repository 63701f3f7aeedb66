"""Training strategies for the two-network DMD, on GPUs or CPU: DeepSpeed ZeRO and FSDP2."""

from memflow_train.strategies.deepspeed import MemflowDeepSpeedStrategy
from memflow_train.strategies.fsdp2 import MemflowFSDP2Strategy

__all__ = ["MemflowDeepSpeedStrategy", "MemflowFSDP2Strategy"]
