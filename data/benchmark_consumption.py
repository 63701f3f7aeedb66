"""python -m data.benchmark_consumption: does the data loader keep up with training?

training   `train.py fit --config CONFIG` for 3 x gen_update_ratio steps through the CLI (so generator
           and critic-only steps come in their real proportion); a callback times each training batch
           from its start to its end (compute, without data) and the gap before it (waiting for data
           and Lightning's own work). Consumption = batch size / mean compute time of the steps after
           the first cycle (the first pays one-off start-up costs).
loader     the config's DataModule read alone (data.benchmark.measure) with each --num-workers.
headroom   loader samples/s / training samples/s: above 1 the loader keeps up.

With --real-shards it also reads random shards shaped like Wan2.1 1.3B data (4096-d UMT5 prompt
embeddings; latents 16 x 21 x 60 x 104), whose consumer is a 1.3B training step (benchmark 4:
--dmd-json takes its JSON for the comparison).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import lightning as L

from data.benchmark import measure, write_random_shards
from data.datamodule import ShardDataModule
from memflow_train.cli import MemflowCLI


class BatchClock(L.Callback):
    def __init__(self) -> None:
        self.compute: list[float] = []
        self.gaps: list[float] = []
        self._end = self._start = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        self._start = time.perf_counter()
        if self._end is not None:
            self.gaps.append(self._start - self._end)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._end = time.perf_counter()
        self.compute.append(self._end - self._start)


def _cli(config: str, *overrides: str) -> MemflowCLI:
    quiet = [
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]",
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*args parameter is intended.*")
        return MemflowCLI(args=["--config", config, *quiet, *overrides], run=False)


def training_rate(config: str) -> dict:
    cli = _cli(config)
    ratio = int(getattr(cli.model.hparams, "gen_update_ratio", 1) or 1)
    clock = BatchClock()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit_loop.epoch_loop.max_steps = 3 * ratio
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    batch = cli.datamodule.batch_size
    steady = clock.compute[ratio:]
    return {
        "batch_size": batch,
        "steps_timed": len(steady),
        "compute_s_per_step": statistics.mean(steady),
        "data_wait_s_per_step": statistics.mean(clock.gaps[ratio - 1 :]),
        "samples_per_s": batch / statistics.mean(steady),
    }


def loader_rate(config: str, workers: int, batches: int) -> dict:
    dm = _cli(config, f"--data.init_args.num_workers={workers}").datamodule
    dm.prepare_data()
    return measure(dm, batches)


def real_loader_rate(kind: str, workers: int, batches: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_random_shards(tmp, kind, 64, 16, 4096, 120, [16, 21, 60, 104])
        fields = ["text", "latents"] if kind == "latents" else ["text"]
        dm = ShardDataModule(
            train_urls=urls, fields=fields, batch_size=batch_size, num_workers=workers, batches_per_epoch=batches + 1
        )
        return measure(dm, batches)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data.benchmark_consumption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=30, help="loader batches timed after the first")
    p.add_argument("--real-shards", action="store_true", help="also read random 1.3B-shaped shards")
    p.add_argument("--dmd-json", help="benchmark 4's JSON (python -m memflow_train.benchmarks.dmd_step --json)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|no logger|treespec).*")
        train = training_rate(args.config)
        loaders = [
            {"data": args.config, "workers": w, **loader_rate(args.config, w, args.batches)} for w in args.num_workers
        ]
        real = []
        if args.real_shards:
            for kind in ("prompts", "latents"):
                for w in args.num_workers:
                    real.append({"data": f"random 1.3B {kind} shards", "workers": w,
                                 **real_loader_rate(kind, w, args.batches, train["batch_size"])})  # fmt: skip
    dmd = None
    if args.dmd_json:
        with open(args.dmd_json) as f:
            report = json.load(f)
        fastest = min(report["rows"], key=lambda r: r["seconds_per_step"])
        dmd = {"samples_per_s": report["args"]["batch_size"] / fastest["seconds_per_step"], "source": args.dmd_json}

    print(
        f"training: {args.config}, batch {train['batch_size']}: {train['compute_s_per_step'] * 1e3:.0f} ms compute "
        f"+ {train['data_wait_s_per_step'] * 1e3:.0f} ms waiting per step (mean of {train['steps_timed']} steps) "
        f"-> consumes {train['samples_per_s']:.2f} samples/s"
    )
    print("| data | workers | loader samples/s | first batch s | consumer | consumer samples/s | headroom |")
    print("|---|---|---|---|---|---|---|")
    for row in loaders:
        row["consumer_samples_per_s"] = train["samples_per_s"]
        row["headroom"] = row["samples_per_s"] / train["samples_per_s"]
        print(f"| {row['data']} | {row['workers']} | {row['samples_per_s']:.1f} | {row['first_batch_s']:.2f} "
              f"| demo training | {train['samples_per_s']:.2f} | {row['headroom']:.1f}x |")  # fmt: skip
    for row in real:
        rate = dmd["samples_per_s"] if dmd else None
        row["consumer_samples_per_s"] = rate
        row["headroom"] = row["samples_per_s"] / rate if rate else None
        consumer = "1.3B DMD step (benchmark 4)" if rate else "-"
        cells = (f"{rate:.4f}", f"{row['headroom']:.0f}x") if rate else ("-", "-")
        print(f"| {row['data']} | {row['workers']} | {row['samples_per_s']:.1f} | {row['first_batch_s']:.2f} "
              f"| {consumer} | {cells[0]} | {cells[1]} |")  # fmt: skip
    result = {"training": train, "loaders": loaders, "real_shards": real, "dmd": dmd}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
