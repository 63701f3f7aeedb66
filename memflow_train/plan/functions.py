"""The torch-function side of a trace (finite checks, fused attention, autocast) and meta parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from memflow_train.plan.autocast import AutocastEmulation
from memflow_train.plan.trace import META, Tracer

aten = torch.ops.aten


class MetaFunctions(TorchFunctionMode):
    """The torch-function side of the trace: finite checks, attention, and (for bf16-mixed on GPU) autocast.

    Attention on meta would take PyTorch's math path (materialising the attention matrix); the planner runs
    the fused CPU flash kernel's meta function instead, which holds what a fused kernel holds on any device
    (output and log-sum-exp, not the matrix)."""

    def __init__(self, autocast: AutocastEmulation | None = None) -> None:
        super().__init__()
        self.autocast = autocast

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        kwargs = kwargs or {}
        if func is torch.isfinite and args[0].is_meta:
            return torch.ones((), dtype=torch.bool).expand(args[0].shape)
        if self.autocast is not None and self.autocast.enabled:
            args, kwargs = self.autocast.cast(func, args, kwargs)
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    if enable_gqa:
        raise NotImplementedError("the memory planner does not trace grouped-query attention")
    out = aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out[0]


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Inside, every nn.Parameter a module registers is moved to the meta device (as built: its shape, dtype
    and requires_grad); buffers stay real (they are small and some are read, e.g. position tables)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.detach().to(META), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


@contextmanager
def tracing(tracer: Tracer, functions: MetaFunctions) -> Iterator[None]:
    """Both modes, and meta parameters for modules built inside (a text encoder loaded on first use)."""
    with meta_parameters(), functions, tracer:
        yield
