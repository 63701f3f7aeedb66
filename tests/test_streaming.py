"""Streaming chunk by chunk with the KV cache equals the block-causal full-sequence forward."""

from __future__ import annotations

import pytest
import torch

from memflow_train.memory import AttentionWindow
from tests.wan_helpers import tiny_inputs, tiny_model

WINDOWS = [
    AttentionWindow(num_frame_per_block=3, local_attn_size=9, sink_size=3),  # MemFlow/LongLive layout
    AttentionWindow(num_frame_per_block=3, local_attn_size=6, sink_size=0),  # rolling window, no sink
    AttentionWindow(num_frame_per_block=2, local_attn_size=4, sink_size=3),  # sink not a chunk multiple
    AttentionWindow(num_frame_per_block=3, local_attn_size=-1, sink_size=0),  # unbounded (Self-Forcing)
    AttentionWindow(num_frame_per_block=3, local_attn_size=3, sink_size=3),  # chunk sees only itself + sink
]


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@torch.no_grad()
def test_streaming_equals_block_causal_full_sequence(window: AttentionWindow) -> None:
    model = tiny_model()
    n = window.num_frame_per_block
    frames = 8 * n  # RoPE positions run far beyond every window
    x, t, text = tiny_inputs(batch=2, frames=frames)
    context = model.encode_text(text)
    full = model(x, t, context, window=window)
    cache = model.new_kv_cache(window)
    for start in range(0, frames, n):
        out = model.forward_chunk(
            x[:, :, start : start + n], t[:, start : start + n], context, cache, update_cache=True
        )
        assert (out - full[:, :, start : start + n]).abs().max() <= 1e-5, f"chunk at frame {start}"
    assert cache.next_frame == frames


@torch.no_grad()
def test_block_causal_differs_from_bidirectional_and_only_future_is_hidden() -> None:
    model = tiny_model()
    window = AttentionWindow(3, 6, 3)
    x, t, text = tiny_inputs(frames=12)
    causal = model(x, t, text, window=window)
    assert (causal - model(x, t, text)).abs().max() > 1e-3
    # Changing the last chunk leaves every earlier chunk's output unchanged.
    x2 = x.clone()
    x2[:, :, 9:] = torch.randn_like(x2[:, :, 9:])
    changed = model(x2, t, text, window=window)
    assert torch.equal(causal[:, :, :9], changed[:, :, :9])
    assert not torch.equal(causal[:, :, 9:], changed[:, :, 9:])


@torch.no_grad()
def test_denoising_steps_leave_cache_unchanged_and_clean_rerun_writes_it() -> None:
    """The generator's loop: several noisy passes read the cache, one pass at timestep 0 writes it."""
    model = tiny_model()
    window = AttentionWindow(3, 9, 3)
    x, _, text = tiny_inputs(frames=6)
    context = model.encode_text(text)
    cache = model.new_kv_cache(window)
    model.forward_chunk(x[:, :, :3], torch.zeros(1), context, cache, update_cache=True)
    before = [t.clone() for t in cache[0].tensors()]
    noisy = torch.randn_like(x[:, :, 3:])
    a = model.forward_chunk(noisy, torch.full((1,), 750.0), context, cache)
    b = model.forward_chunk(noisy, torch.full((1,), 750.0), context, cache)
    assert torch.equal(a, b) and cache.next_frame == 3
    assert all(torch.equal(p, q) for p, q in zip(before, cache[0].tensors(), strict=True))
    model.forward_chunk(x[:, :, 3:], torch.zeros(1), context, cache, update_cache=True)
    assert cache.next_frame == 6


@torch.no_grad()
def test_cache_is_bounded_over_a_long_stream() -> None:
    model = tiny_model()
    window = AttentionWindow(3, 9, 3)
    x, _, text = tiny_inputs(frames=3)
    context = model.encode_text(text)
    cache = model.new_kv_cache(window)
    sizes = []
    for _ in range(40):
        model.forward_chunk(x, torch.zeros(1), context, cache, update_cache=True)
        sizes.append(cache.nbytes())
    tokens_per_frame = x.shape[3] // 2 * x.shape[4] // 2
    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    # sink 3 + window 6 frames (9 - current chunk), K and V, every layer, fp32.
    expected = len(model.blocks) * 2 * (3 + 6) * tokens_per_frame * heads * head_dim * 4
    assert sizes[-1] == sizes[10] == expected
    assert cache.next_frame == 120
    assert cache[0].sink.start == 0 and cache[0].local.start == 114


@torch.no_grad()
def test_cache_state_roundtrip_continues_identically() -> None:
    model = tiny_model()
    window = AttentionWindow(3, 6, 3)
    x, t, text = tiny_inputs(frames=15)
    context = model.encode_text(text)
    cache = model.new_kv_cache(window)
    for s in range(0, 12, 3):
        model.forward_chunk(x[:, :, s : s + 3], t[:, s : s + 3], context, cache, update_cache=True)
    restored = model.new_kv_cache(window)
    restored.load_state_dict(cache.state_dict())
    a = model.forward_chunk(x[:, :, 12:], t[:, 12:], context, cache)
    b = model.forward_chunk(x[:, :, 12:], t[:, 12:], context, restored)
    assert torch.equal(a, b)


def test_bad_streaming_use_raises() -> None:
    model = tiny_model()
    x, t, text = tiny_inputs(frames=3)
    with pytest.raises(ValueError, match="local_attn_size"):
        AttentionWindow(num_frame_per_block=3, local_attn_size=2)
    with pytest.raises(ValueError, match="num_frame_per_block"):
        AttentionWindow(num_frame_per_block=0)
    with pytest.raises(ValueError, match="sink_size"):
        AttentionWindow(sink_size=-1)
    cache = model.new_kv_cache(AttentionWindow(3, 9, 3))
    with torch.no_grad():
        with pytest.raises(ValueError, match="only 0 frames were cached"):
            model.forward_chunk(x, t, text, cache, frame_offset=3)
        model.forward_chunk(x, t, text, cache, update_cache=True)
        with pytest.raises(ValueError, match="expects frame 3 next"):
            model.forward_chunk(x, t, text, cache, frame_offset=0, update_cache=True)
    x7, t7, _ = tiny_inputs(frames=7)
    with pytest.raises(ValueError, match="whole number of chunks"):
        model(x7, t7, text, window=AttentionWindow(3, 9, 3))
