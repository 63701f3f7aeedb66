"""Object permanence in the synthetic world: attributes captions never name (size, marking), their readback
against hand-worked values on rendered ground truth, and the benchmark's narratives."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from callbacks.long_video.world import WorldConsistency, annotate, appearance
from data.synthetic.__main__ import main as synthetic_main
from data.synthetic.world import (
    MARKINGS,
    SIZES,
    Narrative,
    Segment,
    Subject,
    permanence_jsonl,
    permanence_narrative,
    render,
    sample_narrative,
)

RES = 64  # the resolution the readback is exact at (size classes 1.9 px apart, ring holes >= 3 px wide)


def _truth(notes: list[dict]) -> list[dict]:
    return notes  # the renderer's notes carry id, shape, colour, size and marking


def _video(narrative: Narrative, every: int = 2) -> tuple[torch.Tensor, list[dict]]:
    video, notes = render(narrative, RES, RES)
    return torch.from_numpy(video[::every]), notes[::every]


def test_captions_never_name_size_or_marking() -> None:
    rng = random.Random(0)
    words = {"ring", "solid", "small", "large", "big", "hollow", *map(str, SIZES)}
    for _ in range(30):
        n = sample_narrative(rng, [3, 3, 3, 3])
        assert {s.size for s in n.subjects} <= set(SIZES) and {s.marking for s in n.subjects} <= set(MARKINGS)
        assert len({s.colour for s in n.subjects}) == len(n.subjects)  # a colour names one subject
        for prompt in n.prompts:
            assert not words & set(prompt.lower().replace(".", " ").replace(",", " ").split())
        # Two narratives that differ only in sizes and markings have the same captions.
        other = dataclasses.replace(
            n, subjects=tuple(dataclasses.replace(s, size=0.1, marking="solid") for s in n.subjects)
        )
        assert other.prompts == n.prompts


def test_subjects_move_in_their_own_lanes_and_never_overlap() -> None:
    n = sample_narrative(random.Random(1), [6, 6, 6], num_subjects=3)
    _, notes = render(n, RES, RES)
    for note in notes:
        for s in note["subjects"]:
            r = s["size"]  # frame fractions (square frame)
            assert s["id"] / 3 <= s["y"] - r + 1e-4 and s["y"] + r <= (s["id"] + 1) / 3 + 1e-4
            assert r - 1e-4 <= s["x"] <= 1 - r + 1e-4


@pytest.mark.parametrize("seed", range(6))
def test_readback_of_ground_truth_is_exact(seed: int) -> None:
    n = sample_narrative(random.Random(seed), [3, 3, 3])
    video, notes = _video(n)
    out = WorldConsistency()(annotate(video), _truth(notes))
    assert out["world/scene_accuracy"].item() == 1.0
    assert out["world/subject_recall"].item() == 1.0 and out["world/subject_precision"].item() == 1.0
    assert out["world/size_error_px"].item() == 0.0 and out["world/marking_accuracy"].item() == 1.0


def test_annotate_reads_size_marking_and_radius_of_a_hand_placed_subject() -> None:
    # One ring circle of radius 0.13 * 64 = 8.32 px, alone in a meadow.
    n = Narrative((Subject(0, "circle", "red", 0.13, "ring"),), (Segment("meadow", (0,), 1),), seed=3)
    video, _ = render(n, RES, RES)
    (read,) = annotate(torch.from_numpy(video))[0]["subjects"]
    assert (read["shape"], read["colour"], read["marking"], read["size"]) == ("circle", "red", "ring", 0.13)
    assert abs(read["radius_px"] - 8.32) <= 0.5


def _returning(seed: int, **change) -> tuple[Narrative, torch.Tensor, list[dict], int]:
    """A permanence narrative's video with the target re-rendered with `change` in every returning segment."""
    n = permanence_narrative(random.Random(seed), lead_frames=3, present_frames=3, away_frames=6, returns=2)
    video, notes = render(n, RES, RES)
    changed = dataclasses.replace(n, subjects=(n.subjects[0], dataclasses.replace(n.subjects[1], **change)))
    other, _ = render(changed, RES, RES)
    back = np.array([n.segments[note["segment"]].returning == (1,) for note in notes])
    video = np.where(back[:, None, None, None], other, video)
    return n, torch.from_numpy(video[::2]), notes[::2], int(back[::2].sum())


def test_reentry_matches_on_ground_truth() -> None:
    n, video, notes, _ = _returning(0)
    out = WorldConsistency()(annotate(video), notes)
    assert out["world/reentries"].item() == 2 == out["world/return_events"].item()
    assert out["world/reentry_size_error_px"].item() == 0.0
    assert out["world/reentry_marking_accuracy"].item() == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_a_resized_returning_subject_has_the_hand_worked_size_error(seed: int) -> None:
    n = permanence_narrative(random.Random(seed), lead_frames=3, present_frames=3, away_frames=6, returns=2)
    target = n.subjects[1]
    new = next(s for s in SIZES if s != target.size)
    _, video, notes, back_frames = _returning(seed, size=new)
    out = WorldConsistency()(annotate(video), notes)
    delta = abs(new - target.size) * RES  # e.g. 0.16 - 0.1 of 64 px = 3.84 px
    assert out["world/reentries"].item() == 2
    assert out["world/reentry_size_error_px"].item() == pytest.approx(delta)
    assert out["world/reentry_marking_accuracy"].item() == 1.0
    # Against the truth: the changed frames are off by delta, all others exact.
    recalled = sum(len(note["subjects"]) for note in notes)
    assert out["world/size_error_px"].item() == pytest.approx(delta * back_frames / recalled)


