"""Official-parity modes on hand-worked cases: the frames each forward attends, written out from the rule.

Geometry unless stated: sink 3, window 9 (the chunk included), chunks of 3 frames, so a chunk at s
attends the sink 0-2 and the window [s - 6, s). Frames are written (frame, prompt version).
"""

from __future__ import annotations

import pytest
import torch

from memflow_train.memory import NAM, MemoryFree, MemoryPolicy
from memflow_train.memory.recache import RecachePlan, plan_recache
from memflow_train.rollout import PromptSchedule, StreamingGenerator
from memflow_train.sampling import FlowMatchSchedule
from tests.recache_reference import FrameTagBackbone, nam_score
from tests.wan_helpers import tiny_model


def _forwards(memory: MemoryPolicy, switches: list[int], total: int) -> list[tuple[int, int, list]]:
    """(first frame, frames, head 0's attended (frame, version)) of every forward; one read + one write a chunk."""
    probe = FrameTagBackbone()
    sampler = StreamingGenerator(probe, FlowMatchSchedule(), [1000], memory)
    prompts = PromptSchedule([(0, probe.prompt(0))] + [(s, probe.prompt(i + 1)) for i, s in enumerate(switches)])
    sampler.rollout(sampler.new_stream(), torch.zeros(1, 1, total, 1, 1), prompts)
    return [(a, n, list(att[0])) for a, n, att in probe.forwards]


def _chunks(forwards: list) -> dict[int, list]:
    """What each generated chunk attends (its write forward, the last one at that start and size)."""
    return {a: att for a, n, att in forwards if n == 3}


def _v(frames, version: int) -> list[tuple[int, int]]:
    return [(f, version) for f in frames]


def _bank(chunk_start: int, attended: list) -> list[int]:
    """Attended frames outside the sink and the window: the bank's."""
    return [f for f, _ in attended if 3 <= f < chunk_start - 6]


def test_record_cadence_every_chunk_rewrites_the_open_slot_then_retrieves_every_chunk() -> None:
    """bank 3, record_interval 3: groups of 9 frames. A candidate (a chunk's first frame) joins once its
    chunk left the window, i.e. at the chunk 9 frames later."""
    interval = _chunks(_forwards(NAM(bank_size=3, record_interval=3), [], 21))
    # ours: candidates on chunks 3 and 6 only (frames 9, 18); frame 9 joins at chunk 18: a bank in 1 of 7 chunks
    assert {s: _bank(s, a) for s, a in interval.items()} == {0: [], 3: [], 6: [], 9: [], 12: [], 15: [], 18: [9]}
    every = _chunks(_forwards(NAM(bank_size=3, record_interval=3, record_cadence="every_chunk"), [], 45))
    top2 = sorted(sorted([6, 15, 18], key=lambda f: -nam_score(f, 0))[:2])
    assert top2 == [15, 18]  # the planted relevance to prompt 0 the retrievals below follow
    expected = {
        0: [], 3: [], 6: [], 9: [],
        12: [3],          # frame 3 (group 0) takes slot 0
        15: [6],          # frame 6, same group: the open slot is rewritten
        18: [6, 9],       # frame 9 opens group 1: slot 0 sealed, slot 1 open
        21: [6, 12],      # rewritten
        24: [6, 15],      # rewritten
        27: [6, 15, 18],  # group 2: the bank is full
        30: [15, 18, 21],  # full: every chunk retrieves the top 2 by relevance, then takes the candidate
        33: [15, 18, 24],
        36: [15, 18, 27],
        39: [15, 18, 30],
        42: sorted(sorted([15, 18, 30], key=lambda f: -nam_score(f, 0))[:2] + [33]),
    }  # fmt: skip
    assert {s: _bank(s, a) for s, a in every.items()} == expected


def test_recache_joint_reencodes_sink_plus_window_frames_in_one_forward() -> None:
    """Switch at 18: the official span is the last sink + window = 12 frames [6, 18) in ONE forward that
    attends the sink (kept) and itself; the cache keeps what the window holds, [12, 18)."""
    memory = MemoryFree(recache="joint")
    forwards = _forwards(memory, [18], 27)
    replay = [f for f in forwards if f[1] != 3]
    assert replay == [(6, 12, _v(range(3), 0))]
    chunks = _chunks(forwards)
    assert chunks[18] == _v(range(3), 0) + _v(range(12, 18), 1)
    assert chunks[21] == _v(range(3), 0) + _v(range(15, 21), 1)
    # chunkwise (ours): the held frames 12-17 replayed chunk by chunk, block-causally
    chunkwise = _forwards(MemoryFree(), [18], 27)
    assert chunkwise[12:14] == [(12, 3, _v(range(3), 0)), (15, 3, _v(range(3), 0) + _v(range(12, 15), 1))]
    assert _chunks(chunkwise)[18] == chunks[18]
    # early switch at 9: the span stops at the kept sink, [3, 9)
    early = [f for f in _forwards(memory, [9], 15) if f[1] != 3]
    assert early == [(3, 6, _v(range(3), 0))]


