"""ShardDataModule: seeded streams, exact resume (also through Lightning checkpoints), bad-input accounting."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import webdataset as wds

from callbacks.data_monitor import DataMonitor
from data.batch import NarrativeBatch
from data.benchmark import main as benchmark_main
from data.datamodule import ShardDataModule
from data.format import Sample, encode_sample
from data.reading import ShardOpenError
from data.stream import BadSampleWarning
from data.writer import ShardSink


def write_shards(folder: Path, shards: int, per_shard: int, prefix: str = "shard") -> str:
    sink = ShardSink(str(folder), {}, max_samples=per_shard, prefix=prefix)
    for i in range(shards * per_shard):
        sink.write(i, Sample(f"{prefix}{i:04d}", [f"prompt {i}"], text=[torch.full((2, 4), float(i))]))
    return sink.close()


def keys_of(loader, epochs: int = 1) -> list[str]:
    return [k for _ in range(epochs) for b in loader for k in b.keys]


def dm_for(urls: str, **kwargs) -> ShardDataModule:
    args = {
        "batch_size": 2,
        "num_workers": 0,
        "batches_per_epoch": 4,
        "text_len": 8,
        "shuffle_buffer": 8,
        "dtype": "float32",
    }
    dm = ShardDataModule(train_urls=urls, **{**args, **kwargs})
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), shards=4, per_shard=8)


def test_batches_hold_the_narratives(shards: str) -> None:
    batch = next(iter(dm_for(shards).train_dataloader()))
    assert isinstance(batch, NarrativeBatch) and len(batch) == 2
    assert batch.prompt_embeds.shape == (2, 1, 8, 4) and batch.prompt_mask.sum().item() == 4
    for key, emb in zip(batch.keys, batch.prompt_embeds, strict=True):
        assert emb[0, 0, 0].item() == int(key[len("shard") :])  # embeddings travel with their own sample


def test_streams_are_seeded_per_worker_and_epoch(shards: str) -> None:
    def two_epochs(loader) -> list[tuple[int, tuple[str, ...]]]:
        return [(b.origin.worker, tuple(b.keys)) for _ in range(2) for b in loader]

    a = two_epochs(dm_for(shards, num_workers=2).train_dataloader())
    assert a == two_epochs(dm_for(shards, num_workers=2).train_dataloader())  # same seed, same stream
    assert [w for w, _ in a[:4]] == [0, 1, 0, 1]
    by_worker = [[k for w, keys in a[:4] if w == i for k in keys] for i in (0, 1)]
    assert by_worker[0] != by_worker[1]
    assert a[:4] != a[4:]  # the next epoch draws anew
    assert keys_of(dm_for(shards, num_workers=2, seed=1).train_dataloader()) != [k for _, ks in a[:4] for k in ks]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_sequence(shards: str, num_workers: int) -> None:
    reference = keys_of(dm_for(shards, num_workers=num_workers).train_dataloader(), epochs=2)
    dm = dm_for(shards, num_workers=num_workers)
    it = iter(dm.train_dataloader())
    used = []
    for _ in range(3):
        batch = next(it)
        used += dm.on_before_batch_transfer(batch, 0).keys  # the training step takes it
    next(it)  # prefetched by the loop, never trained on
    state = dm.state_dict()
    del it

    resumed = dm_for(shards, num_workers=num_workers)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    after = keys_of(loader) + keys_of(loader)  # rest of epoch 0, then epoch 1
    assert used == reference[:6] and after == reference[6:]
    assert state["consumed_samples"] == 6 and resumed.consumed_samples == 6


class Recorder(L.LightningModule):
    """Trains one weight and remembers the keys of the batches its steps used."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []
        self.epochs: list[tuple[int, int]] = []  # (Lightning's epoch, the data's epoch) per step

    def training_step(self, batch: NarrativeBatch, batch_idx: int) -> torch.Tensor:
        self.seen += batch.keys
        self.epochs.append((self.current_epoch, batch.origin.epoch))
        return (self.w * batch.prompt_embeds.mean()).sum() ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_lightning_checkpoint_resumes_the_data(shards: str, tmp_path: Path) -> None:
    whole = Recorder()
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    _trainer(tmp_path, max_steps=7, callbacks=[saver, DataMonitor()]).fit(whole, datamodule=dm_for(shards))
    assert len(whole.seen) == 14

    resumed = Recorder()
    dm = dm_for(shards)
    ckpt = next(tmp_path.glob("*step=3.ckpt"))
    trainer = _trainer(tmp_path / "resumed", max_steps=7, callbacks=[DataMonitor()])
    trainer.fit(resumed, datamodule=dm, ckpt_path=ckpt)
    assert resumed.seen == whole.seen[6:]  # mid-epoch 0, across into epoch 1
    assert [e for e, _ in whole.epochs] == [0, 0, 0, 0, 1, 1, 1] and all(
        a == b for a, b in whole.epochs + resumed.epochs
    )
    assert torch.load(ckpt, weights_only=False)["ShardDataModule"]["consumed_samples"] == 6
    assert dm.consumed_samples == 14 and trainer.callback_metrics["data/consumed_samples"].item() == 14


