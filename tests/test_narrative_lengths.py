"""Issue 14 A, narrative lengths: lengths that contradict each other are refused, lengths a command gives but a
narrative does not use are named, and evaluation names the narratives it moves to the chunk grid."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from data.format import SampleSpec, decode_sample
from data.prepare.__main__ import main as prepare_main
from data.reading import expand_urls, iter_raw_samples
from memflow_train.checks import IgnoredSettingWarning
from memflow_train.evaluation.narratives import ChunkGridWarning, EvalNarrative, warn_off_grid
from memflow_train.generation.narrative import Narrative, narrative_from_record, read_narratives


def _read_shards(urls: str) -> list:
    return [
        decode_sample(raw, SampleSpec(fields=()))
        for url in expand_urls(urls)
        for raw in iter_raw_samples(url, pytest.fail)
    ]


# ----------------------------------------------------------------------------------- narrative lengths


@pytest.mark.parametrize(
    ("record", "frames_per_prompt", "num_frames", "message"),
    [
        ({"segment_frames": [6, 6], "num_frames": 9}, None, None, r"segment_frames \[6, 6\] add up to 12 .* is 9"),
        ({"segment_frames": [6, 6], "num_frames": 30}, None, None, r"add up to 12 frames but num_frames is 30"),
        ({"segment_frames": [6, 6], "switch_frames": [4]}, None, None, r"switches at \[6\] but switch_frames is \[4\]"),
        ({"segment_frame": [6, 6]}, None, 12, r"unknown keys \['segment_frame'\]; .*'segment_frames'"),
        ({}, 6, 30, r"--frames-per-prompt 6 x 2 prompts is 12 frames, but --num-frames is 30"),
        ({"switch_frames": [6]}, 6, 30, r"--frames-per-prompt 6 ends the narrative at 12, but --num-frames is 30"),
    ],
)
def test_narrative_lengths_that_contradict_each_other_are_refused(
    record: dict, frames_per_prompt: int | None, num_frames: int | None, message: str
) -> None:
    """Each used to be read with one value silently winning (the last prompt got 3, 24 or 18 frames)."""
    with pytest.raises(ValueError, match=message):
        narrative_from_record({"prompts": ["a", "b"], **record}, frames_per_prompt, num_frames, "n.jsonl line 1")


def test_agreeing_lengths_are_accepted() -> None:
    record = {"prompts": ["a", "b"], "segment_frames": [6, 9], "switch_frames": [6], "num_frames": 15}
    assert narrative_from_record(record, None, None, "n") == Narrative(("a", "b"), (6,), 15, "n")
    assert narrative_from_record({"prompts": ["a", "b"]}, 6, 12, "n") == Narrative(("a", "b"), (6,), 12, "n")


def test_a_command_length_a_narrative_does_not_use_is_warned_about_once(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    path.write_text('{"prompts": ["a"], "num_frames": 6}\n{"prompts": ["b"], "num_frames": 9}\n{"prompts": ["c"]}\n')
    flags = {"frames_per_prompt": "--frames-per-prompt", "num_frames": "--num-frames"}
    with pytest.warns(IgnoredSettingWarning) as record:
        narratives = read_narratives(path, None, 30, flags)
    assert [n.num_frames for n in narratives] == [6, 9, 30]
    (warning,) = record
    assert str(warning.message) == (
        f"--num-frames 30 is not used by 2 narrative(s) that fix their own lengths (the record's lengths win): "
        f"{path} line 1, {path} line 2"
    )


def test_prepare_reads_narratives_as_generation_does(tmp_path: Path) -> None:
    """data.prepare ignored segment_frames (stored switch [40] and 80 frames) and refused num_frames 12.0."""
    lines = [
        {"prompts": ["a", "b"], "segment_frames": [6, 6]},
        {"prompts": ["a", "b"], "switch_frames": [4], "num_frames": 12.0},
    ]
    (tmp_path / "n.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    urls = prepare_main(["narratives", str(tmp_path / "n.jsonl"), "--output", str(tmp_path / "o"), "--quiet"])
    stored = [(s.switch_frames, s.num_frames) for s in _read_shards(urls)]
    generated = [(list(n.switch_frames), n.num_frames) for n in read_narratives(tmp_path / "n.jsonl")]
    assert stored == generated == [([6], 12), ([4], 12)]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"prompts": ["a", "b"], "switch_frames": [4.5], "num_frames": 12},
            "switch_frames must be an integer, got 4.5",
        ),
        ({"prompts": ["a"], "num_frames": 12.5}, "num_frames must be an integer, got 12.5"),
        ({"prompts": ["a"], "segment_frame": [6]}, r"unknown keys \['segment_frame'\]"),
    ],
)
def test_prepare_names_what_is_wrong_with_a_narrative_line(tmp_path: Path, record: dict, message: str) -> None:
    (tmp_path / "n.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"n\.jsonl line 1: {message}"):
        prepare_main(["narratives", str(tmp_path / "n.jsonl"), "--output", str(tmp_path / "o"), "--quiet"])


def test_prepare_warns_when_lines_fix_their_own_lengths_over_frames_per_prompt(tmp_path: Path) -> None:
    (tmp_path / "n.jsonl").write_text('{"prompts": ["a", "b"], "switch_frames": [4], "num_frames": 12}\n')
    args = ["narratives", str(tmp_path / "n.jsonl"), "--output", str(tmp_path / "o"), "--quiet"]
    with pytest.warns(IgnoredSettingWarning, match=r"--frames-per-prompt 6 is not used by 1 narrative"):
        prepare_main([*args, "--frames-per-prompt", "6"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredSettingWarning)
        prepare_main([*args, "--overwrite"])  # not given: nothing to say


# ----------------------------------------------------------------------------------- evaluation's chunk grid


def test_evaluation_names_the_narratives_it_moves_to_the_chunk_grid() -> None:
    """for_chunks rounded 40 frames up to 42 and the generator moved switch 10 to 12 without a word."""
    off = EvalNarrative(Narrative(("a", "b", "c"), (10, 20), 40, "set:0"))
    on = EvalNarrative(Narrative(("a", "b"), (6,), 12, "set:1"))
    with pytest.warns(ChunkGridWarning) as record:
        warn_off_grid([off, on], 3)
    (warning,) = record
    assert str(warning.message) == (
        "1 of 2 narratives are generated on the 3-frame chunk grid (lengths rounded up to whole chunks, switches at "
        "the next chunk start): set:0: num_frames 40 -> 42, switch_frames [10, 20] -> [12, 21]"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChunkGridWarning)
        warn_off_grid([on], 3)
