"""MemFlow memory (NAM bank + SMA), backbone-agnostic, on hand-built keys and on the tiny backbone."""

from __future__ import annotations

import pytest
import torch

from memflow_train.memory import NAM, AttentionWindow, LayerKVCache, MemoryFree, MemoryPolicy, TextKeys, frame_relevance
from memflow_train.memory.sma import select_memory_frames
from memflow_train.models.attention import register_attention_backend
from tests.wan_helpers import tiny_inputs, tiny_model

B, H, T, D = 2, 2, 4, 8


def _frame(direction: torch.Tensor | None = None, scale: float = 4.0) -> torch.Tensor:
    """Keys of one frame (B, H, T, D): noise, plus a strong component along `direction` if given."""
    k = torch.randn(B, H, T, D) * 0.1
    return k if direction is None else k + scale * direction


def _prompt(direction: torch.Tensor, pad_tokens: int = 3) -> TextKeys:
    """Text keys along `direction` for 5 real tokens, then garbage padding that the mask hides."""
    real = direction.expand(B, H, 5, D) + torch.randn(B, H, 5, D) * 0.05
    padding = torch.randn(B, H, pad_tokens, D) * 50
    mask = torch.tensor([[True] * 5 + [False] * pad_tokens] * B)
    return TextKeys(torch.cat([real, padding], 2), mask)


def _stream(cache: LayerKVCache, frames: list[torch.Tensor], prompts: list[TextKeys], start: int = 0) -> None:
    """Drive one layer cache frame by frame (chunks of one frame), as the backbone does."""
    for i, (k, text) in enumerate(zip(frames, prompts, strict=True)):
        f = start + i
        cache.prepare(f, 1, text)
        cache.append(k, torch.randn_like(k), f, 1, text)


def _bank_frames(cache: LayerKVCache) -> list[set[int]]:
    return [set(row.tolist()) for row in cache.memory.held]


@pytest.mark.parametrize("softmax", [False, True])
def test_planted_frame_is_retrieved_and_switch_follows_new_prompt(softmax: bool) -> None:
    a, b = torch.zeros(D), torch.zeros(D)
    a[0], b[1] = 1.0, 1.0
    prompt_a, prompt_b = _prompt(a), _prompt(b)
    cfg = NAM(
        bank_size=2, record_interval=1, relevance_softmax=softmax, sink_size=0, local_attn_size=2, num_frame_per_block=1
    )
    cache = LayerKVCache(cfg)
    # Frame 1 matches prompt A, frame 4 matches prompt B, all others are distractors.
    history = [_frame(), _frame(a), _frame(), _frame(), _frame(b), _frame()]
    _stream(cache, history, [prompt_a] * len(history))
    cache.prepare(6, 1, prompt_a)  # frame 4 (source chunk [4,5)) joins; top-1 of {1, 3} under A is 1
    assert _bank_frames(cache) == [{1, 4}] * B
    # Prompt switch: the next retrieval scores the bank with the NEW prompt's keys.
    cache.append(_frame(), torch.randn(B, H, T, D), 6, 1, prompt_b)
    cache.prepare(7, 1, prompt_b)  # frame 5 joins; top-1 of {1, 4} under B must be 4
    assert _bank_frames(cache) == [{4, 5}] * B


def test_zeroed_text_keys_tie_every_frame_which_is_why_retrieval_takes_the_current_prompt() -> None:
    """MemFlow's public code retrieves with zeroed text keys at a switch: all scores tie."""
    keys = torch.randn(B, H, 5, T, D)
    scores = frame_relevance(keys, TextKeys(torch.zeros(B, H, 7, D)))
    assert torch.equal(scores, torch.zeros_like(scores))
    a = torch.zeros(D)
    a[2] = 1.0
    keys[:, :, 3] += 4 * a
    assert (frame_relevance(keys, _prompt(a)).argmax(1) == 3).all()


def test_relevance_masks_padding_tokens() -> None:
    keys = torch.randn(B, H, 4, T, D)
    text = _prompt(torch.ones(D))
    real_only = TextKeys(text.keys[:, :, :5])
    assert torch.allclose(frame_relevance(keys, text), frame_relevance(keys, real_only), atol=1e-6)
    assert not torch.allclose(frame_relevance(keys, TextKeys(text.keys)), frame_relevance(keys, real_only))
    with pytest.raises(ValueError, match="no real text tokens"):
        frame_relevance(keys, TextKeys(text.keys, torch.zeros(B, 8, dtype=torch.bool)))


