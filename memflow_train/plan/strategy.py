"""What a training strategy keeps on each GPU: factors on the traced categories and constant buffers.

The trace runs one rank's step unsharded; a strategy then scales what it shards and adds what it
allocates besides (formulas per strategy below, N = number of GPUs, T = trainable elements):

- single device / DDP: everything as traced. DDP adds its gradient buckets, a second copy of every
  trainable gradient (unless gradient_as_bucket_view).
- DeepSpeed ZeRO stage s (compute dtype b bytes; DeepSpeed casts the whole module to bf16/fp16 under a
  bf16/16 precision): compute parameters b (1/N for s=3, the frozen teacher too), gradients b (1/N for
  s >= 2), fp32 master weights 4T/N and fp32 gradient partitions 4T/N (s >= 1), Adam states 8T/N; with
  offload_optimizer the last three live on the CPU. Buffers: the reduce bucket (twice with overlap_comm);
  for s=3 the gathered parameters (a network within stage3_max_reuse_distance stays gathered, else the
  largest module plus the prefetch bucket, at most stage3_max_live_parameters) and the parameters below
  stage3_param_persistence_threshold, kept whole. Sizes come from DeepSpeed's own config defaults.
- FSDP2 (MemflowFSDP2Strategy: one unit per block and one for the rest of each network): fp32 parameters,
  gradients and AdamW states of trainable networks and the frozen teacher sharded 1/N (all on the CPU with
  a cpu_offload option); the unsharded parameters of two blocks at a time (current + prefetch) and of the
  largest root unit (embeddings, head) in the compute dtype, one block's gradients in fp32 (reduce-scatter).
- The generator EMA is a full fp32 copy on every rank (gathered under ZeRO-3 and FSDP2).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from memflow_train.plan.inventory import Network
from memflow_train.plan.settings import TraceSettings
from memflow_train.plan.trace import Profile

LOW = {"bf16": torch.bfloat16, "16": torch.float16}


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy: kind single / ddp / deepspeed / fsdp2 and its memory-relevant options."""

    kind: str
    stage: int = 0
    offload_optimizer: bool = False
    offload_parameters: bool = False
    mixed_precision: bool = False
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    bucket_view: bool = False
    zero: dict[str, Any] = field(default_factory=dict)  # DeepSpeed zero_optimization, defaults filled in

    @property
    def label(self) -> str:
        if self.kind == "deepspeed":
            offload = " + optimizer offload" if self.offload_optimizer else ""
            return f"DeepSpeed ZeRO-{self.stage}{offload}{' + parameter offload' if self.offload_parameters else ''}"
        if self.kind == "fsdp2":
            opts = [n for n in ("mixed_precision", "activation_checkpointing", "cpu_offload") if getattr(self, n)]
            return "FSDP2" + (f" ({', '.join(opts)})" if opts else "")
        return {"single": "single device", "ddp": "DDP"}[self.kind]

    @property
    def shards_parameters(self) -> bool:
        return self.kind == "fsdp2" or (self.kind == "deepspeed" and self.stage == 3)


