"""Lightning DDP on CPU (2 processes, gloo) over a ShardDataModule: what each rank trained on, and the data
metrics. Run by tests/test_data_distributed.py; Lightning's launcher starts rank 1 by running this script again.

usage: python tests/scripts/data_ddp_fit.py TRAIN_URLS OUT_DIR MAX_STEPS [CKPT_PATH]
writes OUT_DIR/rank{R}.json with the keys rank R trained on and the logged data metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: data, callbacks

from callbacks.data_monitor import DataMonitor  # noqa: E402
from data.datamodule import ShardDataModule  # noqa: E402


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.seen += batch.keys
        return (self.w * batch.prompt_embeds.mean()).sum() ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(train_urls: str, out_dir: str, max_steps: str, ckpt_path: str | None = None) -> None:
    out = Path(out_dir)
    dm = ShardDataModule(
        train_urls=train_urls,
        batch_size=2,
        num_workers=1,
        batches_per_epoch=3,
        shuffle_buffer=8,
        text_len=8,
        dtype="float32",
    )
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=int(max_steps),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[saver, DataMonitor()],
        default_root_dir=out,
    )
    model = Recorder()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("data/")}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"seen": model.seen, "metrics": metrics}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
