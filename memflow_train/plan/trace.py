"""Running real training code on meta-device weights, counting every tensor storage it would hold.

Weights live on the meta device (shapes and dtypes, no data), so a 14B network costs nothing. The code
runs unchanged: an operator with any meta input runs on meta (other inputs are moved there), one without
runs for real on the CPU, so the small tensors that steer control flow (masks, switch frames, exit-step
draws, frame indices) keep their values. What only data could decide is answered by a fixed policy:

- `torch.isfinite` of a meta tensor is all true (losses and gradient norms are finite; functions.py);
- any other scalar read from a meta tensor (`bool(...)`, `.item()`) is False / 0 (e.g. "does the bank
  already hold this frame": no);
- a real boolean mask indexing a meta tensor selects what it selects (its nonzero is taken for real).

Every storage an operator returns is counted until it is freed (as PeakTensorMemory counts real ones),
under a category (parameters, gradients, optimizer state, KV cache, ...). Profiles weigh the categories
(e.g. ZeRO-3 keeps 1/N of the parameters on a GPU) and keep their own running peak, so one trace answers
several strategies. Meta kernels are cached by input metadata (shape, stride, dtype): a rollout repeats
the same few hundred operators thousands of times.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
META = torch.device("meta")
CPU = torch.device("cpu")
_NO_CACHE = object()
# Mutating operators that change a tensor's shape or storage: they always run their meta kernel.
_RESHAPING = ("resize", "set_", "as_strided", "swap")


@dataclass
class Profile:
    """How many bytes of each category one GPU holds under a strategy: factor (default 1) times the traced
    bytes, plus constant bytes held throughout the step (communication buffers, DeepSpeed's fp32 master
    weights), by name. Categories are kind:network (param, frozen, grad, state) or a kind alone (activation,
    buffer, kv_cache, rollout, optim_temp, ema); a factor given for a kind applies to all its networks."""

    name: str
    factors: dict[str, float] = field(default_factory=dict)
    constants: dict[str, int] = field(default_factory=dict)
    running: float = 0.0
    peak: float = 0.0
    at_peak: dict[str, int] = field(default_factory=dict)

    def factor(self, category: str) -> float:
        kind, _, _ = category.partition(":")
        return self.factors.get(category, self.factors.get(kind, 1.0))

    def weights(self) -> dict[str, float]:
        """A memo of factor() by category (the factors do not change during a trace)."""
        return _FactorMemo(self)


class _FactorMemo(dict):
    def __init__(self, profile: Profile) -> None:
        super().__init__()
        self.profile = profile

    def __missing__(self, category: str) -> float:
        value = self[category] = self.profile.factor(category)
        return value


# Categories held from before the step in steady state but created inside the first traced step: they are
# left out of the running sums and added at their final size (see Tracer.persistent).
PERSISTENT = ("ema",)


def _leaves(x: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, list | tuple):
        for y in x:
            _leaves(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _leaves(y, out)
    return out


def _operator_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among an operator's arguments (at most one list level deep, as aten schemas allow)."""
    out = []
    for group in (args, kwargs.values()):
        for a in group:
            if isinstance(a, torch.Tensor):
                out.append(a)
            elif isinstance(a, list | tuple):
                out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x if x.is_meta else x.to(META)
    if isinstance(x, list | tuple):
        return type(x)(_to_meta(y) for y in x)
    return x


_PLAIN = (int, float, bool, str, torch.dtype, torch.device, torch.layout, torch.memory_format, type(None))


def _plain_key(x: Any) -> Any:
    """(type, value): 2, 2.0 and True are equal in Python but give different result dtypes."""
    if isinstance(x, _PLAIN):
        return x.__class__, x
    raise TypeError(type(x).__name__)


