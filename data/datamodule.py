"""LightningDataModule streaming NarrativeBatches from WebDataset shards (see data/README.md for options)."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning as L
import torch

from data.batch import NarrativeBatch
from data.format import FIELD_MEMBERS, SampleSpec
from data.reading import expand_urls
from data.stream import ShardStream, StreamConfig, StreamLoader, StreamPosition
from memflow_train.checks import whole
from memflow_train.strategies.zero import shards_parameters

Field = Literal["text", "negative", "latents", "video", "ode", "annotations"]
DType = Literal["float32", "bfloat16", "float16"]


# Whole-number settings and their smallest honourable value (None, where allowed, means "use the default").
LOWEST = {
    "batch_size": 1, "val_batch_size": 1, "num_workers": 0, "batches_per_epoch": 1, "shuffle_buffer": 0, "seed": 0,
    "text_len": 1, "text_dim": 1, "latent_channels": 1, "num_frames": 1, "min_latent_frames": 1,
    "max_consecutive_bad": 1,
}  # fmt: skip


def check_numbers(**values: int | None) -> None:
    """Each whole-number setting in range (None passes: an optional setting left unset); ValueError naming it."""
    for name, value in values.items():
        if value is not None:
            whole(f"data.{name}", value, low=LOWEST[name])


class ShardDataModule(L.LightningDataModule):
    """Training: resampled shards, seeded per rank/worker/epoch, resumable; validation: every shard once, in order.

    Args:
        train_urls / val_urls: shard URLs, each a brace pattern ("shards/train-{000000..000099}.tar"), a local
            glob, or a list of them; anything WebDataset opens (pipe:, http://, file:).
        fields: optional parts every sample must have; a sample lacking one is skipped and counted.
        batch_size / val_batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes per rank.
        batches_per_epoch: length of a training epoch (per rank) when resampled.
        train_resampled: False reads each training shard once per epoch (needs shards >= ranks x workers).
        shuffle_buffer: samples held per worker to shuffle training samples (0: shard order).
        seed: base seed; each rank, worker and epoch derives its own stream from it.
        text_len: Wan pads prompt embeddings to this many tokens (512 for UMT5-XXL).
        text_dim / latent_channels / latent_size: expected widths and sizes; samples that differ are skipped.
        num_frames: latent frames of narratives whose data fixes no length.
        min_latent_frames: samples with fewer latent frames are skipped and counted (BadSampleWarning,
            data/skipped_samples): set it to what the method needs (one chunk; flow matching's max_frames).
        dtype: floating dtype of the batch tensors.
        max_consecutive_bad: fail after this many bad samples in a row (the settings do not fit the data).
    """

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        fields: list[Field] | None = None,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        batches_per_epoch: int = 1000,
        train_resampled: bool = True,
        shuffle_buffer: int = 100,
        seed: int = 0,
        text_len: int = 512,
        text_dim: int | None = None,
        latent_channels: int | None = None,
        latent_size: tuple[int, int] | None = None,
        num_frames: int = 21,
        min_latent_frames: int | None = None,
        dtype: DType = "bfloat16",
        max_consecutive_bad: int = 1000,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        fields = ["text"] if fields is None else list(fields)
        unknown = set(fields) - set(FIELD_MEMBERS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; known: {sorted(FIELD_MEMBERS)}")
        check_numbers(
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            batches_per_epoch=batches_per_epoch,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            text_len=text_len,
            text_dim=text_dim,
            latent_channels=latent_channels,
            num_frames=num_frames,
            min_latent_frames=min_latent_frames,
            max_consecutive_bad=max_consecutive_bad,
        )
        if latent_size is not None:
            if len(latent_size) != 2:
                raise ValueError(f"data.latent_size must be (height, width), got {latent_size}")
            for side in latent_size:
                whole("data.latent_size", side, low=1)
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"data.dtype must be float32, bfloat16 or float16, got {dtype!r}")
        # No save_hyperparameters(): Lightning refuses DataModule hparams whose names (num_frames, seed, ...) the
        # LightningModule shares with other values; LightningCLI saves the whole config anyway.
        self.train_urls, self.val_urls = train_urls, val_urls
        self.batch_size = batch_size
        self.val_batch_size = batch_size if val_batch_size is None else val_batch_size
        self.num_workers = num_workers
        self.batches_per_epoch = batches_per_epoch
        self.train_resampled = train_resampled
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.num_frames = num_frames
        self.dtype = getattr(torch, dtype)
        self.max_consecutive_bad = max_consecutive_bad
        self.pin_memory = pin_memory
        self.spec = SampleSpec(
            tuple(fields), text_dim, text_len, latent_channels, latent_size and tuple(latent_size), min_latent_frames
        )
        self.val_skipped_samples = 0  # bad validation samples this rank skipped
        self._train: StreamLoader | None = None
        self._val: StreamLoader | None = None
        self._position = StreamPosition(cursors=[0] * max(1, num_workers))

    # ------------------------------------------------------------------------------------------ setup

    def _rank(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, urls: str | list[str], split: str) -> StreamLoader:
        train = split == "train"
        config = StreamConfig(
            urls=tuple(expand_urls(urls)),
            spec=self.spec,
            batch_size=self.batch_size if train else self.val_batch_size,
            text_len=self.spec.text_len,
            dtype=self.dtype,
            default_num_frames=self.num_frames,
            resampled=train and self.train_resampled,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            seed=self.seed,
            split=split,
            max_consecutive_bad=self.max_consecutive_bad,
        )
        rank, world_size = self._rank()
        if not train and self.trainer is not None and shards_parameters(self.trainer.strategy):
            # Under ZeRO-3 / FSDP every forward is a collective: ranks with different validation batch
            # counts would wait for each other forever. Every rank reads the whole validation set instead
            # (same batches, same order); logging with sync_dist averages identical values.
            rank, world_size = 0, 1
        epoch_batches = self.batches_per_epoch if config.resampled else None
        return StreamLoader(ShardStream(config, rank, world_size), self.num_workers, epoch_batches, self.pin_memory)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self._train is None:
            if self.train_urls is None:
                raise ValueError("ShardDataModule needs train_urls to fit")
            self._train = self._loader(self.train_urls, "train")
            self._train.position = self._position
        if stage in ("fit", "validate", None) and self._val is None and self.val_urls is not None:
            self._val = self._loader(self.val_urls, "val")

    def train_dataloader(self) -> StreamLoader:
        if self._train is None:
            self.setup("fit")
        return self._train

    def val_dataloader(self) -> StreamLoader | list:
        if self._val is None:
            self.setup("validate")
        return self._val if self._val is not None else []

    # ------------------------------------------------------------------------------------------ accounting

    @property
    def consumed_samples(self) -> int:
        """Training samples this rank has used, over all epochs (a resumed run counts on from rank 0's total;
        callbacks.data_monitor.DataMonitor logs the exact sum over ranks)."""
        return self._position.consumed_samples

    @property
    def skipped_samples(self) -> int:
        """Bad training samples this rank has skipped, over all epochs (resumed: as consumed_samples)."""
        return self._position.skipped_samples

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this right before the step that uses the batch, after any prefetching.
        if isinstance(batch, NarrativeBatch) and batch.origin.split == "train" and self._train is not None:
            self._train.consumed(batch)
        elif isinstance(batch, NarrativeBatch) and batch.origin.split == "val":
            self.val_skipped_samples += batch.origin.skipped
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints. Every rank reads the same number of batches from identically shaped
        streams, so rank 0's position (the one written) resumes every rank."""
        p = self._position
        return {
            "epoch": p.epoch,
            "batches": p.batches,
            "cursors": list(p.cursors),
            "finished": p.finished,
            "consumed_samples": p.consumed_samples,
            "skipped_samples": p.skipped_samples,
            "world_size": self._rank()[1],
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Lightning warns that a mid-epoch checkpoint cannot resume a loader lacking its own state_dict; this
        # loader resumes through the DataModule, so the warning would mislead.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        p = self._position
        p.epoch, p.finished = state["epoch"], state["finished"]
        p.consumed_samples, p.skipped_samples = state["consumed_samples"], state["skipped_samples"]
        same_layout = (
            len(state["cursors"]) == len(p.cursors)
            and state["world_size"] == self._rank()[1]
            and state["seed"] == self.seed
        )
        if same_layout:
            p.batches, p.cursors = state["batches"], list(state["cursors"])
        elif not p.finished:
            # Streams are per (rank, worker): with another layout the epoch cannot continue sample-exactly, so
            # start the next one (new seeds: no sample order is repeated).
            warnings.warn(
                "the checkpoint's data position was saved with another world size, worker count or seed: "
                f"training data continues with epoch {p.epoch + 1} instead of the middle of epoch {p.epoch}",
                stacklevel=2,
            )
            p.batches, p.cursors, p.finished = 0, [0] * len(p.cursors), True