@pytest.mark.parametrize("recache", ["chunkwise", "joint"])
def test_recache_sink_reencode_early_reencodes_the_sink_only_within_sink_plus_window(recache: str) -> None:
    """MemFlow's global_sink true: a switch at 9 (<= 3 + 9) re-encodes from frame 0; at 15 the sink stays."""
    memory = MemoryFree(recache=recache, recache_sink="reencode_early")
    forwards = _forwards(memory, [9], 15)
    replays = forwards[6:-4]  # after chunks 0, 3, 6; before chunks 9 and 12
    if recache == "chunkwise":
        assert replays == [(0, 3, []), (3, 3, _v(range(3), 1)), (6, 3, _v(range(6), 1))]
    else:
        assert replays == [(0, 9, [])]
    assert _chunks(forwards)[9] == _v(range(9), 1)
    late = _chunks(_forwards(memory, [15], 21))
    assert late[15] == _v(range(3), 0) + _v(range(9, 15), 1)


@pytest.mark.parametrize("recache", ["chunkwise", "joint"])
def test_recache_sink_replace_makes_the_first_reencoded_frames_the_sink(recache: str) -> None:
    """LongLive's global_sink false: the old sink is dropped; the first 3 re-encoded frames are the sink
    for the rest of the video (joint: span [6, 18) -> sink 6-8; chunkwise: span [12, 18) -> sink 12-14)."""
    memory = MemoryFree(recache=recache, recache_sink="replace")
    forwards = _forwards(memory, [18], 30)
    sink = range(6, 9) if recache == "joint" else range(12, 15)
    chunks = _chunks(forwards)
    in_window = recache == "chunkwise"  # frames 12-14 are in chunk 18's window: attended once, from the window
    assert chunks[18] == (_v(range(12, 18), 1) if in_window else _v(sink, 1) + _v(range(12, 18), 1))
    assert chunks[24] == _v(sink, 1) + _v(range(18, 24), 1)
    assert chunks[27] == _v(sink, 1) + _v(range(21, 27), 1)
    if recache == "joint":
        assert [f for f in forwards if f[1] != 3] == [(6, 12, [])]  # the old sink is not attended
    else:
        assert forwards[12:14] == [(12, 3, []), (15, 3, _v(range(12, 15), 1))]


def test_recache_plans_name_their_frames() -> None:
    off = MemoryFree()
    assert plan_recache(off, 18) == RecachePlan(12, ((12, 15), (15, 18)))
    assert plan_recache(off, 3) == RecachePlan(3, ())  # only sink frames: nothing to re-encode
    one = MemoryFree(sink_size=1, local_attn_size=9)
    assert plan_recache(one, 6) == RecachePlan(1, ((1, 3), (3, 6)))  # a chunk's tail, then whole chunks
    assert plan_recache(MemoryFree(recache="joint"), 30) == RecachePlan(24, ((18, 30),))
    with pytest.raises(ValueError, match="multiple of 3"):
        plan_recache(off, 10)
    with pytest.raises(ValueError, match="memory-free"):
        NAM(recache_sink="replace")
    with pytest.raises(ValueError, match="recache must be one of"):
        NAM(recache="blockwise")


def test_context_noise_schedule_table_noises_the_cache_write_at_the_table_sigma() -> None:
    """Self-Forcing's cache write adds noise at 'timestep 0', which its table rounds to sigma 0.00498."""
    schedule = FlowMatchSchedule(shift=5.0)
    assert schedule.table_sigma(0.0) == pytest.approx(0.0049800796, abs=1e-9)
    model = tiny_model()
    inputs: dict[str, list] = {"none": [], "schedule_table": []}
    for mode, seen in inputs.items():
        sampler = StreamingGenerator(model, schedule, [1000], MemoryFree(context_noise=mode))
        original = model.forward_chunk

        def spy(x, t, text, cache, _seen=seen, _original=original, **kw):
            if kw.get("update_cache"):
                _seen.append((x.clone(), t.clone()))
            return _original(x, t, text, cache, **kw)

        model.forward_chunk = spy
        clean = torch.randn(1, 4, 3, 2, 2)
        with torch.no_grad():
            sampler.write_chunk(sampler.new_stream(), clean, model.encode_text(torch.randn(1, 5, 16)),
                                torch.Generator().manual_seed(7))  # fmt: skip
        del model.forward_chunk
        x, t = seen[0]
        assert torch.equal(t, torch.zeros(1))  # the model is told timestep 0 either way
        if mode == "none":
            assert torch.equal(x, clean)
        else:
            noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))
            sigma = schedule.table_sigma(0.0)
            assert torch.allclose(x, (1 - sigma) * clean + sigma * noise, atol=1e-6)


@pytest.mark.parametrize(
    "memory",
    [
        MemoryFree(recache="joint", recache_sink="replace"),
        NAM(bank_size=2, record_interval=1, record_cadence="every_chunk", recache_sink="reencode_early"),
    ],
)
def test_a_stream_saved_after_a_parity_recache_continues_identically(memory: MemoryPolicy) -> None:
    probe = FrameTagBackbone()
    sampler = StreamingGenerator(probe, FlowMatchSchedule(), [1000], memory)
    prompts = PromptSchedule([(0, probe.prompt(0)), (9, probe.prompt(1)), (27, probe.prompt(2))])
    stream = sampler.new_stream()
    sampler.rollout(stream, torch.zeros(1, 1, 21, 1, 1), prompts)  # the switch at 9 happened
    restored = sampler.new_stream()
    restored.load_state_dict(stream.state_dict())
    assert restored.cache[0].sink_start == stream.cache[0].sink_start
    runs = []
    for s in (stream, restored):
        probe.forwards = []
        sampler.rollout(s, torch.zeros(1, 1, 15, 1, 1), prompts)  # crosses the switch at 27
        runs.append(probe.forwards)
    assert runs[0] == runs[1] and len(runs[0]) > 10
