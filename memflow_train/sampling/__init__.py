"""Few-step flow-matching sampling: the shifted schedule, its conversions, reproducible noise."""

from memflow_train.sampling.flow_matching import FlowMatchSchedule
from memflow_train.sampling.noise import SampleNoise, seeded

__all__ = ["FlowMatchSchedule", "SampleNoise", "seeded"]
