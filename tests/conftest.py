"""Shared pytest setup: gpu-marked tests skip without CUDA; seeded, single-threaded torch."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# Tiny models: one thread is faster (no sync overhead) and gives the same sums on every run.
torch.set_num_threads(1)
