"""Training methods as LightningModules, with their losses, optimizers and specs."""

from memflow_train.methods.flow_matching import FlowMatchingFinetune
from memflow_train.methods.self_forcing import SelfForcingDMD
from memflow_train.methods.specs import BackboneSpec, LoraSpec, OptimizerSpec, TextEncoderSpec
from memflow_train.methods.streaming_long import StreamingLongTuning

__all__ = [
    "BackboneSpec",
    "FlowMatchingFinetune",
    "LoraSpec",
    "OptimizerSpec",
    "SelfForcingDMD",
    "StreamingLongTuning",
    "TextEncoderSpec",
]
