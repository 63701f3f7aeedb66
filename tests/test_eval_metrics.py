"""Long-video evaluation metrics on constructed and rendered videos whose answers are known."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from transformers import CLIPProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from callbacks.long_video.memory import MemoryRetrieval
from callbacks.long_video.metrics import (
    SegmentClipScore,
    SegmentConsistency,
    SegmentQuality,
    TemporalFlicker,
    vbench_consistency,
)
from callbacks.long_video.world import WorldConsistency, annotate, returning_events
from data.synthetic.world import COLOURS, Narrative, render, sample_narrative
from memflow_train.evaluation import FeatureModelSpec

# Narratives (seeds of sample_narrative, 3 segments of 6 latent frames) whose third segment brings a subject
# back; at 32x32 no two same-coloured subjects overlap in them (the pixel reader cannot split such blobs).
RETURNING = (1, 2, 3, 4, 5)


def _rendered(seed: int, size: int = 32) -> tuple[Narrative, torch.Tensor, list[dict], torch.Tensor]:
    narrative = sample_narrative(random.Random(seed), [6, 6, 6])
    video, notes = render(narrative, size, size)
    return narrative, torch.from_numpy(video), notes, torch.tensor([n["segment"] for n in notes])


@pytest.fixture(scope="module")
def dino():
    return FeatureModelSpec(kind="dino", tiny=True).build()


@pytest.fixture(scope="module")
def clip():
    return FeatureModelSpec(kind="clip", tiny=True).build()


# ------------------------------------------------------------------------------------------ consistency


def test_identical_frames_give_consistency_one_and_no_flicker(dino) -> None:
    _, video, _, _ = _rendered(1)
    still = video[:1].expand(13, -1, -1, -1).contiguous()
    segments = torch.tensor([0] * 5 + [1] * 8)
    consistency = SegmentConsistency(2)(dino.image_features(still), segments)
    for key in ("consistency", "consistency/segment_0", "consistency/segment_1", "consistency/across"):
        assert consistency[key].item() == pytest.approx(1.0, abs=1e-6), key
    assert consistency["consistency/drift"].item() == pytest.approx(0.0, abs=1e-6)
    flicker = TemporalFlicker(2)(still, segments)
    assert flicker["flicker"].item() == 0.0 and flicker["flicker/drift"].item() == 0.0


def test_vbench_consistency_formula_on_known_features() -> None:
    e = torch.eye(3)
    # frames a, a, b: pairs (a,a): (1+1)/2, (b vs a, b vs a): (0+0)/2 -> mean 0.5
    assert vbench_consistency(torch.stack([e[0], e[0], e[1]])) == pytest.approx(0.5)
    # opposite features count as 0, not negative
    assert vbench_consistency(torch.stack([e[0], -e[0]])) == 0.0
    assert vbench_consistency(e[:1]) is None


@pytest.mark.parametrize("seed", RETURNING)
def test_a_shuffled_video_scores_lower_consistency_and_more_flicker(dino, seed: int) -> None:
    _, video, _, segments = _rendered(seed)
    shuffled = video[torch.randperm(len(video), generator=torch.Generator().manual_seed(seed))]
    ordered = SegmentConsistency(3)(dino.image_features(video), segments)
    mixed = SegmentConsistency(3)(dino.image_features(shuffled), segments)
    assert ordered["consistency"] > mixed["consistency"]
    assert ordered["consistency/across"] > mixed["consistency/across"]
    assert TemporalFlicker(3)(video, segments)["flicker"] < TemporalFlicker(3)(shuffled, segments)["flicker"]


def test_flicker_leaves_out_the_prompt_switch() -> None:
    frames = torch.zeros(6, 2, 2, 3, dtype=torch.uint8)
    frames[3:] = 255  # a cut exactly at the switch, still frames on both sides
    segments = torch.tensor([0, 0, 0, 1, 1, 1])
    assert TemporalFlicker(2)(frames, segments)["flicker"].item() == 0.0
    frames[1] = 51  # one frame off by 0.2 inside segment 0: pairs 0.2, 0.2 -> 0.2 over 2 pairs of segment 0
    out = TemporalFlicker(2)(frames, segments)
    assert out["flicker/segment_0"].item() == pytest.approx(0.2) and out["flicker/segment_1"].item() == 0.0


def test_metrics_accumulate_over_videos_and_report_drift() -> None:
    metric = SegmentQuality(3, "brightness")
    for first, last in ((255, 0), (255, 51)):
        frames = torch.full((3, 2, 2, 3), first, dtype=torch.uint8)
        frames[2] = last
        metric.update(frames, torch.tensor([0, 1, 2]))
    out = metric.compute()
    assert out["brightness/segment_0"].item() == pytest.approx(1.0, abs=1e-6)
    assert out["brightness/segment_2"].item() == pytest.approx(0.1, abs=1e-6)
    assert out["brightness/drift"].item() == pytest.approx(-0.9, abs=1e-6)  # (-1.0 + -0.8) / 2


def test_quality_statistics_on_known_images() -> None:
    grey = torch.full((1, 8, 8, 3), 128, dtype=torch.uint8)
    red = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    red[..., 0] = 255
    board = ((torch.arange(8)[:, None] + torch.arange(8)) % 2 * 255).to(torch.uint8)
    board = board[None, :, :, None].expand(1, 8, 8, 3).contiguous()
    segments = torch.tensor([0])
    assert SegmentQuality(1, "saturation")(grey, segments)["saturation"].item() == 0.0
    assert SegmentQuality(1, "saturation")(red, segments)["saturation"].item() == pytest.approx(1.0)
    assert SegmentQuality(1, "sharpness")(grey, segments)["sharpness"].item() == 0.0
    assert SegmentQuality(1, "sharpness")(board, segments)["sharpness"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one of"):
        SegmentQuality(1, "contrast")


def test_more_segments_than_the_metric_holds_is_an_error() -> None:
    with pytest.raises(ValueError, match="3 segments"):
        TemporalFlicker(2)(torch.zeros(3, 2, 2, 3, dtype=torch.uint8), torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------ CLIP score


def test_clip_score_per_segment_on_known_features() -> None:
    e = torch.eye(4)
    text = torch.stack([e[0], e[1]])
    image = torch.stack([e[0], e[0], e[1], -e[1], e[2]])
    out = SegmentClipScore(2)(image, text, torch.tensor([0, 0, 1, 1, 1]))
    assert out["clip_score/segment_0"].item() == pytest.approx(100.0)
    assert out["clip_score/segment_1"].item() == pytest.approx(100 / 3)  # 100, clamped -100 -> 0, orthogonal 0
    assert out["clip_score/drift"].item() == pytest.approx(100 / 3 - 100)


class _TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9's CLIPScore expects tensors from get_*_features; transformers 5 returns outputs."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip, self.config = clip, clip.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def test_segment_clip_score_matches_torchmetrics_clip_score(clip) -> None:
    from torchmetrics.multimodal.clip_score import CLIPScore

    _, video, _, segments = _rendered(2)
    prompts = ["a red circle", "the blue square comes back", "an empty meadow"]
    size = clip.preprocess.crop
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=clip.tokenizer,
    )
    oracle = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(clip.model), processor))
    per_frame = []
    for frame, k in zip(video, segments.tolist(), strict=True):
        oracle.reset()
        per_frame.append(oracle(frame.permute(2, 0, 1), prompts[k]).item())  # max(100 cos, 0) of one pair
    per_frame = torch.tensor(per_frame)
    ours = SegmentClipScore(3)(clip.image_features(video), clip.text_features(prompts), segments)
    for k in range(3):
        expected = per_frame[segments == k].mean().item()
        assert ours[f"clip_score/segment_{k}"].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_feature_models_load_from_a_local_folder(tmp_path, clip, dino) -> None:
    clip.model.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    dino.model.save_pretrained(tmp_path / "dino")
    _, video, _, _ = _rendered(3)
    loaded_clip = FeatureModelSpec(kind="clip", path=str(tmp_path / "clip")).build()
    loaded_dino = FeatureModelSpec(kind="dino", path=str(tmp_path / "dino")).build()
    assert torch.allclose(loaded_clip.image_features(video[:4]), clip.image_features(video[:4]), atol=1e-6)
    assert torch.allclose(loaded_clip.text_features(["a red circle"]), clip.text_features(["a red circle"]), atol=1e-6)
    assert torch.allclose(loaded_dino.image_features(video[:4]), dino.image_features(video[:4]), atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        FeatureModelSpec(kind="clip")
    with pytest.raises(FileNotFoundError, match="no dino model"):
        FeatureModelSpec(kind="dino", path=str(tmp_path / "missing")).build()


# ------------------------------------------------------------------------------------------ synthetic world


def test_returning_events_follow_the_worlds_returning_field() -> None:
    for seed in range(20):
        narrative = sample_narrative(random.Random(seed), [6, 6, 6, 6])
        events = returning_events([set(s.subjects) for s in narrative.segments])
        expected = [(s, k) for k, seg in enumerate(narrative.segments) for s in seg.returning]
        assert [(s, r) for s, r, _ in events] == expected


@pytest.mark.parametrize("seed", RETURNING)
def test_rendered_video_passes_the_world_check(seed: int) -> None:
    _, video, notes, _ = _rendered(seed)
    metric = WorldConsistency()
    out = metric(annotate(video), notes)
    assert out["world/return_events"].item() == 1
    assert out["world/return_consistency"].item() == 1.0
    assert out["world/scene_accuracy"].item() == 1.0
    assert out["world/subject_recall"].item() > 0.85 and out["world/subject_precision"].item() > 0.9


def _recoloured(seed: int) -> tuple[torch.Tensor, list[dict]]:
    """The rendered video with the returning subject re-coloured in the segment it returns in."""
    narrative, video, notes, segments = _rendered(seed)
    back = narrative.segments[2].returning[0]
    used = {s.colour for s in narrative.subjects}
    colour = next(c for c in COLOURS if c not in used)
    subjects = tuple(dataclasses.replace(s, colour=colour) if s.id == back else s for s in narrative.subjects)
    changed, _ = render(dataclasses.replace(narrative, subjects=subjects), 32, 32)
    video = torch.where((segments == 2)[:, None, None, None], torch.from_numpy(changed), video)
    return video, notes


@pytest.mark.parametrize("seed", RETURNING)
def test_a_returning_subject_that_changes_colour_fails_the_world_check(seed: int) -> None:
    video, notes = _recoloured(seed)
    out = WorldConsistency()(annotate(video), notes)
    assert out["world/return_events"].item() == 1
    assert out["world/return_consistency"].item() == 0.0


def test_world_check_accumulates_over_videos() -> None:
    metric = WorldConsistency()
    for seed in RETURNING[:2]:
        _, video, notes, _ = _rendered(seed)
        metric.update(annotate(video), notes)
    video, notes = _recoloured(RETURNING[2])
    metric.update(annotate(video), notes)
    out = metric.compute()
    assert out["world/return_events"].item() == 3
    assert out["world/return_consistency"].item() == pytest.approx(2 / 3)


def test_annotate_reads_the_exact_looks_of_a_clean_frame() -> None:
    _, video, notes, _ = _rendered(3, size=64)
    frame = 0
    truth = {(s["shape"], s["colour"]) for s in notes[frame]["subjects"]}
    read = annotate(video[frame : frame + 1])[0]
    assert {(s["shape"], s["colour"]) for s in read["subjects"]} == truth
    assert read["scene"] == notes[frame]["scene"]


# ------------------------------------------------------------------------------------------ memory


def test_memory_retrieval_shares_on_a_constructed_trace() -> None:
    # 12 latent frames, segments of 3 chunks... segment 0 = frames 0-3, 1 = 4-7, 2 = 8-11; 2 layers.
    segments = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    chunk_starts = [0, 4, 8]
    banks = [
        [[], []],
        [[0], [1]],  # segment 1: held frames from segment 0
        [[1, 5], [2, 6]],  # segment 2 (the subject returns, last seen in segment 0): 2 of 4 held frames
    ]
    out = MemoryRetrieval()(banks, chunk_starts, segments, [(2, 0)])
    assert out["memory/returning_subject_share"].item() == pytest.approx(0.5)
    assert out["memory/frames_held"].item() == pytest.approx(6 / 6)
    assert out["memory/same_segment_share"].item() == 0.0
    with pytest.raises(ValueError, match="bank records"):
        MemoryRetrieval()(banks[:2], chunk_starts, segments, [])
