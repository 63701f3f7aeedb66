"""The memory-policy plug-in: which past frames a chunk attends besides the sink and the local window.

A policy is a frozen dataclass (its options, validated when built) selected in YAML by class_path:

    model:
      init_args:
        memory:
          class_path: memflow_train.memory.NAM       # or MemoryFree, SurpriseGatedBank, SlowFastMemory, your own
          init_args: {bank_size: 3, sma: true, sink_size: 3, local_attn_size: 9, num_frame_per_block: 3}

Every policy carries the cache geometry (sink, local window, chunk) and the recache modes, which the KV cache
and the rollout read. `new_layer_memory()` gives one layer's state (LayerMemory); the per-layer KV cache
(memory/kv_cache.py) calls it, and the backbone, the rollout and the methods never know which policy runs.
A policy of your own: subclass MemoryPolicy (a frozen dataclass whose fields all have defaults), return your
LayerMemory from new_layer_memory, and name its class_path in the YAML.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch

from memflow_train.checks import IgnoredSettingWarning, whole
from memflow_train.memory.frames import FrameRun
from memflow_train.memory.relevance import TextKeys
from memflow_train.memory.window import AttentionWindow

CHOICES = {  # the allowed values of every geometry option that names a mode
    "recache": ("chunkwise", "joint"),
    "recache_sink": ("keep", "reencode_early", "replace"),
    "context_noise": ("none", "schedule_table"),
}


@dataclass
class MemoryRead:
    """What one chunk's attention reads from the memory, placed between the sink and the local window.

    k, v: memory frames (B, H, n, T, D) in temporal order. topk: keep, per (sample, head), only the topk frames
    most relevant to the chunk's queries (SMA, memory/sma.py); None reads all n. key_means: float32 mean keys
    (B, H, n, D) kept for that choice. includes_sink: the visible sink frames are the first frames of k (they
    compete for the topk) and are not read separately. sink: the cache's sink re-pointed to views of k (no
    second copy); the cache adopts it.
    """

    k: torch.Tensor
    v: torch.Tensor
    topk: int | None = None
    key_means: torch.Tensor | None = None
    includes_sink: bool = False
    sink: FrameRun | None = None


class LayerMemory(ABC):
    """One layer's memory under a policy. The KV cache calls, per chunk:

    commit(window_start, text)  before the chunk: frames that left the local window may enter the memory;
                                retrieval may use the chunk's prompt (text keys of this layer, or None);
    read(sink_runs)             what the chunk's attention reads (may depend on its queries: MemoryRead.topk);
    record(k, v, start, n, text)  after the clean re-run wrote frames [start, start + n) into the window;
    evict(run)                  then, the frames the window dropped (no later chunk's window sees them).
    At a prompt switch, rewind(frame) forgets what the recache writes again (frames >= frame).
    """

    def record(  # noqa: B027 (a hook: policies override the calls they use)
        self, k: torch.Tensor, v: torch.Tensor, start: int, num_frames: int, text: TextKeys | None
    ) -> None:
        """Frames just written, keys/values (B, H, num_frames * T, D), detached, post-RoPE (default: ignored)."""

    def evict(self, run: FrameRun) -> None:  # noqa: B027 (a hook, as record)
        """Frames the local window just dropped, oldest first (views of the cache's storage; default: ignored).
        They are the frames that leave the window before the next chunk, so commit sees them next."""

    @abstractmethod
    def commit(self, window_start: int, text: TextKeys | None) -> None:
        """Before the chunk whose local window starts at frame window_start."""

    @abstractmethod
    def read(self, sink_runs: list[FrameRun]) -> MemoryRead | None:
        """The chunk's memory read; sink_runs: the sink frames it sees outside the window. None: nothing."""

    @abstractmethod
    def rewind(self, frame: int) -> None:
        """Forget candidates at or after `frame`; ValueError when the memory already holds such a frame."""

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def frames(self) -> torch.Tensor | None:
        """Absolute frame index of each held memory frame (B, n) (a consolidated frame: its first), or None."""

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (for memory accounting)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Plain data; every tensor batch-first (dim 0: the sample), so that a recache of some samples of a batch
        can keep the other samples' rows (memflow_train.rollout.streaming)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def __len__(self) -> int:
        frames = self.frames()
        return 0 if frames is None else frames.shape[1]


@dataclass(frozen=True)
class MemoryPolicy:
    """Base of every memory policy: the cache geometry and recache modes all policies share.

    The attention pattern (AttentionWindow): a chunk of num_frame_per_block latent frames sees the first
    sink_size frames of the video and the local window of the last local_attn_size frames (itself included;
    -1: unbounded). Prompt switches (memflow_train.memory.recache):
    - recache: "chunkwise" re-encodes, at a prompt switch, the frames the window still holds chunk by chunk,
      block-causally; "joint" re-encodes the last sink_size + local_attn_size frames (the official
      local_attn_size, which counts the sink) in ONE forward in which every re-encoded frame attends every
      other; only the frames the window holds are kept.
    - recache_sink: "keep" never re-encodes the sink; "reencode_early" (MemFlow's global_sink true) re-encodes
      everything from frame 0 under the new prompt, sink included, when the chunk at which the switch takes
      effect starts at frame <= sink_size + local_attn_size (chunkwise replays those frames from their kept
      latents, also those the window had evicted); "replace" (LongLive's global_sink false, memory-free only)
      makes the first sink_size re-encoded frames the sink for the rest of the video.
    - context_noise: "none" writes the clean chunk into the cache; "schedule_table" first adds noise at the
      sigma of the training table's entry nearest the context timestep, as the official training rollout does
      (about 0.005 at timestep 0 with shift 5). It applies to the write of each generated chunk; recache
      re-encodes clean latents (as the official recache).
    Subclasses add their options and validate them in __post_init__ (calling this one first).
    """

    sink_size: int = 3
    local_attn_size: int = 9
    num_frame_per_block: int = 3
    recache: Literal["chunkwise", "joint"] = "chunkwise"
    recache_sink: Literal["keep", "reencode_early", "replace"] = "keep"
    context_noise: Literal["none", "schedule_table"] = "none"

    def __post_init__(self) -> None:
        for key in ("sink_size", "local_attn_size", "num_frame_per_block"):
            whole(f"memory.{key}", getattr(self, key))
        whole(f"{type(self).__name__}.budget (the most memory frames a layer holds)", self.budget, low=0)
        self.window  # validates the window geometry  # noqa: B018
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"memory.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.recache_sink == "replace" and self.enabled:
            raise ValueError(
                "memory.recache_sink='replace' (LongLive's global_sink false) is for memory-free runs: the new "
                "sink could hold frames the memory holds too; choose memflow_train.memory.MemoryFree (--memory "
                "off in generation), a zero budget, or another recache_sink"
            )
        if self.enabled and self.local_attn_size == -1:
            raise ValueError("memory.local_attn_size=-1 (unbounded window) leaves nothing for a memory to recall")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, why in self.unused_options().items():
            if getattr(self, key) != defaults.get(key, getattr(self, key)):
                warnings.warn(
                    f"memory.{key}={getattr(self, key)!r} is not used: {type(self).__name__} never reads it when {why}; "
                    "drop it or change that setting",
                    IgnoredSettingWarning,
                    stacklevel=4,
                )

    @property
    def budget(self) -> int:
        """Memory frames one layer holds at most (0: the policy keeps nothing; it then equals MemoryFree)."""
        return 0

    @property
    def enabled(self) -> bool:
        """Whether anything besides the sink and the window is attended."""
        return self.budget > 0

    def new_layer_memory(self) -> LayerMemory | None:
        """One layer's memory state; None when the policy keeps nothing."""
        return None

    def unused_options(self) -> dict[str, str]:
        """The options this policy's settings make idle, each with the setting that idles it (a zero budget
        idles the rest). A value other than its default among them is named in an IgnoredSettingWarning."""
        return {}

    @property
    def window(self) -> AttentionWindow:
        return AttentionWindow(self.num_frame_per_block, self.local_attn_size, self.sink_size)

    @property
    def max_attended_frames(self) -> int:
        """Upper bound on the frames one chunk's attention reads."""
        return self.sink_size + self.budget + self.local_attn_size

    def memory_free(self) -> MemoryFree:
        """The memory-free policy with this geometry (the baseline a memory is compared with)."""
        return MemoryFree(**{k: getattr(self, k) for k in GEOMETRY})

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class MemoryFree(MemoryPolicy):
    """The empty policy: sink + local window only (LongLive / Self-Forcing's memory-free baseline)."""


GEOMETRY = tuple(f.name for f in dataclasses.fields(MemoryPolicy))  # the options every policy shares


def class_path(policy: MemoryPolicy | type[MemoryPolicy]) -> str:
    cls = policy if isinstance(policy, type) else type(policy)
    return f"{cls.__module__}.{cls.__qualname__}"


def plain_policy(policy: MemoryPolicy) -> dict[str, Any]:
    """{"class_path": ..., "init_args": {...}}: what a config or a checkpoint's hyperparameters hold."""
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in policy.options().items()}
    return {"class_path": class_path(policy), "init_args": args}


def _resolve(path: str) -> type[MemoryPolicy]:
    module, _, name = path.rpartition(".")
    if not module:  # a bare class name: one of ours
        module = "memflow_train.memory"
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"memory.class_path {path!r}: no such class ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, MemoryPolicy)):
        raise ValueError(f"memory.class_path {path!r} is not a memflow_train.memory.MemoryPolicy subclass")
    return cls


def memory_policy(value: MemoryPolicy | dict | None) -> MemoryPolicy | None:
    """A policy from a policy, a {class_path, init_args} dict, or the plain fields of the NAM-era MemoryConfig
    (checkpoints saved before memory policies: `enabled: false` is MemoryFree, else NAM). None stays None.

    Raises ValueError for an unknown class, a class that is not a MemoryPolicy, or an option the class does not
    take (a legacy dict's bank and SMA options are dropped when it says enabled: false)."""
    from memflow_train.memory.nam import NAM

    if value is None or isinstance(value, MemoryPolicy):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"memory: expected a MemoryPolicy or a dict, got {type(value).__name__}")
    value = dict(value)
    if "class_path" in value:
        cls, args = _resolve(str(value.pop("class_path"))), dict(value.pop("init_args", None) or {})
        if value:
            raise ValueError(f"memory: unexpected keys {sorted(value)} beside class_path and init_args")
    else:  # the plain fields of the old MemoryConfig
        enabled = value.pop("enabled", True)
        cls, args = (NAM if enabled else MemoryFree), value
        if not enabled:  # NAM's own options are idle then
            args = {k: v for k, v in args.items() if k in GEOMETRY}
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise ValueError(f"memory: {class_path(cls)} takes no option {unknown}; it takes {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
