"""Shared pytest setup: gpu-marked tests skip without CUDA; seeded, single-threaded torch."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The multi-process tests first, then the other slow ones (stable otherwise), so that under `pytest -n 2
    # --dist loadfile` the quick files are left to fill the gaps at the end (longest first scheduling). A CI run
    # ended with the 2-rank resume file alone on one worker for minutes when only "slow" was sorted first.
    items.sort(key=lambda item: ("distributed" not in item.keywords, "slow" not in item.keywords))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory):
    """One generated demo dataset per test module (MEMFLOW_TRAIN_CACHE in a temporary folder)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMFLOW_TRAIN_CACHE", str(tmp_path_factory.mktemp("demo_cache")))
        yield


# Tiny models: one thread is faster (no sync overhead) and gives the same sums on every run.
torch.set_num_threads(1)
