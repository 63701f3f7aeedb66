"""CUDA autocast (bf16-mixed) for a trace on meta tensors, where torch's own autocast does not apply.

torch.autocast acts on CUDA (or CPU) tensors only, so on meta weights the planner applies the same cast
policy itself at the torch-function level (above autograd, so what autograd saves for backward is the
cast tensor, as with the real autocast). The op lists are CUDA autocast's (aten/src/ATen/autocast_mode.h,
PyTorch 2.x): matmul-like ops and attention run in the low-precision dtype, reductions, norms, losses and
exponentials in float32. Lightning's bf16-mixed / 16-mixed precision runs torch.autocast with
cache_enabled=False, so a weight is cast again at every use (each forward that keeps a graph holds its own
low-precision copy until backward), as here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

T = torch.Tensor
LOWER = {
    F.linear, torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.mm, T.mm, torch.bmm, T.bmm,
    torch.baddbmm, T.baddbmm, torch.addmm, T.addmm, torch.addbmm, torch.addmv, torch.mv, T.mv, torch.einsum,
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.prelu,
    F.scaled_dot_product_attention, torch.linalg.vecdot, torch.chain_matmul, torch.linalg.multi_dot,
}  # fmt: skip
FP32 = {
    torch.acos, torch.asin, torch.cosh, torch.erfinv, torch.exp, T.exp, torch.expm1, torch.log, T.log,
    torch.log10, torch.log2, torch.log1p, torch.reciprocal, torch.rsqrt, T.rsqrt, torch.sinh, torch.tan,
    torch.pow, T.pow, T.__pow__, F.softplus, F.layer_norm, F.group_norm, F.cosine_similarity, F.mse_loss,
    F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.kl_div, F.nll_loss, F.binary_cross_entropy_with_logits,
    torch.cdist, torch.logsumexp, T.logsumexp,
}  # fmt: skip
# Run in float32 through their dtype argument (the input is not copied; the result is float32).
FP32_DTYPE = {
    torch.sum, T.sum, torch.prod, T.prod, torch.softmax, T.softmax, F.softmax, torch.log_softmax,
    T.log_softmax, F.log_softmax, torch.cumsum, T.cumsum, torch.cumprod, T.cumprod, torch.linalg.vector_norm,
}  # fmt: skip
PROMOTE = {torch.addcdiv, T.addcdiv, torch.addcmul, T.addcmul, torch.atan2, torch.cross, torch.dot, torch.tensordot}


def _eligible(x: Any) -> bool:
    """A floating tensor autocast would cast (in a trace every tensor stands for one on the GPU)."""
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


def _map(args: tuple, kwargs: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple, dict]:
    def one(x: Any) -> Any:
        if isinstance(x, list | tuple):
            return type(x)(one(y) for y in x)
        return fn(x) if _eligible(x) else x

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


class AutocastEmulation:
    """The cast policy for dtype (bfloat16 or float16); `enabled` while Lightning's autocast region would be."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self.enabled = False

    def _low(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def cast(self, func: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments func runs with under autocast (unchanged for ops outside the policy or given a dtype)."""
        if "dtype" in kwargs and kwargs["dtype"] is not None:
            return args, kwargs
        if func in LOWER:
            return _map(args, kwargs, self._low)
        if func in FP32:
            return _map(args, kwargs, lambda x: x.float())
        if func in FP32_DTYPE:
            low = any(_eligible(a) and a.dtype != torch.float32 for a in args)
            return (args, {**kwargs, "dtype": torch.float32}) if low else (args, kwargs)
        if func in PROMOTE:
            widest = torch.float32 if any(_eligible(a) and a.dtype == torch.float32 for a in args) else None
            return _map(args, kwargs, lambda x: x.to(widest)) if widest else (args, kwargs)
        return args, kwargs
