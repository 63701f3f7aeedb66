"""What every chunk attends after writes, switches and replays equals the documented rule (tests/recache_reference)."""

from __future__ import annotations

import itertools

import pytest
import torch

from memflow_train.memory import NAM, MemoryFree, MemoryPolicy
from memflow_train.models.attention import register_attention_backend
from memflow_train.rollout import PromptSchedule, StreamingGenerator
from memflow_train.sampling import FlowMatchSchedule
from tests.recache_reference import FrameTagBackbone, reference_rollout
from tests.wan_helpers import tiny_model

STEPS = [1000]  # one denoising forward and one cache write per chunk


def _memories(sink: int, window: int, chunk: int) -> list[MemoryPolicy]:
    geometry = {"sink_size": sink, "local_attn_size": window, "num_frame_per_block": chunk}
    configs = [MemoryFree(**geometry)]
    for bank, sma, interval in itertools.product((2, 3), (False, True), (1, 3)):
        configs.append(NAM(bank_size=bank, sma=sma, sma_topk=2, record_interval=interval, **geometry))
    return configs


def _run(memory: MemoryPolicy, switches: list[int], total: int) -> list:
    probe = FrameTagBackbone()
    sampler = StreamingGenerator(probe, FlowMatchSchedule(), STEPS, memory)
    prompts = PromptSchedule([(0, probe.prompt(0))] + [(s, probe.prompt(i + 1)) for i, s in enumerate(switches)])
    sampler.rollout(sampler.new_stream(), torch.zeros(1, 1, total, 1, 1), prompts)
    return probe.forwards


def _total(switches: list[int], memory: MemoryPolicy) -> int:
    n = memory.num_frame_per_block
    return (-(-max(switches) // n) + memory.local_attn_size // n + 2) * n


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("window", [3, 6, 9, 12])
@pytest.mark.parametrize("sink", [0, 1, 3])
def test_every_forward_attends_what_the_rule_says_for_every_switch_frame(sink: int, window: int, chunk: int) -> None:
    for memory in _memories(sink, window, chunk):
        cases = [[s] for s in range(1, 3 * window + 1)]
        cases += [[s, s + d] for s in range(1, 3 * window + 1, 4) for d in (1, chunk + 1, window)]
        for switches in cases:
            total = _total(switches, memory)
            got = _run(memory, switches, total)
            expected = reference_rollout(memory, switches, total, len(STEPS))
            assert got == expected, (memory, switches, _first_difference(got, expected))


def _first_difference(got: list, expected: list) -> tuple:
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return i, a, b
    return len(got), len(expected)


def test_early_switch_replay_sees_the_sink_as_normal_generation_did() -> None:
    """The reported case: sink 3, window 9, chunk 3, switch at frame 9."""
    got = _run(MemoryFree(), [9], 15)
    by_start = [(start, list(attended[0])) for start, _, attended in got]
    # normal generation: chunk 3-5 sees 0-2, chunk 6-8 sees 0-5 (all under prompt 0)
    assert by_start[2] == (3, [(0, 0), (1, 0), (2, 0)])
    assert by_start[4] == (6, [(f, 0) for f in range(6)])
    # the replay at the switch (before chunk 9) re-encodes 3-5 and 6-8 under prompt 1, seeing the sink
    assert by_start[6] == (3, [(0, 0), (1, 0), (2, 0)])
    assert by_start[7] == (6, [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1)])
    # chunk 9 sees the sink and the re-encoded window
    assert by_start[8] == (9, [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1)])


def _real_forwards(model, sampler: StreamingGenerator, texts: list, switch: int, total: int) -> list:
    """Cached frames attended by the second block of every forward, read back from their keys."""
    known: dict[tuple, tuple[int, int]] = {}
    forwards: list = []
    calls: list[int] = []
    stream = sampler.new_stream()
    layer = stream.cache[1]
    version_of = {t.keys[1].data_ptr(): i for i, t in enumerate(texts)}
    original_append = layer.append

    def append(k, v, chunk_start, num_frames, text=None, write_from=None):
        for i, f in enumerate(range(chunk_start, chunk_start + num_frames)):
            known[tuple(k[0, 0, i].tolist())] = (f, version_of[text.keys.data_ptr()])
        original_append(k, v, chunk_start, num_frames, text, write_from=write_from)

    def attend(q, k, v):
        calls.append(1)
        if len(calls) % 2 == 0:  # the second block
            cached = k[0, 0, : k.shape[2] - q.shape[2]]
            frames = tuple(sorted(known[tuple(row.tolist())] for row in cached))
            forwards.append((frames,) * 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    layer.append = append
    register_attention_backend("test-frame-tags", attend)
    model.set_attention_backend("test-frame-tags")
    with torch.no_grad():
        sampler.rollout(stream, torch.randn(1, 4, total, 2, 2), PromptSchedule([(0, texts[0]), (switch, texts[1])]))
    return forwards


@pytest.mark.parametrize(
    "memory",
    [
        MemoryFree(),
        NAM(bank_size=40, record_interval=1),  # never full: what it holds does not depend on scores
        MemoryFree(sink_size=1, local_attn_size=6),
        NAM(bank_size=40, record_interval=1, sink_size=3, local_attn_size=6, num_frame_per_block=1),
    ],
)
def test_the_real_backbone_attends_what_the_rule_says(memory: MemoryPolicy) -> None:
    """The same property through the real tiny Wan backbone: frames are identified by their keys in the
    second block (which depend on the prompt through the first block's cross-attention)."""
    torch.manual_seed(0)
    model = tiny_model()
    texts = [model.encode_text(torch.randn(1, 5, 16)) for _ in range(2)]
    sampler = StreamingGenerator(model, FlowMatchSchedule(), STEPS, memory)
    for switch in range(1, 2 * memory.local_attn_size + 1, 2):
        total = _total([switch], memory)
        got = _real_forwards(model, sampler, texts, switch, total)
        expected = [attended for _, _, attended in reference_rollout(memory, [switch], total, len(STEPS))]
        assert got == expected, (switch, _first_difference(got, expected))