def test_relevance_merge_prototype_weights_frames_by_text_relevance() -> None:
    a = torch.zeros(D)
    a[0] = 1.0
    text = _prompt(a)
    cfg = NAM(prototype="relevance_merge", record_interval=1, sink_size=0, local_attn_size=3)
    cache = LayerKVCache(cfg)
    k = torch.stack([_frame(), _frame(a), _frame()], 2).flatten(2, 3)  # (B, H, 3*T, D)
    v = torch.randn_like(k)
    cache.append(k, v, 0, 3, text)
    cand = cache.memory.pending[0]
    kf, vf = k.unflatten(2, (3, -1)), v.unflatten(2, (3, -1))
    w = frame_relevance(kf, text).softmax(-1)[:, None, :, None, None]
    assert torch.allclose(cand.k, (kf * w).sum(2), atol=1e-6)
    assert torch.allclose(cand.v, (vf * w).sum(2), atol=1e-6)
    assert (w[:, 0].squeeze(-1).squeeze(-1).argmax(-1) == 1).all()  # the frame matching the prompt weighs most
    first = LayerKVCache(NAM(record_interval=1, sink_size=0, local_attn_size=3))
    first.append(k, v, 0, 3, text)
    assert torch.equal(first.memory.pending[0].k, kf[:, :, 0])


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


def _filled_cache(cfg: MemoryPolicy, chunks: int) -> tuple[LayerKVCache, TextKeys]:
    text = _prompt(torch.randn(D))
    cache = LayerKVCache(cfg)
    n = cfg.num_frame_per_block
    for c in range(chunks):
        cache.prepare(c * n, n, text)
        k = torch.randn(B, H, n * T, D)
        cache.append(k, torch.randn_like(k), c * n, n, text)
    cache.prepare(chunks * n, n, text)
    return cache, text


def test_sma_with_large_k_equals_dense_attention_over_sink_bank_window() -> None:
    dense_cfg = NAM(bank_size=3, record_interval=1, sink_size=3, local_attn_size=6)
    torch.manual_seed(1)
    dense, _ = _filled_cache(dense_cfg, chunks=8)
    torch.manual_seed(1)
    sparse, _ = _filled_cache(NAM(**{**dense_cfg.__dict__, "sma": True, "sma_topk": 6}), chunks=8)
    assert len(dense.memory) == 3
    q, k, v = (torch.randn(B, H, 3 * T, D) for _ in range(3))
    sink, window = dense.visible_runs(24, 3)
    keys = torch.cat([sink[0].k, dense.memory.k.flatten(2, 3), *[r.k for r in window], k], 2)
    values = torch.cat([sink[0].v, dense.memory.v.flatten(2, 3), *[r.v for r in window], v], 2)
    expected = _dense(q, keys, values)
    for cache in (dense, sparse):
        got = torch.nn.functional.scaled_dot_product_attention(q, *cache.kv_for_attention(q, k, v, 24, 3))
        assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("include_sink", [True, False])
def test_sma_with_small_k_equals_dense_attention_over_selected_frames(include_sink: bool) -> None:
    cfg = NAM(
        bank_size=3,
        record_interval=1,
        sink_size=3,
        local_attn_size=6,
        sma=True,
        sma_topk=2,
        sma_include_sink=include_sink,
    )
    cache, _ = _filled_cache(cfg, chunks=8)
    q, k, v = (torch.randn(B, H, 3 * T, D) for _ in range(3))
    got = torch.nn.functional.scaled_dot_product_attention(q, *cache.kv_for_attention(q, k, v, 24, 3))

    sink, window = cache.visible_runs(24, 3)
    sink_k, sink_v = sink[0].k.unflatten(2, (3, T)), sink[0].v.unflatten(2, (3, T))
    bank_k, bank_v = cache.memory.k, cache.memory.v
    for b in range(B):
        for h in range(H):
            cand_k = [sink_k[b, h, i] for i in range(3)] * include_sink + [bank_k[b, h, i] for i in range(3)]
            cand_v = [sink_v[b, h, i] for i in range(3)] * include_sink + [bank_v[b, h, i] for i in range(3)]
            q_desc = q[b, h].mean(0)
            scores = [float(q_desc @ ck.mean(0)) for ck in cand_k]
            chosen = sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:2])
            always_k = [] if include_sink else [sink[0].k[b, h]]
            always_v = [] if include_sink else [sink[0].v[b, h]]
            keys = torch.cat(always_k + [cand_k[i] for i in chosen] + [r.k[b, h] for r in window] + [k[b, h]])
            values = torch.cat(always_v + [cand_v[i] for i in chosen] + [r.v[b, h] for r in window] + [v[b, h]])
            assert (got[b, h] - _dense(q[b, h], keys, values)).abs().max() <= 1e-5


