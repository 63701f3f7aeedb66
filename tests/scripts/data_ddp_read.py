"""One rank of the 2-process data test: read a training epoch and the validation set, gather keys to rank 0.

Run by tests/test_data_distributed.py with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.
usage: python tests/scripts/data_ddp_read.py TRAIN_URLS VAL_URLS OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `data` is a repo-level package

from data.datamodule import ShardDataModule  # noqa: E402


def main(train_urls: str, val_urls: str, out: str) -> None:
    dist.init_process_group("gloo")
    try:
        dm = ShardDataModule(
            train_urls=train_urls,
            val_urls=val_urls,
            batch_size=2,
            num_workers=2,
            batches_per_epoch=4,
            shuffle_buffer=8,
            text_len=8,
            dtype="float32",
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        epochs = [[k for b in loader for k in b.keys] for _ in range(2)]
        val = [k for b in dm.val_dataloader() for k in b.keys]
        gathered: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"train": epochs, "val": val})
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
