"""What long-video evaluation needs from the library: narrative sets, traced generation, feature models.

The metrics, the Lightning callback and the report command live in the repository's callbacks/ folder
(callbacks/long_video/, python -m callbacks.evaluate).
"""

from memflow_train.evaluation.features import ClipFeatures, DinoFeatures, FeatureModelSpec
from memflow_train.evaluation.generation import EvaluationVideo, generate_full_sequence, generate_traced
from memflow_train.evaluation.narratives import (
    PROTOCOL_VERSION,
    EvalNarrative,
    digest,
    from_records,
    read_jsonl,
    shorten,
    video_frame_segments,
)

__all__ = [
    "PROTOCOL_VERSION",
    "ClipFeatures",
    "DinoFeatures",
    "EvalNarrative",
    "EvaluationVideo",
    "FeatureModelSpec",
    "digest",
    "from_records",
    "generate_full_sequence",
    "generate_traced",
    "read_jsonl",
    "shorten",
    "video_frame_segments",
]