def _corrupt_shards(folder: Path) -> tuple[str, list[str]]:
    """Shard 0: good samples with a garbage member in the middle; shard 1: good samples, then one cut short."""
    good = []
    for shard in range(2):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as tar:
            for i in range(5):
                key = f"s{shard}-{i}"
                tar.write(encode_sample(Sample(key, [f"prompt {key}"], text=[torch.ones(2, 4)])))
                good.append(key)
                if shard == 0 and i == 2:
                    tar.write({"__key__": "garbage", "json": os.urandom(200), "text.safetensors": os.urandom(300)})
            if shard == 1:
                tar.write(encode_sample(Sample("cut", ["cut short"], text=[torch.ones(300, 4)])))
        data = buf.getvalue()
        if shard == 1:
            data = data[: data.rindex(b"cut.text.safetensors") + 512 + 1000]  # inside the last member's data
        (folder / f"bad-{shard}.tar").write_bytes(data)
    return str(folder / "bad-{0..1}.tar"), good


def test_corrupt_members_are_skipped_and_counted(tmp_path: Path) -> None:
    urls, good = _corrupt_shards(tmp_path)
    dm = dm_for(urls, train_resampled=False, shuffle_buffer=0, batch_size=1)
    model = Recorder()
    with pytest.warns(BadSampleWarning) as caught:
        _trainer(tmp_path, max_steps=100, max_epochs=1, callbacks=[DataMonitor()]).fit(model, datamodule=dm)
    trainer = model.trainer
    assert model.seen == good
    assert dm.skipped_samples == 2 and trainer.callback_metrics["data/skipped_samples"].item() == 2
    assert trainer.callback_metrics["data/consumed_samples"].item() == 10
    messages = [str(w.message) for w in caught]
    assert any("garbage in" in m and "metadata is not JSON" in m for m in messages)
    assert any("cut in" in m and "incomplete sample" in m and "unexpected end of data" in m for m in messages)


def test_a_shard_that_is_not_a_tar_counts_once(tmp_path: Path) -> None:
    (tmp_path / "noise.tar").write_bytes(os.urandom(4096))
    urls = write_shards(tmp_path, shards=1, per_shard=4)
    dm = dm_for([str(tmp_path / "noise.tar"), urls], train_resampled=False, shuffle_buffer=0)
    with pytest.warns(BadSampleWarning, match="not a tar file"):
        batches = list(dm.train_dataloader())
    assert sum(b.origin.skipped for b in batches) == 1 and sum(len(b) for b in batches) == 4


def test_validation_reads_every_shard_once_in_a_fixed_order(tmp_path: Path) -> None:
    train = write_shards(tmp_path, shards=1, per_shard=4)
    val = write_shards(tmp_path, shards=4, per_shard=3, prefix="val")
    dm = ShardDataModule(train_urls=train, val_urls=val, batch_size=2, num_workers=2, text_len=8, dtype="float32")
    dm.setup("fit")
    first, second = keys_of(dm.val_dataloader()), keys_of(dm.val_dataloader())
    assert first == second and sorted(first) == [f"val{i:04d}" for i in range(12)]


def test_too_few_shards_for_the_readers_fail_at_start(tmp_path: Path) -> None:
    train = write_shards(tmp_path, shards=1, per_shard=4)
    val = write_shards(tmp_path, shards=3, per_shard=2, prefix="val")
    dm = ShardDataModule(train_urls=train, val_urls=val, num_workers=4, text_len=8)
    with pytest.raises(ValueError, match="3 shards for 1 ranks x 4 workers = 4 readers"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="1 shards for 1 ranks x 2 workers"):
        ShardDataModule(train_urls=train, train_resampled=False, num_workers=2).setup("fit")


