"""Issue 14 A: a value the program cannot honour exactly is refused or warned about, naming it; never rounded,
truncated, dropped or replaced without a word. One section per instance the audit found."""

from __future__ import annotations

import warnings
from fractions import Fraction
from pathlib import Path

import av
import pytest
import torch

from callbacks.evaluate import main as evaluate_main
from callbacks.long_video import LongVideoEvaluation
from data.prepare.__main__ import main as prepare_main
from data.video_io import encode_mp4
from memflow_train.evaluation.features import FeatureModelSpec
from memflow_train.generation.cli import main as generate_main
from memflow_train.generation.mp4 import Mp4Writer
from memflow_train.models.text_encoder import PromptTruncatedWarning

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _cut(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if w.category is PromptTruncatedWarning]


# ----------------------------------------------------------------------------------- prompts cut to a context


def test_clip_warns_once_per_prompt_it_cuts_to_its_context() -> None:
    clip = FeatureModelSpec(kind="clip", tiny=True).build()  # byte-level tokenizer: one token per character
    long = "a red circle rolls slowly to the left across a grey floor while a blue square waits by the wall"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        clip.text_features([long, "short"])
        clip.text_features([long])  # the same prompt again: already named
    (message,) = _cut(record)
    assert message.startswith(f"prompt of {len(long) + 1} tokens cut to CLIP's context of 77 tokens: 'a red circle")


def test_prepare_names_the_first_cut_prompts_then_counts_the_rest(tmp_path: Path) -> None:
    """A large prompt file does not print a warning per prompt: five are named, the rest counted once."""
    prompts = [f"prompt number {i} is much longer than sixteen tokens" for i in range(8)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    args = ["prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "out"), "--quiet"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prepare_main([*args, "--text-encoder", "tiny", "--tiny-text-dim", "8", "--text-len", "16"])
    messages = _cut(record)
    assert len(messages) == 6
    assert all("cut to text_len=16: 'prompt number" in m for m in messages[:5])
    assert "further cut prompts are counted" in messages[4]
    assert messages[5] == "3 more prompts cut to text_len=16 (the first 5 were named above)"


# ----------------------------------------------------------------------------------- mp4 frame rates


@pytest.mark.parametrize(
    ("fps", "rate"), [(12.5, Fraction(25, 2)), (0.4, Fraction(2, 5)), (29.97, Fraction(2997, 100))]
)
def test_mp4_frame_rates_are_stored_exactly(tmp_path: Path, fps: float, rate: Fraction) -> None:
    """Both writers used round(fps): 12.5 became 12, and 0.4 became 0, which the muxer turned into 24."""
    frames = torch.zeros(3, 16, 16, 3, dtype=torch.uint8)
    with Mp4Writer(tmp_path / "v.mp4", 16, 16, fps=fps) as writer:
        writer.write(frames)
    (tmp_path / "w.mp4").write_bytes(encode_mp4(frames, fps))
    for name in ("v.mp4", "w.mp4"):
        with av.open(str(tmp_path / name)) as container:
            assert container.streams.video[0].average_rate == rate, name


@pytest.mark.parametrize(
    ("fps", "message"),
    [(0, "fps must be > 0, got 0"), (-16, "fps must be > 0"), (0.1234567, "fps 0.1234567 cannot be stored exactly")],
)
def test_mp4_frame_rates_that_cannot_be_stored_are_refused(tmp_path: Path, fps: float, message: str) -> None:
    frames = torch.zeros(3, 16, 16, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        encode_mp4(frames, fps)
    with pytest.raises(ValueError, match=message):
        Mp4Writer(tmp_path / "v.mp4", 16, 16, fps=fps)
    assert not list(tmp_path.iterdir())


def test_generation_refuses_a_frame_rate_it_cannot_store(tmp_path: Path) -> None:
    (tmp_path / "n.txt").write_text("a\n")
    args = [str(tmp_path / "n.txt"), "--config", str(DEMO), "--output", str(tmp_path / "o"), "--num-frames", "6"]
    with pytest.raises(SystemExit, match=r"--fps 0\.1234567 cannot be stored exactly .* nearest is 10/81"):
        generate_main([*args, "--fps", "0.1234567"])


# ----------------------------------------------------------------------------------- callbacks.evaluate options


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--video_fps", "0"], "--video_fps must be > 0, got 0"),
        (["--video_fps", "-2"], "--video_fps must be > 0, got -2"),
        (["--text_len", "0"], "--text_len must be >= 1, got 0"),
        (["--videos", "-3"], "--videos must be >= 0, got -3"),
        (["--latent_size", "[4, 0]"], "--latent_size must be >= 1, got 0"),
        (["--demo_models", "true", "--text_encoder", "x"], "drop --text_encoder"),
    ],
)
def test_evaluate_refuses_option_values_it_cannot_honour(tmp_path: Path, flags: list[str], message: str) -> None:
    """--text_len 0 used to become the demo's 128 (an `or`); --videos -3 and --video_fps 0 were accepted."""
    with pytest.raises(ValueError, match=message):
        evaluate_main(["--checkpoint", "missing.ckpt", "--out", str(tmp_path / "r"), *flags])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"video_fps": 0}, "video_fps must be > 0"),
        ({"videos": -1}, "videos must be >= 0"),
        ({"every_n_steps": 2.5}, "every_n_steps must be an integer"),
        ({"latent_size": (4, 0)}, "latent_size must be >= 1"),
        ({"denoising_steps": (1000, 0)}, "denoising_steps must be >= 1"),
    ],
)
def test_the_evaluation_callback_refuses_bad_numbers(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LongVideoEvaluation(**overrides)
