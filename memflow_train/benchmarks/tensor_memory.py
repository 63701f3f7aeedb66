"""Peak memory of the tensors a piece of code creates, on CPU as on GPU.

CUDA has allocator statistics (torch.cuda.max_memory_allocated); the CPU allocator has none, so
on CPU every tensor storage an operator returns inside the context is counted until it is freed
(a weakref finalizer on the storage), and the peak of the running sum is kept. Views share their
storage and count once; tensors that existed before the context (weights) do not count.
"""

from __future__ import annotations

import weakref
from types import TracebackType

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _StorageCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage in self._seen:
                    continue
                size = storage.nbytes()
                self._seen[storage] = size
                self.current += size
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.current -= size


class PeakTensorMemory:
    """with PeakTensorMemory(device) as m: ...; then m.peak_bytes (tensors created inside, at their peak).

    On CUDA it reads the allocator's peak over the block (minus what was allocated before); on CPU it
    counts storages (slower: every operator goes through Python, so do not time code inside it).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._counter: _StorageCounter | None = None
        self._base = 0

    def __enter__(self) -> PeakTensorMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._counter = _StorageCounter()
            self._counter.__enter__()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._counter is not None:
            self._counter.__exit__(exc_type, exc, tb)
            self.peak_bytes = self._counter.peak
        else:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