def deepspeed(stage: int, offload_optimizer: bool = False, **options: Any) -> Strategy:
    """ZeRO with Lightning's DeepSpeedStrategy defaults (bucket sizes) and DeepSpeed's own for the rest."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    defaults = {
        k: v.default
        for k, v in inspect.signature(DeepSpeedStrategy.__init__).parameters.items()
        if k in ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients")
    }
    zero = {**defaults, **{k: v for k, v in options.items() if k in defaults}, "stage": stage}
    return Strategy("deepspeed", stage, offload_optimizer, bool(options.get("offload_parameters")), zero=_zero(zero))


def _zero(zero: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed's zero_optimization with its defaults filled in (bucket sizes, stage-3 limits)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    known = {k: v for k, v in zero.items() if k not in ("offload_optimizer", "offload_param")}
    config = DeepSpeedZeroConfig(**known)
    keys = ("stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "prefetch_bucket_size",
            "max_live_parameters", "max_reuse_distance", "param_persistence_threshold")  # fmt: skip
    return {k: getattr(config, k) for k in keys}


def _ds_from_instance(class_path: str, init_args: dict[str, Any]) -> Strategy:
    """A DeepSpeed strategy class instantiated as the config asks, its zero_optimization read back."""
    module, _, name = class_path.rpartition(".")
    strategy = getattr(importlib.import_module(module), name)(**init_args)
    zero = dict(strategy.config.get("zero_optimization") or {})
    offload_opt = bool(zero.get("offload_optimizer"))
    offload_param = bool(zero.get("offload_param"))
    return Strategy("deepspeed", int(zero.get("stage", 0)), offload_opt, offload_param, zero=_zero(zero))


def parse_strategy(value: Any, gpus: int) -> Strategy:
    """A strategy from trainer.strategy: a name (auto, ddp..., deepspeed_stage_N[_offload], fsdp) or a
    {class_path, init_args} mapping. Raises ValueError for one the planner has no model of."""
    if value is None or value == "auto":
        return Strategy("single" if gpus == 1 else "ddp")
    if isinstance(value, str):
        name = value.lower()
        if name.startswith("ddp"):
            return Strategy("ddp")
        if name in ("single_device", "single_xla"):
            return Strategy("single")
        if name.startswith("deepspeed"):
            stage = int(name.split("stage_")[1][0]) if "stage_" in name else 2
            return deepspeed(
                stage, offload_optimizer="offload" in name, offload_parameters="offload" in name and stage == 3
            )
        if name.startswith("fsdp"):
            return Strategy("fsdp2", mixed_precision=True)
        raise ValueError(f"trainer.strategy {value!r}: the memory planner has no model of this strategy")
    class_path = str(value.get("class_path", ""))
    init_args = dict(value.get("init_args") or {})
    lowered = class_path.lower()
    if "deepspeed" in lowered:
        try:
            return _ds_from_instance(class_path, init_args)
        except ImportError:
            return deepspeed(int(init_args.get("stage", 2)), bool(init_args.get("offload_optimizer")), **init_args)
    if "fsdp" in lowered:
        flags = ("mixed_precision", "activation_checkpointing", "cpu_offload")
        return Strategy("fsdp2", **{k: bool(init_args.get(k, False)) for k in flags})
    if "ddp" in lowered:
        return Strategy("ddp", bucket_view=bool(init_args.get("gradient_as_bucket_view", False)))
    if "singledevice" in lowered:
        return Strategy("single")
    raise ValueError(f"trainer.strategy class {class_path}: the memory planner has no model of this strategy")


def trace_settings(strategy: Strategy, precision: str, target: str, checkpointing: bool | None) -> TraceSettings:
    """How the step runs under this strategy and Lightning precision (see TraceSettings). Raises ValueError
    for a precision the planner does not know."""
    kind, _, mode = precision.partition("-")
    kind = {"bf16": "bf16", "16": "16", "32": "32", "64": "64"}.get(kind)
    if kind is None or mode not in ("", "true", "mixed"):
        raise ValueError(f"trainer.precision {precision!r}: use 32-true, bf16-mixed, bf16-true, 16-mixed or 16-true")
    low = LOW.get(kind)
    cast = autocast = None
    if low is not None:
        if strategy.kind == "deepspeed" or (strategy.kind == "fsdp2" and strategy.mixed_precision) or mode == "true":
            cast = low
        else:
            autocast = low
    elif strategy.kind == "fsdp2" and strategy.mixed_precision:
        cast = torch.bfloat16
    elif kind == "64":
        cast = torch.float64
    if strategy.activation_checkpointing:
        checkpointing = True
    return TraceSettings(cast=cast, autocast=autocast, checkpointing=checkpointing, foreach=target == "cuda")


def _traced(net: Network, cast: torch.dtype | None) -> tuple[float, float]:
    """(trainable, frozen) bytes of a network as the trace holds it."""
    if cast is None:
        return float(net.trainable_bytes), float(net.frozen_bytes)
    size = torch.empty((), dtype=cast).element_size()
    return float(net.trainable * size), float(net.frozen * size)


def _ratio(target: float, traced: float) -> float:
    return target / traced if traced else 0.0


def profile(
    strategy: Strategy, gpus: int, nets: dict[str, Network], settings: TraceSettings, name: str | None = None
) -> Profile:
    """The per-GPU weighting of the traced categories under `strategy` on `gpus` GPUs (module doc)."""
    out = Profile(name or f"{strategy.label} x{gpus}")
    total_trainable = sum(n.trainable for n in nets.values())
    traced_trainable = sum(_traced(n, settings.cast)[0] for n in nets.values())
    compute = _ratio(traced_trainable, total_trainable) or 4.0  # bytes per trainable element as traced
    if strategy.kind == "ddp" and not strategy.bucket_view:
        out.constants["gradient buckets (DDP)"] = int(traced_trainable)
    if strategy.kind == "deepspeed":
        _deepspeed(out, strategy, gpus, nets, settings, compute)
    elif strategy.kind == "fsdp2":
        _fsdp2(out, strategy, gpus, nets, settings, compute)
    return out


def _deepspeed(out: Profile, s: Strategy, n: int, nets: dict[str, Network], settings: TraceSettings, b: float) -> None:
    z, stage = s.zero, s.stage
    keep = 0.0 if stage == 3 and s.offload_parameters else 1.0 / n if stage == 3 else 1.0
    for name, net in nets.items():
        trainable, _ = _traced(net, settings.cast)
        out.factors[f"param:{name}"] = keep
        out.factors[f"frozen:{name}"] = keep
        out.factors[f"grad:{name}"] = 1.0 / n if stage >= 2 else 1.0
        out.factors[f"state:{name}"] = 0.0 if s.offload_optimizer else _ratio(8.0 * net.trainable / n, 2 * trainable)
    out.factors["optim_temp"] = 0.0 if s.offload_optimizer else 4.0 / b / n
    total = sum(net.trainable for net in nets.values())
    if stage >= 1 and not s.offload_optimizer:
        out.constants["fp32 master weights (DeepSpeed)"] = int(4 * total / n)
        out.constants["fp32 gradient partitions (DeepSpeed)"] = int(4 * total / n)
    bucket = int(z["reduce_bucket_size"] * b * (2 if z.get("overlap_comm") and stage < 3 else 1))
    if stage < 3:
        out.constants["reduce / all-gather buckets (DeepSpeed)"] = max(bucket, int(z["allgather_bucket_size"] * b))
        return
    out.constants["reduce bucket (DeepSpeed)"] = bucket
    gathered = 0
    for net in nets.values():
        params = net.params
        live = params if params <= z["max_reuse_distance"] else net.largest_leaf_params + z["prefetch_bucket_size"]
        gathered = max(gathered, min(live, z["max_live_parameters"]))
    small = sum(k for net in nets.values() for k in net.param_numels if k < z["param_persistence_threshold"])
    out.constants["gathered parameters (ZeRO-3)"] = int(gathered * b)
    out.constants["persistent small parameters (ZeRO-3)"] = int(small * b * (n - 1) / n)


def _fsdp2(out: Profile, s: Strategy, n: int, nets: dict[str, Network], settings: TraceSettings, b: float) -> None:
    off = 0.0 if s.cpu_offload else 1.0
    for name, net in nets.items():
        trainable, frozen = _traced(net, settings.cast)
        out.factors[f"param:{name}"] = off * _ratio(4.0 * net.trainable / n, trainable)
        out.factors[f"frozen:{name}"] = off * _ratio(net.frozen_bytes / n, frozen)
        out.factors[f"grad:{name}"] = off * _ratio(4.0 * net.trainable / n, trainable)
        out.factors[f"state:{name}"] = off * _ratio(8.0 * net.trainable / n, 2 * trainable)
    out.factors["optim_temp"] = off * 4.0 / b / n
    block = max((net.block_params for net in nets.values()), default=0)
    rest = max((net.rest_params for net in nets.values()), default=0)
    block_grads = max((net.block_trainable for net in nets.values()), default=0)
    size = torch.empty((), dtype=settings.cast).element_size() if settings.cast is not None else 4
    out.constants["unsharded parameters, 2 blocks + root unit (FSDP2)"] = int((2 * block + rest) * size)
    out.constants["gradient reduce-scatter, 1 block (FSDP2)"] = int(4 * block_grads)
