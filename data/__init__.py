"""Data pipeline: WebDataset shard format v1, preparation commands, streaming DataModules, the synthetic world.

See data/README.md. memflow_train never imports this package; train.py and the configs do.
"""

from data.batch import BatchOrigin, NarrativeBatch
from data.datamodule import ShardDataModule
from data.format import FORMAT_VERSION, BadSample, Sample, SampleSpec
from data.synthetic.datamodule import DemoDataModule
from data.synthetic.demo import DemoSpec, demo_dataset

__all__ = [
    "FORMAT_VERSION",
    "BadSample",
    "BatchOrigin",
    "DemoDataModule",
    "DemoSpec",
    "NarrativeBatch",
    "Sample",
    "SampleSpec",
    "ShardDataModule",
    "demo_dataset",
]