def test_shard_lists_that_match_nothing_fail_naming_them(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=f"shard {tmp_path}/x-000.tar .from '.*x-{{000..002}}.tar'. does not exist"
    ):
        dm_for(str(tmp_path / "x-{000..002}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        dm_for(str(tmp_path / "*.tar"))


def test_a_shard_that_cannot_be_opened_fails_naming_it(tmp_path: Path) -> None:
    url = f"pipe:cat {tmp_path}/missing.tar"
    dm = dm_for(url)
    with pytest.raises(ShardOpenError, match=f"shard {re.escape(url)}"):  # the pipe fails at open or at first read
        next(iter(dm.train_dataloader()))


def test_data_that_never_fits_stops_the_run(shards: str) -> None:
    dm = dm_for(shards, fields=["latents"], max_consecutive_bad=5)
    with pytest.warns(BadSampleWarning), pytest.raises(RuntimeError, match="5 bad samples in a row .*has no latents"):
        next(iter(dm.train_dataloader()))


def test_another_layout_resumes_with_the_next_epoch(shards: str) -> None:
    dm = dm_for(shards, num_workers=2)
    it = iter(dm.train_dataloader())
    dm.on_before_batch_transfer(next(it), 0)
    state = dm.state_dict()
    del it
    other = dm_for(shards, num_workers=0)
    with pytest.warns(UserWarning, match="continues with epoch 1"):
        other.load_state_dict(state)
    batch = next(iter(other.train_dataloader()))
    assert batch.origin.epoch == 1 and other.consumed_samples == 2


def test_benchmark_command_reports_throughput() -> None:
    tiny = ["--samples", "8", "--per-shard", "4", "--text-dim", "4", "--tokens", "2", "--text-len", "4"]
    shape = ["--latent-shape", "2", "3", "2", "2"]
    result = benchmark_main(
        ["--kind", "latents", *tiny, *shape, "--batch-size", "2", "--num-workers", "0", "--batches", "3"]
    )
    assert result["samples"] == 6 and result["batch"] == 2 and result["samples_per_s"] > 0


def test_an_empty_shard_among_good_ones_is_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "empty.tar").write_bytes(b"")
    urls = write_shards(tmp_path, shards=1, per_shard=4)
    dm = dm_for([str(tmp_path / "empty.tar"), urls], train_resampled=False, shuffle_buffer=0)
    with pytest.warns(BadSampleWarning, match=r"empty.tar: unreadable shard: an empty file \(0 bytes\)"):
        batches = list(dm.train_dataloader())
    assert sum(b.origin.skipped for b in batches) == 1 and sum(len(b) for b in batches) == 4


@pytest.mark.parametrize("resampled", [True, False])
def test_when_no_shard_is_usable_the_error_names_the_files(tmp_path: Path, resampled: bool) -> None:
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.tar").write_bytes(os.urandom(2048))
    urls = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    dm = dm_for(urls, train_resampled=resampled, max_consecutive_bad=6)
    message = "no usable data" if resampled else "produced no batch"
    with pytest.warns(BadSampleWarning), pytest.raises(RuntimeError, match=message) as err:
        list(dm.train_dataloader())
    assert "a.tar: an empty file" in str(err.value) and "b.tar: not a tar file" in str(err.value)
    assert "loader's settings" not in str(err.value)


def test_samples_too_short_for_the_method_are_skipped_and_counted(tmp_path: Path) -> None:
    sink = ShardSink(str(tmp_path), {}, max_samples=8)
    for i, frames in enumerate([12, 3, 2, 6]):
        text = [torch.full((2, 4), float(i))]
        sink.write(i, Sample(f"s{i}", [f"p {i}"], text=text, latents=torch.randn(4, frames, 2, 2)))
    dm = dm_for(sink.close(), fields=["text", "latents"], min_latent_frames=3, train_resampled=False, shuffle_buffer=0)
    with pytest.warns(BadSampleWarning, match=r"s2 .*latents have 2 frames, fewer than min_latent_frames 3"):
        batches = list(dm.train_dataloader())
    assert [k for b in batches for k in b.keys] == ["s0", "s1", "s3"]
    assert sum(b.origin.skipped for b in batches) == 1
    # Mixed lengths stay mixed: the 12-frame sample is padded, never cut to the 3-frame one.
    assert batches[0].latents.shape[2] == 12 and batches[0].num_frames.tolist() == [12, 3]


class Validating(Recorder):
    def validation_step(self, batch: NarrativeBatch, batch_idx: int) -> None:
        pass


def test_skipped_validation_samples_are_counted_in_a_metric(tmp_path: Path) -> None:
    train = write_shards(tmp_path / "t", shards=1, per_shard=4)
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "broken.tar").write_bytes(os.urandom(1024))
    val = [str(tmp_path / "v" / "broken.tar"), write_shards(tmp_path / "v", shards=1, per_shard=3, prefix="val")]
    dm = ShardDataModule(train_urls=train, val_urls=val, batch_size=2, num_workers=0, text_len=8,
                         batches_per_epoch=2, dtype="float32")  # fmt: skip
    model = Validating()
    with pytest.warns(BadSampleWarning, match="broken.tar"):
        _trainer(tmp_path, max_steps=2, callbacks=[DataMonitor()]).fit(model, datamodule=dm)
    assert model.trainer.callback_metrics["data/val_skipped_samples"].item() == 1