def test_sma_kept_candidates_follow_the_bank_rewinds_and_reloads_without_a_second_copy() -> None:
    """SMA keeps sink + bank as one tensor between calls. Every call must still equal the selection over
    freshly concatenated candidates while the bank changes, after a rewind and after a state reload."""
    cfg = NAM(bank_size=2, record_interval=1, sink_size=3, local_attn_size=6, sma=True, sma_topk=2)
    text = _prompt(torch.randn(D))
    cache = LayerKVCache(cfg)

    def check(start: int) -> None:
        q, k, v = (torch.randn(B, H, 3 * T, D) for _ in range(3))
        got_k, got_v = cache.kv_for_attention(q, k, v, start, 3)
        sink, window = cache.visible_runs(start, 3)
        bank = [(cache.memory.k, cache.memory.v)] if len(cache.memory) else []
        cand = [(r.frames_view(r.k), r.frames_view(r.v)) for r in sink] + bank
        memory_k, memory_v = [], []
        if cand:  # none while the first chunk is written
            cand_k, cand_v = (torch.cat([c[i] for c in cand], 2).clone() for i in (0, 1))
            mk, mv, _ = select_memory_frames(q, cand_k, cand_v, 2)
            memory_k, memory_v = [mk], [mv]
        assert torch.equal(got_k, torch.cat([*memory_k, *[r.k for r in window], k], 2))
        assert torch.equal(got_v, torch.cat([*memory_v, *[r.v for r in window], v], 2))
        cache.append(k, v, start, 3, text)

    for c in range(10):
        cache.prepare(3 * c, 3, text)
        check(3 * c)
    assert len(cache.memory) == 2
    assert cache.sink.k.untyped_storage().data_ptr() == cache.memory.k.untyped_storage().data_ptr()
    cache.rewind(24)
    for c in (8, 9):
        cache.prepare(3 * c, 3, text)
        check(3 * c)
    restored = LayerKVCache(cfg)
    restored.load_state_dict(cache.state_dict())
    cache = restored
    for c in (10, 11):
        cache.prepare(3 * c, 3, text)
        check(3 * c)


def test_sma_selection_is_per_head_and_in_temporal_order() -> None:
    k = torch.randn(1, 2, 5, T, D)
    q = torch.zeros(1, 2, 3, D)
    q[0, 0, :, 0] = 1.0
    q[0, 1, :, 1] = 1.0
    k[0, 0, 4, :, 0] += 10  # head 0 prefers frame 4, then frame 1
    k[0, 0, 1, :, 0] += 5
    k[0, 1, 0, :, 1] += 10  # head 1 prefers frame 0, then 2
    k[0, 1, 2, :, 1] += 5
    _, _, index = select_memory_frames(q, k, torch.randn_like(k), topk=2)
    assert index.tolist() == [[[1, 4], [0, 2]]]


def test_memory_off_reproduces_plain_sink_window_streaming_exactly() -> None:
    model = tiny_model()
    x, t, text = tiny_inputs(frames=30)
    ctx = model.encode_text(text)
    outputs = {}
    for name, cfg in {
        "window": AttentionWindow(3, 9, 3),
        "off": MemoryFree(),
        "nam": NAM(),
        "nam_sma": NAM(sma=True),
    }.items():
        cache = model.new_kv_cache(cfg)
        with torch.no_grad():
            outputs[name] = [
                model.forward_chunk(x[:, :, s : s + 3], t[:, s : s + 3], ctx, cache, update_cache=True)
                for s in range(0, 30, 3)
            ]
    assert all(torch.equal(a, b) for a, b in zip(outputs["window"], outputs["off"], strict=True))
    # The first candidate (chunk 3) joins the bank once it left the window, at chunk 6: identical until then.
    for variant in ("nam", "nam_sma"):
        assert all(torch.equal(a, b) for a, b in zip(outputs[variant][:6], outputs["off"][:6], strict=True))
        assert not torch.allclose(outputs[variant][7], outputs["off"][7])


