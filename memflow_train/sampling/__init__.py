"""Few-step flow-matching sampling: the shifted schedule and its conversions."""

from memflow_train.sampling.flow_matching import FlowMatchSchedule

__all__ = ["FlowMatchSchedule"]