def _key(args: tuple | list) -> tuple:
    """Hashable metadata of an operator's arguments (tensors by shape, stride and dtype; aten arguments nest
    one list deep); TypeError for anything else (then: no caching)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.shape, a.stride(), a.dtype))
        elif isinstance(a, list | tuple):
            out.append(
                tuple((x.shape, x.stride(), x.dtype) if isinstance(x, torch.Tensor) else _plain_key(x) for x in a)
            )
        else:
            out.append(_plain_key(a))
    return tuple(out)


_INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


def _long_indices(indices: list) -> list:
    """Boolean masks among advanced indices as the integer indices they select (what torch computes with
    nonzero), so a real mask indexes a meta tensor with the right number of elements."""
    out: list = []
    for index in indices:
        if isinstance(index, torch.Tensor) and not index.is_meta and index.dtype in (torch.bool, torch.uint8):
            out += list(index.nonzero().unbind(1))
        else:
            out.append(index)
    return out


_RETURNS_SELF: dict[Any, bool] = {}


def _returns_self(func: torch._ops.OpOverload) -> bool:
    """An in-place operator returning its (unchanged-shape) first argument, e.g. add_, copy_, lerp_."""
    schema = func._schema
    if not schema.is_mutable or len(schema.returns) != 1 or torch.Tag.inplace_view in func.tags:
        return False
    if any(part in schema.name for part in _RESHAPING):
        return False
    out, first = schema.returns[0].alias_info, schema.arguments[0].alias_info if schema.arguments else None
    return out is not None and out.is_write and first is not None and first.is_write


class Tracer(TorchDispatchMode):
    """Counts tensor storages by category; runs operators with meta inputs on meta (see the module doc)."""

    def __init__(self, profiles: list[Profile], persistent: tuple[str, ...] = PERSISTENT) -> None:
        """persistent: categories counted at their final size throughout (steady state); () counts them
        only from when they are created (a first step)."""
        super().__init__()
        self.profiles = profiles
        self.persistent_kinds = persistent
        self.phase = "activation"  # the category of storages created now
        self.live: dict[str, int] = {}
        self.largest: dict[str, int] = {}  # the most each category held at once
        self.persistent: dict[str, int] = {}  # PERSISTENT categories' bytes now (added at their final size)
        self._storages: dict[int, list] = {}  # storage address -> [bytes, category, weak reference]
        self._meta_cache: dict[Any, Any] = {}
        self._weights = [(p, p.weights()) for p in profiles]
        self.operators = 0

    # ------------------------------------------------------------------------------------ accounting

    def _change(self, category: str, delta: int) -> None:
        now = self.live.get(category, 0) + delta
        self.live[category] = now
        if now > self.largest.get(category, 0):
            self.largest[category] = now
        if category.partition(":")[0] in self.persistent_kinds:
            self.persistent[category] = now
            return
        for p, weights in self._weights:
            p.running += weights[category] * delta
            if p.running > p.peak:
                p.peak = p.running
                p.at_peak = dict(self.live)

    def _count(self, out: Any) -> None:
        for t in _leaves(out, []):
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._storages:
                continue
            entry = [storage.nbytes(), self.phase, None]
            entry[2] = weakref.ref(storage, lambda _, k=key: self._free(k))
            self._storages[key] = entry
            self._change(entry[1], entry[0])

    def _free(self, key: int) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            self._change(entry[1], -entry[0])

    def label(self, tensors: Any, category: str) -> None:
        """Count these tensors' storages under `category` from now on (those not seen yet are added)."""
        for t in _leaves(tensors, []):
            entry = self._storages.get(t.untyped_storage()._cdata)
            if entry is None:
                phase, self.phase = self.phase, category
                try:
                    self._count(t)
                finally:
                    self.phase = phase
            elif entry[1] != category:
                self._change(entry[1], -entry[0])
                entry[1] = category
                self._change(category, entry[0])

    def reset_peaks(self) -> None:
        """Start every profile's peak from what is held now (the start of the measured steps)."""
        for p in self.profiles:
            p.peak, p.at_peak = p.running, dict(self.live)

    @contextmanager
    def phase_of(self, category: str) -> Iterator[None]:
        """Storages created inside count under `category`."""
        before, self.phase = self.phase, category
        try:
            yield
        finally:
            self.phase = before

    def peak_bytes(self, profile: Profile) -> int:
        """The profile's peak: its running peak plus the PERSISTENT categories at their final size, plus its
        constant bytes."""
        held = sum(profile.factor(c) * b for c, b in self.persistent.items())
        return int(round(profile.peak + held)) + sum(profile.constants.values())

    def composition(self, profile: Profile) -> dict[str, int]:
        """Bytes per category on one GPU at the profile's peak (PERSISTENT ones at their final size)."""
        parts = {c: int(round(profile.factor(c) * b)) for c, b in profile.at_peak.items()}
        parts.update({c: int(round(profile.factor(c) * b)) for c, b in self.persistent.items()})
        parts.update(profile.constants)
        return {c: b for c, b in parts.items() if b}

    # ------------------------------------------------------------------------------------ dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        self.operators += 1
        kwargs = kwargs or {}
        tensors = _operator_tensors(args, kwargs)
        meta = [t.is_meta for t in tensors]
        if not any(meta):
            return self._real(func, args, kwargs, tensors)
        if func is aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 0
        if func in _INDEXING and len(args) > 1:
            args = (args[0], _long_indices(args[1]), *args[2:])
        if not all(meta) or func in _INDEXING:
            args, kwargs = _to_meta(args), {k: _to_meta(v) for k, v in kwargs.items()}
        device = kwargs.get("device")
        if device is not None and isinstance(device, torch.device) and device.type != "meta":
            kwargs["device"] = META  # e.g. .to(cpu) of a meta tensor stays on meta
        returns_self = _RETURNS_SELF.get(func)
        if returns_self is None:
            returns_self = _RETURNS_SELF[func] = _returns_self(func)
        if returns_self:
            return args[0]  # shapes cannot change; nothing new is allocated
        return self._meta(func, args, kwargs)

    def _real(self, func: Any, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> Any:
        """A factory asked for meta with an integer dtype runs on the CPU (frame indices keep their values)."""
        out = func(*args, **kwargs)
        device = kwargs.get("device")
        if (
            not tensors
            and isinstance(device, torch.device)
            and device.type == "meta"
            and isinstance(out, torch.Tensor)
            and not (out.dtype.is_floating_point or out.dtype.is_complex)
        ):
            out = func(*args, **{**kwargs, "device": CPU})
        self._count(out)
        return out

    def _meta(self, func: Any, args: tuple, kwargs: dict) -> Any:
        try:
            key = (func, _key(args), tuple(kwargs), _key(tuple(kwargs.values())))
        except TypeError:
            key = None
        cached = self._meta_cache.get(key) if key is not None else None
        if cached is not None and cached is not _NO_CACHE:
            single, metas = cached
            outs = [torch.empty_strided(s, st, dtype=d, device=META) for s, st, d in metas]
            out = outs[0] if single else tuple(outs)
        else:
            out = func(*args, **kwargs)
            if key is not None and cached is None:
                self._meta_cache[key] = _cache_entry(out, args, kwargs)
        self._count(out)
        return out


def _cache_entry(out: Any, args: tuple, kwargs: dict) -> Any:
    """What to rebuild `out` from (fresh outputs only: never an output sharing an input's storage)."""
    if isinstance(out, torch.Tensor):
        outs, single = [out], True
    elif isinstance(out, tuple) and out and all(isinstance(o, torch.Tensor) for o in out):
        outs, single = list(out), False
    else:
        return _NO_CACHE
    inputs = {t.untyped_storage()._cdata for t in _leaves((args, kwargs), [])}
    storages = [o.untyped_storage()._cdata for o in outs]
    if any(s in inputs for s in storages) or len(set(storages)) != len(storages):
        return _NO_CACHE
    return single, [(tuple(o.shape), o.stride(), o.dtype) for o in outs]
