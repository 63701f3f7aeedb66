"""Evaluation narrative sets and traced generation (memflow_train.evaluation) on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memflow_train.evaluation import digest, from_records, generate_traced, read_jsonl, shorten, video_frame_segments
from memflow_train.generation.narrative import Narrative
from memflow_train.generation.pipeline import StreamingVideoPipeline
from memflow_train.memory import NAM
from memflow_train.models.causal_wan import CausalWanTransformer
from memflow_train.models.presets import wan_config
from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import WanVAE
from memflow_train.rollout import StreamingGenerator
from memflow_train.sampling import FlowMatchSchedule

BENCHMARK = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "memflow_interactive_benchmark.jsonl"
MEMORY = NAM(bank_size=2, record_interval=1, local_attn_size=6, sma=True, sma_topk=2)


@pytest.mark.skipif(not BENCHMARK.is_file(), reason="the shared benchmark file is not beside the repository")
def test_the_memflow_benchmark_reads_as_published_and_shortens() -> None:
    items = read_jsonl(BENCHMARK)
    assert len(items) == 100
    n = items[0].narrative
    assert len(n.prompts) == 6 and n.switch_frames == (40, 80, 120, 160, 200) and n.num_frames == 240
    assert items[3].name == f"{BENCHMARK.name}:3" and items[0].world is None
    short = shorten(items[0], max_prompts=3, frames_per_prompt=6).narrative
    assert short.prompts == n.prompts[:3] and short.switch_frames == (6, 12) and short.num_frames == 18


def test_segments_follow_the_chunk_grid_like_the_rollout() -> None:
    item = from_records([{"prompts": ["a", "b", "c"], "switch_frames": [4, 10], "num_frames": 14}], "t")[0]
    assert item.segment_starts(3) == [0, 6, 12]
    assert item.for_chunks(3).num_frames == 15
    assert item.latent_segments(3).tolist() == [0] * 6 + [1] * 6 + [2] * 3
    clash = from_records([{"prompts": ["a", "b", "c"], "switch_frames": [4, 5], "num_frames": 9}], "t")[0]
    with pytest.raises(ValueError, match="one 3-frame chunk"):
        clash.segment_starts(3)
    assert video_frame_segments(torch.tensor([0, 0, 1]), 4).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_shortening_a_world_narrative_keeps_its_ground_truth_in_step(tmp_path: Path) -> None:
    from data.synthetic.world import Narrative as World
    from data.synthetic.world import narratives_jsonl

    path = tmp_path / "world.jsonl"
    path.write_text("\n".join(narratives_jsonl(2, [40] * 6, seed=0)) + "\n")
    item = shorten(read_jsonl(path)[1], max_prompts=4, frames_per_prompt=9)
    world = World.from_json(item.world)
    assert world.num_frames == item.narrative.num_frames == 36
    assert world.switch_frames == list(item.narrative.switch_frames) == [9, 18, 27]
    assert world.prompts == list(item.narrative.prompts)


def test_the_protocol_id_names_narratives_and_settings() -> None:
    items = from_records([{"prompts": ["a red circle", "a blue square"]}], "x", 6)
    base = digest(items, {"seed": 0})
    assert digest(from_records([{"prompts": ["a red circle", "a blue square"]}], "renamed", 6), {"seed": 0}) == base
    assert digest(items, {"seed": 1}) != base
    assert digest(from_records([{"prompts": ["a red circle", "a green square"]}], "x", 6), {"seed": 0}) != base


# ------------------------------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> StreamingVideoPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CausalWanTransformer(**wan_config("tiny")).eval()
    sampler = StreamingGenerator(model, FlowMatchSchedule(5.0), [1000, 750, 500, 250], MEMORY)
    return StreamingVideoPipeline(sampler, WanTextEncoder.tiny(16, 32), WanVAE.tiny(4), (4, 4))


NARRATIVE = Narrative(("a red circle", "a blue square", "the red circle comes back"), (6, 12), 18, "t")


def test_traced_generation_is_the_pipelines_video_and_leaves_the_global_rng_alone(pipeline) -> None:
    state = torch.get_rng_state()
    video = generate_traced(pipeline, NARRATIVE, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    plain = torch.cat([c.frames for c in pipeline.chunks(NARRATIVE, seed=3)])
    assert torch.equal(video.frames, plain)
    assert video.frames.shape == (1 + 4 * 17, 32, 32, 3) and video.frames.dtype == torch.uint8
    assert video.stats.latent_frames == 18 and video.chunk_starts == [0, 3, 6, 9, 12, 15]


def test_the_bank_trace_shows_what_each_layer_held(pipeline) -> None:
    video = generate_traced(pipeline, NARRATIVE, seed=3)
    window = MEMORY.local_attn_size
    assert len(video.bank_frames) == 6 and all(len(layers) == 2 for layers in video.bank_frames)
    for start, layers in zip(video.chunk_starts, video.bank_frames, strict=True):
        for frames in layers:
            assert len(frames) <= MEMORY.bank_size and len(set(frames)) == len(frames)
            # Bank frames left the window (and the sink) before the chunk: attended once, never twice.
            assert all(MEMORY.sink_size <= f < start + MEMORY.num_frame_per_block - window for f in frames)
    assert video.bank_frames[-1][0], "by the last chunk the bank holds frames"
    free = generate_traced(pipeline, NARRATIVE, seed=3, memory=False, decode=False)
    assert free.frames is None and all(f == [] for layers in free.bank_frames for f in layers)
    assert pipeline.sampler.memory.enabled, "the memory-free run leaves the pipeline's sampler as it was"


def test_narrative_files_reject_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompts": []}) + "\n")
    with pytest.raises(ValueError, match="non-empty prompts"):
        read_jsonl(path)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_narratives": 0}, "num_narratives must be >= 1, got 0"),
        ({"frames_per_prompt": 0}, "frames_per_prompt must be >= 1, got 0"),  # was read as 40 (0 is falsy)
        ({"max_prompts": 0}, "max_prompts must be >= 1, got 0"),
        ({"memory_free_narratives": -1}, "memory_free_narratives must be >= 0"),
        ({"synthetic": {"count": 0}}, "synthetic.count must be >= 1, got 0"),
        ({"synthetic": {"subjects": 7}}, "synthetic.subjects must be >= 1 and <= 6, got 7"),
        ({"synthetic": {"frames_per_segment": 2.5}}, "synthetic.frames_per_segment must be an integer"),
    ],
)
def test_evaluation_protocol_refuses_counts_it_cannot_honour(settings: dict, message: str) -> None:
    from callbacks.long_video.protocol import EvalProtocol, SyntheticNarratives

    with pytest.raises(ValueError, match=message):
        if "synthetic" in settings:
            SyntheticNarratives(**settings["synthetic"])
        else:
            EvalProtocol(**settings)


def test_evaluation_protocol_refuses_more_narratives_than_the_set_holds(tmp_path: Path) -> None:
    from callbacks.long_video.protocol import EvalProtocol, SyntheticNarratives

    assert len(EvalProtocol(synthetic=SyntheticNarratives(count=3), num_narratives=3).load()) == 3
    with pytest.raises(ValueError, match="num_narratives 4: synthetic.count 3 holds only 3 narratives"):
        EvalProtocol(synthetic=SyntheticNarratives(count=3), num_narratives=4).load()


def test_guided_full_sequence_is_the_sampler_with_the_negative_prompt(pipeline: StreamingVideoPipeline) -> None:
    """Oracle: sample_full_sequence called by hand with the per-frame prompts and the negative prompt's states
    for every frame; guidance 1 ignores the negative prompt."""
    from memflow_train.evaluation import generate_full_sequence
    from memflow_train.models.causal_wan import FramePrompts
    from memflow_train.sampling import seeded
    from memflow_train.sampling.full_sequence import sample_full_sequence

    model, frames = pipeline.model, NARRATIVE.num_frames
    embeds, mask = pipeline.text_encoder(list(NARRATIVE.prompts))
    text = FramePrompts.from_segments(embeds[None], mask[None], torch.tensor([NARRATIVE.starts]), frames)
    negative = FramePrompts.single(*pipeline.text_encoder(["blurry"]), frames)
    noise = torch.randn((1, 4, frames, 4, 4), generator=seeded(3, "noise"))
    schedule = pipeline.sampler.schedule
    expected = sample_full_sequence(model, schedule, noise, text, 2, negative, 3.0)
    video = generate_full_sequence(pipeline, NARRATIVE, 3, 2, guidance_scale=3.0, negative_prompt="blurry")
    assert torch.equal(video.frames, pipeline.vae.to_uint8(pipeline.vae.decode(expected))[0])
    plain = generate_full_sequence(pipeline, NARRATIVE, 3, 2)
    other = generate_full_sequence(pipeline, NARRATIVE, 3, 2, negative_prompt="blurry")
    assert torch.equal(plain.frames, other.frames) and not torch.equal(plain.frames, video.frames)
