"""Attention backends: compiled FlexAttention (and FlashAttention on GPU) against SDPA, and their benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memflow_train.benchmarks import attention_backends
from memflow_train.memory import NAM
from memflow_train.models import fused_attention
from memflow_train.models.attention import get_attention_backend, sdpa_attention
from tests.wan_helpers import tiny_model

COMPILE_WARNINGS = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")


@pytest.mark.slow
@COMPILE_WARNINGS
def test_flex_streaming_equals_sdpa() -> None:
    """A streamed chunk sequence through the flex backend gives SDPA's outputs (keys vary as the cache fills)."""
    model = tiny_model()
    text = model.encode_text(torch.randn(1, 5, 16))
    x = torch.randn(1, 4, 12, 4, 6)
    outs = {}
    for name in ("sdpa", "flex"):
        model.set_attention_backend(name)
        cache = model.new_kv_cache(NAM(bank_size=2, record_interval=1, local_attn_size=6))
        with torch.no_grad():
            outs[name] = [model.forward_chunk(x[:, :, s : s + 3], torch.tensor([500.0]), text, cache, update_cache=True)
                          for s in range(0, 12, 3)]  # fmt: skip
    for a, b in zip(outs["sdpa"], outs["flex"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_flex_refuses_cpu_backward() -> None:
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        fused_attention.flex_attention(q, q, q)


@pytest.mark.gpu
@pytest.mark.skipif(not fused_attention.FLASH_AVAILABLE, reason="flash-attn not installed")
def test_flash_equals_sdpa_on_gpu() -> None:
    q, k, v = (torch.randn(1, 12, n, 128, device="cuda", dtype=torch.bfloat16) for n in (96, 384, 384))
    torch.testing.assert_close(get_attention_backend("flash")(q, k, v), sdpa_attention(q, k, v), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
@COMPILE_WARNINGS
def test_attention_benchmark_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "attn.json"
    rows = attention_backends.main(
        ["--height", "32", "--width", "32", "--key-frames", "6", "9", "--repeats", "2", "--json", str(out)]
    )
    assert [(r["backend"], r["key_frames"]) for r in rows] == [("sdpa", 6), ("sdpa", 9), ("flex", 6), ("flex", 9)]
    assert all(r["max_abs_diff_vs_sdpa"] < 1e-5 and r["seconds"] > 0 for r in rows)
    assert rows[0]["key_tokens"] == 6 * 4 and rows[0]["query_tokens"] == 3 * 4  # 32x32 px: 4x4 latent, 2x2 patches
    assert json.loads(out.read_text())["rows"][3]["backend"] == "flex"
    assert "| flex | 9 |" in capsys.readouterr().out
