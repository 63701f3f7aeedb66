"""ShardDataModule over the demo dataset, which it generates on first use."""

from __future__ import annotations

from typing import Any

from data.datamodule import ShardDataModule
from data.synthetic.demo import DemoSpec, demo_dataset


class DemoDataModule(ShardDataModule):
    """The demo: the text width, text length and latent channels follow `spec`, so they cannot disagree with
    the data. Other arguments are ShardDataModule's (fields default to text, negative and latents)."""

    def __init__(self, spec: DemoSpec | None = None, cache_dir: str | None = None, **kwargs: Any) -> None:
        self.demo_spec = spec or DemoSpec()
        self.cache_dir = cache_dir
        s = self.demo_spec
        if kwargs.get("fields") is None:  # config parsers pass the parent's default (None) explicitly
            kwargs["fields"] = ["text", "negative", "latents"]
        super().__init__(text_dim=s.text_dim, text_len=s.text_len, latent_channels=s.z_dim, **kwargs)

    def prepare_data(self) -> None:
        demo_dataset(self.demo_spec, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        demo = demo_dataset(self.demo_spec, self.cache_dir)
        self.train_urls, self.val_urls = demo.train_urls, demo.val_urls
        super().setup(stage)