def _key_counter() -> list[int]:
    counts: list[int] = []

    def counting_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        counts.append(k.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    register_attention_backend("test-counting", counting_sdpa)
    return counts


@pytest.mark.parametrize("sma", [False, True])
def test_memory_is_bounded_after_100_chunks(sma: bool) -> None:
    model = tiny_model()
    counts = _key_counter()
    model.set_attention_backend("test-counting")
    cfg = NAM(sma=sma, sma_topk=2, record_interval=1)
    cache = model.new_kv_cache(cfg)
    x, _, text = tiny_inputs(frames=3)
    ctx = model.encode_text(text)
    tokens_per_frame = (x.shape[3] // 2) * (x.shape[4] // 2)
    sizes = []
    with torch.no_grad():
        for _ in range(100):
            noisy = torch.randn_like(x)
            model.forward_chunk(noisy, torch.full((1,), 500.0), ctx, cache)
            model.forward_chunk(x, torch.zeros(1), ctx, cache, update_cache=True)
            sizes.append(cache.nbytes())
            for layer in cache.layers:
                bank = layer.memory
                assert bank.k is None or bank.k.shape[2] <= cfg.bank_size
                assert len(bank.pending) <= cfg.local_attn_size // cfg.num_frame_per_block + 1
                if len(bank):  # a frame is never both in the bank and in view otherwise
                    assert (bank.held < layer.local.start).all() and (bank.held >= cfg.sink_size).all()
                    assert all(len(set(row.tolist())) == len(row) for row in bank.held)
    assert cache.next_frame == 300
    assert all(len(layer.memory) == cfg.bank_size for layer in cache.layers)
    assert sizes[-1] == sizes[50]  # steady state: the cache does not grow
    limit = cfg.max_attended_frames * tokens_per_frame
    assert max(counts) <= limit
    assert max(counts) == limit  # the bound is reached, so the check above is not vacuous


def test_memory_state_roundtrip_continues_identically() -> None:
    model = tiny_model()
    cfg = NAM(sma=True, sma_topk=2, record_interval=1)
    x, t, text = tiny_inputs(frames=36)
    ctx = model.encode_text(text)
    cache = model.new_kv_cache(cfg)
    with torch.no_grad():
        for s in range(0, 30, 3):
            model.forward_chunk(x[:, :, s : s + 3], t[:, s : s + 3], ctx, cache, update_cache=True)
        restored = model.new_kv_cache(cfg)
        restored.load_state_dict(cache.state_dict())
        for s in range(30, 36, 3):
            a = model.forward_chunk(x[:, :, s : s + 3], t[:, s : s + 3], ctx, cache, update_cache=True)
            b = model.forward_chunk(x[:, :, s : s + 3], t[:, s : s + 3], ctx, restored, update_cache=True)
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="disagree on whether a memory is kept"):
        model.new_kv_cache(MemoryFree()).load_state_dict(cache.state_dict())


def test_memory_runs_in_bf16() -> None:
    from memflow_train.models.causal_wan import cast_keeping_fp32

    model = cast_keeping_fp32(tiny_model(), torch.bfloat16)
    cache = model.new_kv_cache(NAM(sma=True, sma_topk=2, record_interval=1, prototype="relevance_merge"))
    x, _, text = tiny_inputs(frames=3)
    ctx = model.encode_text(text.bfloat16())
    with torch.no_grad():
        for _ in range(8):
            out = model.forward_chunk(x.bfloat16(), torch.zeros(1), ctx, cache, update_cache=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert len(cache[0].memory) == 3 and cache[0].memory.k.dtype == torch.bfloat16


def test_rewind_for_recache_replays_the_window_under_sink_and_earlier_replayed_frames() -> None:
    cfg = NAM(record_interval=1)
    cache, text = _filled_cache(cfg, chunks=8)  # frames 0..23 written; window holds 18..23; bank < 18
    assert cache.local.start == 18 and cache.next_frame == 24 and len(cache.memory) == 3
    cache.rewind(18)  # re-encode the whole window (e.g. under a new prompt)
    assert cache.next_frame == 18 and cache.local is None
    assert all(c.source_stop <= 18 for c in cache.memory.pending)
    sink, window = cache.visible_runs(18, 3)  # the first replayed chunk sees the sink (and the bank) only
    assert [(r.start, r.num_frames) for r in sink] == [(0, 3)] and window == []
    k = torch.randn(B, H, 3 * T, D)
    cache.append(k, k, 18, 3, text)
    sink, window = cache.visible_runs(21, 3)
    assert [(r.start, r.num_frames) for r in window] == [(18, 3)]
    with pytest.raises(ValueError, match="memory bank already holds later frames"):
        cache.rewind(9)
    with pytest.raises(ValueError, match="only 21 frames"):
        cache.rewind(30)


def test_bad_memory_configs_name_the_key() -> None:
    with pytest.raises(ValueError, match="bank_size"):
        NAM(bank_size=-1)
    with pytest.raises(ValueError, match="record_interval"):
        NAM(record_interval=0)
    with pytest.raises(ValueError, match="prototype"):
        NAM(prototype="mean")
    with pytest.raises(ValueError, match="sma_topk"):
        NAM(sma=True, sma_topk=0)
    with pytest.raises(ValueError, match="unbounded"):
        NAM(local_attn_size=-1)
    with pytest.raises(ValueError, match="local_attn_size"):
        NAM(local_attn_size=2, num_frame_per_block=3)
    MemoryFree(local_attn_size=-1, sink_size=0)  # memory-free, unbounded: fine
