"""Two ranks (gloo, separate processes) read the same shards: different samples, the same number per epoch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.format import Sample
from data.writer import ShardSink

SCRIPTS = Path(__file__).parent / "scripts"


def _write(folder: Path, prefix: str, shards: int, per_shard: int) -> str:
    sink = ShardSink(str(folder), {}, max_samples=per_shard, prefix=prefix)
    for i in range(shards * per_shard):
        sink.write(i, Sample(f"{prefix}{i:04d}", [f"prompt {i}"], text=[torch.full((2, 4), float(i))]))
    return sink.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(args: list[str]) -> None:
    """Both ranks as plain processes joined through gloo."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output


@pytest.mark.distributed
def test_two_ranks_read_different_samples_equally(tmp_path: Path) -> None:
    train = _write(tmp_path, "train", shards=4, per_shard=16)
    val = _write(tmp_path, "val", shards=4, per_shard=3)
    out = tmp_path / "keys.json"
    _run_ranks([str(SCRIPTS / "data_ddp_read.py"), train, val, str(out)])
    ranks = json.loads(out.read_text())

    for epoch in range(2):
        a, b = (r["train"][epoch] for r in ranks)
        assert len(a) == len(b) == 8  # batches_per_epoch x batch_size on every rank
        assert a != b and len(set(a) & set(b)) < 4  # own streams; the overlap resampling allows by chance
    assert ranks[0]["train"][0] != ranks[0]["train"][1]
    v0, v1 = (r["val"] for r in ranks)
    assert len(v0) == len(v1) == 6 and not set(v0) & set(v1)  # every validation sample once, split evenly
    assert sorted(v0 + v1) == [f"val{i:04d}" for i in range(12)]


def _fit(train: str, out: Path, steps: int, ckpt: Path | None = None) -> list[dict]:
    """Lightning's own DDP launcher (it starts rank 1 by running the script again)."""
    args = [sys.executable, str(SCRIPTS / "data_ddp_fit.py"), train, str(out), str(steps)] + (
        [str(ckpt)] if ckpt else []
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run(
        args, env={**env, "MASTER_PORT": str(_free_port())}, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.slow
def test_lightning_ddp_resume_continues_every_rank(tmp_path: Path) -> None:
    train = _write(tmp_path, "train", shards=4, per_shard=16)
    whole = _fit(train, tmp_path / "whole", steps=4)
    assert whole[0]["seen"] != whole[1]["seen"] and len(whole[0]["seen"]) == len(whole[1]["seen"]) == 8
    resumed = _fit(train, tmp_path / "resumed", steps=4, ckpt=tmp_path / "whole" / "ckpt" / "epoch=0-step=2.ckpt")
    for rank in range(2):  # rank 0's saved position resumes both ranks
        assert resumed[rank]["seen"] == whole[rank]["seen"][4:]
        assert (
            resumed[rank]["metrics"]
            == whole[rank]["metrics"]
            == {
                "data/skipped_samples": 0.0,
                "data/consumed_samples": 16.0,  # 2 ranks x 4 steps x 2 samples, across the resume
            }
        )
