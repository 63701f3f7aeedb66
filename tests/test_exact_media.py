"""Issue 14 A, what is kept exactly: prompts cut to a context are named, mp4 frame rates are stored exactly or
refused, data.prepare stores videos at their true rate and counts the files it skips."""

from __future__ import annotations

import io
import json
import warnings
from fractions import Fraction
from pathlib import Path

import av
import pytest
import torch

from data.prepare.__main__ import SkippedFilesWarning
from data.prepare.__main__ import main as prepare_main
from data.reading import expand_urls, iter_raw_samples
from data.video_io import FrameRateWarning, encode_mp4
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


# ----------------------------------------------------------------------------------- data.prepare videos


def _write_video(path: Path, fps: int, frames: int = 13, container: str = "mp4") -> None:
    video = torch.zeros(frames, 16, 16, 3, dtype=torch.uint8)
    video[:, 4:12, 4:12] = torch.arange(frames).view(-1, 1, 1, 1) * 15
    if container == "mp4":
        path.write_bytes(encode_mp4(video, fps))
        return
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for frame in video.numpy():
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def _stored(urls: str) -> list[tuple[str, Fraction, float]]:
    """(key, the stored mp4's frame rate, the sample's recorded fps) of every sample."""
    out = []
    for url in expand_urls(urls):
        for raw in iter_raw_samples(url, pytest.fail):
            with av.open(io.BytesIO(raw["mp4"])) as container:
                rate = container.streams.video[0].average_rate
            out.append((raw["__key__"], rate, json.loads(raw["json"])["info"]["fps"]))
    return out


VIDEO_ARGS = ["--vae", "tiny", "--height", "16", "--width", "16", "--keep-video", *["--text-encoder", "tiny"]]
VIDEO_ARGS += ["--tiny-text-dim", "8", "--quiet"]


def test_prepare_stores_videos_at_their_true_rate(tmp_path: Path) -> None:
    """--fps 16 on a 10 fps source kept 10 fps silently and labelled the mp4 16; without --fps every stored
    mp4 was labelled 16 whatever its source's rate."""
    src = tmp_path / "v"
    src.mkdir()
    _write_video(src / "slow.mp4", fps=10)
    (src / "slow.txt").write_text("a box\n")
    args = ["videos", str(src), *VIDEO_ARGS]
    with pytest.warns(FrameRateWarning, match=r"slow\.mp4 runs at 10 fps, slower than the requested 16: its frames"):
        urls = prepare_main([*args, "--output", str(tmp_path / "a"), "--fps", "16"])
    assert _stored(urls) == [("slow", 10, 10.0)]
    assert _stored(prepare_main([*args, "--output", str(tmp_path / "b")])) == [("slow", 10, 10.0)]
    _write_video(src / "slow.mp4", fps=32, frames=26)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrameRateWarning)
        urls = prepare_main([*args, "--output", str(tmp_path / "c"), "--fps", "16"])
    assert _stored(urls) == [("slow", 16, 16.0)]


def test_prepare_reads_common_video_containers_and_counts_other_files(tmp_path: Path) -> None:
    """Only *.mp4 (case-sensitive) was read: a.MP4, b.mov and c.mkv were skipped without a word."""
    src = tmp_path / "v"
    src.mkdir()
    for name, container in (("a.MP4", "mp4"), ("b.mov", "mov"), ("c.mkv", "matroska")):
        _write_video(src / name, fps=16, container=container)
        (src / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    (src / "notes.json").write_text("{}")
    (src / "frame.jpg").write_bytes(b"\xff\xd8")
    with pytest.warns(SkippedFilesWarning, match=r"skipping 2 files that are neither a video .*: \.jpg x1, \.json x1"):
        urls = prepare_main(["videos", str(src), "--output", str(tmp_path / "o"), *VIDEO_ARGS])
    assert [key for key, _, _ in _stored(urls)] == ["a", "b", "c"]
    _write_video(src / "a.mov", fps=16, container="mov")
    with pytest.raises(ValueError, match=r"a\.MP4 and .*a\.mov share the caption a\.txt"):
        prepare_main(["videos", str(src), "--output", str(tmp_path / "p"), *VIDEO_ARGS])
