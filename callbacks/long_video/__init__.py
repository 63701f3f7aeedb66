"""Long-video consistency evaluation: the callback, its protocol, metrics and reports (README: Evaluation)."""

from callbacks.long_video.callback import LongVideoEvaluation
from callbacks.long_video.protocol import EvalProtocol, Evaluator, SyntheticNarratives

__all__ = ["EvalProtocol", "Evaluator", "LongVideoEvaluation", "SyntheticNarratives"]