def test_a_returning_subject_with_another_marking_fails_reentry_marking() -> None:
    n = permanence_narrative(random.Random(4), lead_frames=3, present_frames=3, away_frames=6, returns=2)
    flipped = "solid" if n.subjects[1].marking == "ring" else "ring"
    _, video, notes, _ = _returning(4, marking=flipped)
    out = WorldConsistency()(annotate(video), notes)
    assert out["world/reentry_marking_accuracy"].item() == 0.0 and out["world/reentry_size_error_px"].item() == 0.0
    assert out["world/return_consistency"].item() == 1.0  # the caption's look is kept: only the memory test fails


def test_appearance_takes_the_median_size_and_most_frequent_marking() -> None:
    def note(size: float, marking: str) -> dict:
        return {"unit": 64, "subjects": [{"shape": "square", "colour": "red", "size": size, "marking": marking}]}

    notes = [note(0.1, "ring"), note(0.16, "solid"), note(0.16, "ring"), {"unit": 64, "subjects": []}]
    assert appearance(notes, ("square", "red")) == (pytest.approx(0.16 * 64), "ring")
    assert appearance(notes, ("circle", "red")) is None


def test_permanence_narratives_hide_the_target_from_the_sink_and_the_window() -> None:
    rng = random.Random(5)
    for _ in range(10):
        n = permanence_narrative(rng, lead_frames=3, present_frames=6, away_frames=12, returns=3)
        assert n.num_frames == 3 + 6 + 3 * (12 + 6)
        assert 1 not in n.segments[0].subjects and n.segments[0].frames == 3  # after the sink chunk
        away = [s for s in n.segments if 1 not in s.subjects][1:]
        assert len(away) == 3 and all(s.frames == 12 for s in away)
        assert [k for k, s in enumerate(n.segments) if s.returning] == [3, 5, 7]
        assert all("comes back" in n.prompts[k] for k in (3, 5, 7))
        assert len({s.scene for s in n.segments}) == 1


def test_permanence_narrative_refuses_empty_lengths() -> None:
    with pytest.raises(ValueError, match="away_frames"):
        permanence_narrative(random.Random(0), 3, 3, 0, 1)
    with pytest.raises(ValueError, match="returns"):
        permanence_narrative(random.Random(0), 3, 3, 3, 0)


def test_reentries_are_measured_against_the_first_appearance_the_video_shows() -> None:
    n, video, notes, _ = _returning(0, size=next(s for s in SIZES if s != 0.13))
    # The video never draws the target in the segment that introduces it (segment 1).
    alone = dataclasses.replace(n, segments=tuple(dataclasses.replace(s, subjects=(0,)) for s in n.segments))
    blank = torch.from_numpy(render(alone, RES, RES)[0][::2])
    introduced = torch.tensor([note["segment"] == 1 for note in notes])
    out = WorldConsistency()(annotate(torch.where(introduced[:, None, None, None], blank, video)), notes)
    # Return 1 (segment 3) follows an unshown segment: no return event. Return 2 (segment 5) is measured
    # against segment 3, the first the video shows the target in, with the same (changed) size: no error.
    assert out["world/return_events"].item() == 1 and out["world/reentries"].item() == 1
    assert out["world/reentry_size_error_px"].item() == 0.0


def test_permanence_command_writes_seeded_narratives_the_renderer_rebuilds(tmp_path) -> None:
    out = tmp_path / "p.jsonl"
    args = ["permanence", "--out", str(out), "--count", "4", "--lead-frames", "3", "--away-frames", "9"]
    synthetic_main(args)
    lines = out.read_text().splitlines()
    assert lines == permanence_jsonl(4, 3, 6, 9, 2, seed=0)  # the documented defaults, seeded
    for line in lines:
        record = json.loads(line)
        world = Narrative.from_json(record["world"])
        assert (world.prompts, world.switch_frames, world.num_frames) == (
            record["prompts"],
            record["switch_frames"],
            record["num_frames"],
        )
        assert record["switch_frames"] == [3, 9, 18, 24, 33] and record["num_frames"] == 39


@pytest.mark.parametrize(
    "args, message",
    [
        (["permanence", "--returns", "0"], "returns"),
        (["permanence", "--away-frames", "0"], "away_frames"),
        (["permanence", "--count", "0"], "--count"),
        (["narratives", "--segments", "0"], "--segments"),
        (["narratives", "--frames-per-segment", "0"], "--frames-per-segment"),
        (["narratives", "--subjects", "7"], "--subjects must be 1 to 6"),
    ],
)
def test_synthetic_commands_refuse_what_they_cannot_write(tmp_path, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        synthetic_main([args[0], "--out", str(tmp_path / "x.jsonl"), *args[1:]])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_permanence_world_refuses_a_whitening_outside_0_to_1(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        synthetic_main(["permanence-world", "--root", str(tmp_path / "w"), "--whitening", "1.5"])
    assert exit_info.value.code == 2 and "autoencoder.whitening" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
