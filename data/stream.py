"""Seeded, resumable batch streams over shards, split across ranks and DataLoader workers.

Every rank and worker is one "reader". A reader's sample order is a pure function of (seed, epoch, reader),
so a run resumes exactly by replaying its readers and dropping the samples already consumed; WebDataset has
no state of its own to save. Batches are built inside the workers (DataLoader batch_size=None) and carry
their BatchOrigin, which the consumer reports back through `StreamLoader.consumed`.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import BatchOrigin, NarrativeBatch, collate
from data.format import BadSample, Sample, SampleSpec, decode_sample
from data.reading import iter_raw_samples


class BadSampleWarning(UserWarning):
    """A sample was skipped; its key, shard and reason are in the message."""


@dataclass(frozen=True)
class StreamConfig:
    """How one split is read. resampled: draw shards with replacement forever (training); otherwise read each
    shard once per epoch, shards split over readers. shuffle_buffer <= 1 keeps the order of the shards."""

    urls: tuple[str, ...]
    spec: SampleSpec
    batch_size: int
    text_len: int
    dtype: torch.dtype = torch.bfloat16
    default_num_frames: int = 21
    resampled: bool = True
    shuffle_buffer: int = 100
    seed: int = 0
    split: str = "train"
    max_consecutive_bad: int = 1000


class ShardStream(IterableDataset):
    """Yields NarrativeBatches for the reader (rank, worker) that iterates it; set epoch/skip before iterating."""

    def __init__(self, config: StreamConfig, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.config, self.rank, self.world_size = config, rank, world_size
        self.epoch = 0
        self.skip: list[int] = []  # per worker: good samples to drop at the start of the epoch (resume)
        # DataLoader asks its workers for batches in turn, always starting with worker 0; a resumed epoch
        # continues with the worker whose turn was next, so worker ids are rotated by this much.
        self.worker_offset = 0
        self._skipped = 0
        self._bad_run = 0
        self._bad_shards: dict[str, str] = {}  # unreadable shards met in the current run of bad samples

    def _reader(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (worker + self.worker_offset) % num_workers
        return worker, self.rank * num_workers + worker, self.world_size * num_workers

    def _shards(self, reader: int, num_readers: int, rng: random.Random) -> Iterator[str]:
        urls = list(self.config.urls)
        if self.config.resampled:
            while True:
                yield rng.choice(urls)
        if self.config.shuffle_buffer > 1:
            random.Random(f"{self.config.seed}/{self.epoch}").shuffle(urls)  # same order on every reader
        yield from urls[reader::num_readers]

    def _bad(self, where: str, reason: str) -> None:
        self._skipped += 1
        self._bad_run += 1
        warnings.warn(f"skipping bad sample {where}: {reason}", BadSampleWarning, stacklevel=2)
        if self._bad_run < self.config.max_consecutive_bad:
            return
        if len(self._bad_shards) == self._bad_run or set(self._bad_shards) == set(self.config.urls):
            named = "; ".join(f"{url}: {why}" for url, why in sorted(self._bad_shards.items())[:20])
            raise RuntimeError(
                f"no usable data in the {self.config.split} stream: {len(self._bad_shards)} of its "
                f"{len(self.config.urls)} shards cannot be read as tar files, and nothing else was read "
                f"({named})"
            )
        raise RuntimeError(
            f"{self._bad_run} bad samples in a row in the {self.config.split} stream, the last: {where}: {reason}. "
            "The shards probably do not match the loader's settings (fields, text_dim, latent_channels)."
        )

    def _bad_shard(self, url: str, reason: str) -> None:
        """A shard with no readable tar data: counted as one bad sample, and named if nothing is usable."""
        self._bad_shards[url] = reason
        self._bad(f"shard {url}", f"unreadable shard: {reason}")

    def _samples(self, reader: int, num_readers: int) -> Iterator[Sample]:
        rng = random.Random(f"{self.config.seed}/{self.epoch}/{reader}")
        raw = (s for url in self._shards(reader, num_readers, rng) for s in iter_raw_samples(url, self._bad_shard))
        if self.config.shuffle_buffer > 1:
            size = self.config.shuffle_buffer
            raw = wds.filters.shuffle(size, size, rng=random.Random(rng.random()))(raw)
        for item in raw:
            try:
                sample = decode_sample(item, self.config.spec)
            except BadSample as err:
                error = f" (shard read error: {item['__error__']})" if "__error__" in item else ""
                self._bad(f"{item['__key__']} in {item['__url__']}", f"{err}{error}")
                continue
            self._bad_run = 0
            self._bad_shards = {}
            yield sample

    def __iter__(self) -> Iterator[NarrativeBatch]:
        worker, reader, num_readers = self._reader()
        samples = self._samples(reader, num_readers)
        cursor = self.skip[worker] if worker < len(self.skip) else 0
        for _ in range(cursor):
            if next(samples, None) is None:
                break
        # Each batch looks one good sample ahead, so it reports the bad samples up to the next batch's first
        # one (and the last batch those at the very end). After a fast-forward they were reported already.
        self._skipped = 0
        pending = next(samples, None)
        if cursor:
            self._skipped = 0
        cfg = self.config
        while pending is not None:
            chunk = [pending, *(s for _, s in zip(range(cfg.batch_size - 1), samples, strict=False))]
            pending = next(samples, None)
            cursor += len(chunk)
            origin = BatchOrigin(cfg.split, self.epoch, worker, cursor, self._skipped)
            self._skipped = 0
            yield collate(chunk, cfg.text_len, cfg.dtype, cfg.default_num_frames, origin)


@dataclass
class StreamPosition:
    """How far this rank has consumed a stream: what a checkpoint must hold to resume it."""

    epoch: int = -1  # the epoch under way; -1 before the first
    batches: int = 0  # batches consumed in it
    cursors: list[int] = field(default_factory=list)  # per worker: good samples consumed in it
    finished: bool = True  # the epoch ran to its end
    consumed_samples: int = 0  # all epochs
    skipped_samples: int = 0  # bad samples skipped, all epochs


class StreamLoader:
    """Lightning-friendly iterable: each pass is one epoch (batches_per_epoch batches when resampled, one pass
    over the shards otherwise). A pass resumes the epoch under way if it was not finished."""

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int = 0,
        batches_per_epoch: int | None = None,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        readers = stream.world_size * max(1, num_workers)
        if not stream.config.resampled and len(stream.config.urls) < readers:
            raise ValueError(
                f"the {stream.config.split} loader reads each shard once, but has {len(stream.config.urls)} shards "
                f"for {stream.world_size} ranks x {max(1, num_workers)} workers = {readers} readers, so some would "
                f"get none: write at least {readers} shards (smaller --samples-per-shard) or use fewer workers"
            )
        if stream.config.resampled and batches_per_epoch is None:
            raise ValueError("a resampled stream never ends: set batches_per_epoch")
        self.stream, self.num_workers, self.batches_per_epoch = stream, num_workers, batches_per_epoch
        self.loader_kwargs = {"pin_memory": pin_memory, "prefetch_factor": prefetch_factor if num_workers else None}
        self.position = StreamPosition(cursors=[0] * max(1, num_workers))

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("the number of batches of a non-resampled stream is known only after reading it")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[NarrativeBatch]:
        # A generator: nothing starts until the first next(), so Lightning's iter() probe has no effect.
        pos = self.position
        if pos.finished:
            pos.epoch, pos.batches, pos.cursors, pos.finished = pos.epoch + 1, 0, [0] * len(pos.cursors), False
        self.stream.epoch, self.stream.skip = pos.epoch, list(pos.cursors)
        self.stream.worker_offset = pos.batches % len(pos.cursors)
        remaining = None if self.batches_per_epoch is None else self.batches_per_epoch - pos.batches
        if remaining is not None and remaining <= 0:
            pos.finished = True
            return
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, **self.loader_kwargs)
        count = 0
        for count, batch in enumerate(loader, 1):
            yield batch
            if remaining is not None and count >= remaining:
                break
        pos.finished = True
        if count == 0 and pos.batches == 0:
            bad = "; ".join(f"{url}: {why}" for url, why in sorted(self.stream._bad_shards.items())[:20])
            raise RuntimeError(
                f"the {self.stream.config.split} stream produced no batch in epoch {pos.epoch}: no shard held a "
                f"usable sample (see the BadSampleWarnings above{': ' + bad if bad else ''})"
            )

    def consumed(self, batch: NarrativeBatch) -> None:
        """Record that the training step used this batch (call it at consumption, not at fetch: loops prefetch)."""
        pos, origin = self.position, batch.origin
        if origin.epoch != pos.epoch:
            return
        pos.batches += 1
        pos.cursors[origin.worker] = max(pos.cursors[origin.worker], origin.cursor)
        pos.consumed_samples += len(batch)
        pos.skipped_samples += origin.skipped
        if self.batches_per_epoch is not None and pos.batches >= self.batches_per_epoch:
            pos.finished = True  # Lightning stops asking at len(): the generator may never see its end
