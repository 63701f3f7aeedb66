"""ShardDataModules over the synthetic world's datasets, which they generate on first use."""

from __future__ import annotations

from typing import Any, Literal

from data.datamodule import ShardDataModule
from data.synthetic.demo import DemoSpec, demo_dataset
from data.synthetic.permanence_data import PermanenceSpec, build_permanence_world, built_spec, permanence_root


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


class PermanenceDataModule(ShardDataModule):
    """One split of the object-permanence world (data.synthetic.permanence_data), built on first use in root
    (default: $MEMFLOW_TRAIN_CACHE/permanence-v<version>-<digest of spec>); without a spec, a world already built
    in root is read with the settings it was built with. split: teacher (random windows, for a
    bidirectional teacher), clips (narrative openings sharing their switch frames: causal init, stage 1) or long
    (whole narratives: stage 2); validation reads the held-out windows. Text width and length, latent channels
    and size and the narratives' length follow `spec`."""

    def __init__(
        self,
        split: Literal["teacher", "clips", "long"] = "clips",
        spec: PermanenceSpec | None = None,
        root: str | None = None,
        **kwargs: Any,
    ) -> None:
        if split not in ("teacher", "clips", "long"):
            raise ValueError(f"split must be teacher, clips or long, got {split!r}")
        if spec is None and root is not None:  # a built world: its own settings
            spec = built_spec(root)
        self.world_spec = spec = spec or PermanenceSpec()
        self.split = split
        self.root = permanence_root(spec, root)
        if kwargs.get("fields") is None:  # config parsers pass the parent's default (None) explicitly
            kwargs["fields"] = ["text", "negative", "latents"]
        a, frames = spec.autoencoder, spec.long_frames if split == "long" else spec.clip_frames
        super().__init__(
            text_dim=spec.text_dim,
            text_len=spec.text_len,
            latent_channels=a.z_dim,
            latent_size=a.latent_size,
            num_frames=frames,
            min_latent_frames=spec.clip_frames,  # validation reads clip-length windows for every split
            **kwargs,
        )

    def prepare_data(self) -> None:
        build_permanence_world(self.world_spec, self.root)

    def setup(self, stage: str | None = None) -> None:
        world = build_permanence_world(self.world_spec, self.root)
        self.train_urls, self.val_urls = world.urls[self.split], world.urls["val"]
        super().setup(stage)
