"""Benchmark machinery: the tensor memory meter, history filling, and the benchmark commands at tiny sizes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from memflow_train.benchmarks import bank_exposure, cost_growth, dmd_step, memory_overhead
from memflow_train.benchmarks.tensor_memory import PeakTensorMemory
from memflow_train.memory import NAM, MemoryPolicy
from tests.wan_helpers import tiny_model

MIB = 2**20


def test_peak_tensor_memory_counts_live_storages() -> None:
    kept = torch.zeros(MIB // 4)  # created before: not counted
    with PeakTensorMemory() as m:
        a = torch.ones(MIB // 4)  # 1 MiB
        b = a * 2  # 2 MiB live
        view = b[:10]  # a view: no new storage
        del b  # still alive through the view
        c = torch.ones(2 * MIB // 4)  # 4 MiB live: the peak
        del a, c, view
        d = torch.ones(MIB // 4)  # 1 MiB live
    assert m.peak_bytes == 4 * MIB
    assert kept.numel() and d.numel()


def test_peak_tensor_memory_sees_backward() -> None:
    w = torch.randn(256, 256, requires_grad=True)
    with PeakTensorMemory() as m:
        (w @ w).sum().backward()
    assert m.peak_bytes >= 2 * w.nbytes  # the product and the gradient


@pytest.mark.parametrize("memory", [NAM(), NAM(record_interval=1, bank_size=2)])
def test_history_pool_fills_the_cache_like_fresh_draws(memory: MemoryPolicy) -> None:
    """Same cache geometry (which frames the bank keeps depends on the random keys, not how many)."""
    model = tiny_model()
    text = model.encode_text(torch.randn(1, 5, 16))
    caches = [model.new_kv_cache(memory) for _ in range(2)]
    for cache, pool in zip(caches, (0, 2), strict=True):
        memory_overhead.fill_history(cache, text, 20, (1, 2, 3 * 6, 12), pool=pool)
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        assert (a.next_frame, a.local.start, a.sink.num_frames) == (b.next_frame, b.local.start, b.sink.num_frames)
        assert len(a.memory) == len(b.memory) == memory.bank_size and len(a.memory.pending) == len(b.memory.pending)


def test_cost_growth_attended_frames(tmp_path: Path) -> None:
    """Memory-free and SMA attend sink + window at every depth; NAM adds its bank once it has filled; the per-frame
    policies (surprise-gated bank, slow-fast memory) hold their budget as soon as 3 frames have left the window."""
    out = tmp_path / "growth.json"
    rows = cost_growth.main(
        ["--preset", "tiny", "--num-layers", "1", "--height", "32", "--width", "32", "--text-len", "8",
         "--chunks", "5", "12", "40", "--repeats", "1", "--json", str(out)]
    )  # fmt: skip
    attended = {(r["variant"], r["chunk"]): r["attended_frames"] for r in rows}
    assert attended == {
        ("off", 5): 12, ("off", 12): 12, ("off", 40): 12,
        ("nam", 5): 12, ("nam", 12): 15, ("nam", 40): 15,
        ("nam_sma", 5): 12, ("nam_sma", 12): 12, ("nam_sma", 40): 12,
        ("surprise", 5): 15, ("surprise", 12): 15, ("surprise", 40): 15,
        ("slow_fast", 5): 15, ("slow_fast", 12): 15, ("slow_fast", 40): 15,
    }  # fmt: skip
    assert len(json.loads(out.read_text())["rows"]) == 15


def test_memory_overhead_compares_nam_with_memory_free_of_equal_keys(tmp_path: Path) -> None:
    """Full NAM and the widened memory-free window attend the same frames; the column relates exactly those."""
    rows = memory_overhead.main(
        ["--preset", "tiny", "--num-layers", "1", "--height", "32", "--width", "32", "--text-len", "8",
         "--chunks", "5", "40", "--repeats", "1", "--json", str(tmp_path / "o.json")]
    )  # fmt: skip
    by = {(r["variant"], r["chunk"]): r for r in rows}
    assert {k: r["attended_frames"] for k, r in by.items()} == {
        ("off", 5): 12, ("off", 40): 12, ("nam", 5): 12, ("nam", 40): 15,
        ("nam_sma", 5): 12, ("nam_sma", 40): 12, ("off_nam_keys", 5): 15, ("off_nam_keys", 40): 15,
        ("surprise", 5): 15, ("surprise", 40): 15, ("slow_fast", 5): 15, ("slow_fast", 40): 15,
    }  # fmt: skip
    t = {k: r["seconds_per_chunk"] for k, r in by.items()}
    assert by[("nam", 40)]["vs_memory_free_same_keys"] == pytest.approx(t[("nam", 40)] / t[("off_nam_keys", 40)] - 1)
    assert by[("nam", 5)]["vs_memory_free_same_keys"] == pytest.approx(t[("nam", 5)] / t[("off", 5)] - 1)
    assert by[("nam_sma", 40)]["vs_memory_free_same_keys"] == pytest.approx(t[("nam_sma", 40)] / t[("off", 40)] - 1)
    assert by[("off", 40)]["vs_memory_free_same_keys"] is None
    assert by[("off_nam_keys", 40)]["vs_off"] == pytest.approx(t[("off_nam_keys", 40)] / t[("off", 40)] - 1)


def test_dmd_step_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "dmd.json"
    rows = dmd_step.main(
        ["--preset", "tiny", "--height", "32", "--width", "32", "--num-frames", "12", "--text-len", "8",
         "--prompt-tokens", "4", "--record-interval", "1", "--variants", "off", "nam", "--json", str(out)]
    )  # fmt: skip
    assert [r["variant"] for r in rows] == ["off", "nam"]
    assert all(r["seconds_per_step"] > 0 and r["peak_gib"] > 0 and len(r["exit_steps"]) == 4 for r in rows)
    assert rows[0]["time_vs_off"] == 0 and json.loads(out.read_text())["args"]["num_frames"] == 12


@pytest.mark.slow
def test_data_consumption_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from data.benchmark_consumption import main

    monkeypatch.setenv("MEMFLOW_TRAIN_CACHE", os.environ.get("MEMFLOW_TRAIN_CACHE", str(tmp_path / "cache")))
    repo = Path(__file__).resolve().parents[1]
    result = main(["--config", str(repo / "configs" / "demo.yaml"), "--num-workers", "0", "--batches", "3",
                   "--json", str(tmp_path / "c.json")])  # fmt: skip
    train, (loader,) = result["training"], result["loaders"]
    assert train["steps_timed"] == 10 and train["batch_size"] == 2  # 3 cycles of gen_update_ratio 5, first skipped
    assert loader["headroom"] == pytest.approx(loader["samples_per_s"] / train["samples_per_s"])
    assert json.loads((tmp_path / "c.json").read_text())["loaders"][0]["workers"] == 0


def test_bank_exposure_counts_the_chunks_that_attend_a_bank(tmp_path: Path) -> None:
    """Stage 1's geometry (sink 3, window 9, chunks of 3, bank 3, record_interval 3, 21 frames): a
    candidate joins 9 frames after its chunk starts; by the rule, "interval" records chunks 3 and 6 only."""
    out = tmp_path / "exposure.json"
    rows = bank_exposure.main(["--config", "configs/memflow_wan1.3b_stage1.yaml", "--json", str(out)])
    by = {r["record_cadence"]: r["bank_frames_per_chunk"] for r in rows}
    assert by == {"interval": [0, 0, 0, 0, 0, 0, 1], "every_chunk": [0, 0, 0, 0, 1, 1, 2]}
    assert json.loads(out.read_text())["rows"] == rows
    with pytest.raises(SystemExit):
        bank_exposure.main(["--config", "configs/memflow_wan1.3b_stage1.yaml", "--num-frames", "20"])
