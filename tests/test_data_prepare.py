"""Preparation commands: each source round-trips through shards; interrupted runs resume to identical shards."""

from __future__ import annotations

import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

from data.format import FIELD_MEMBERS, Sample, SampleSpec, decode_sample
from data.prepare import Encoders, Item, prepare
from data.prepare.__main__ import main
from data.prepare.core import DroppedFramesWarning
from data.reading import expand_urls, iter_raw_samples
from data.video_io import decode_mp4, encode_mp4, read_video
from data.writer import ShardSink, brace_pattern, parse_size
from memflow_train.models.text_encoder import PromptTruncatedWarning, WanTextEncoder
from memflow_train.models.vae import WanVAE

BENCHMARK = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "memflow_interactive_benchmark.jsonl"
TINY = ["--text-encoder", "tiny", "--tiny-text-dim", "8", "--text-len", "64", "--quiet"]


def read_all(urls: str, fields: tuple[str, ...] = ("text",)) -> list[Sample]:
    spec = SampleSpec(fields=fields)
    return [decode_sample(raw, spec) for url in expand_urls(urls) for raw in iter_raw_samples(url, pytest.fail)]


def test_prompt_file_round_trip(tmp_path: Path) -> None:
    prompts = ["a red circle", "", "a blue square moves", "a green triangle"]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    urls = main(
        ["prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "out"), "--samples-per-shard", "2", *TINY]
    )
    assert urls == f"{tmp_path}/out/shard-{{000000..000001}}.tar"
    samples = read_all(urls)
    assert [s.prompts for s in samples] == [["a red circle"], ["a blue square moves"], ["a green triangle"]]
    encoder = WanTextEncoder.tiny(d_model=8, text_len=64).to(torch.bfloat16)  # Wan runs UMT5 in bf16
    expected = encoder.encode_unpadded([p for p in prompts if p])
    for s, e in zip(samples, expected, strict=True):
        assert s.switch_frames is None and s.num_frames is None and s.text[0].dtype == torch.bfloat16
        assert torch.equal(s.text[0], e)


def test_switch_pairs_round_trip_with_negative_prompt(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first A\nfirst B\n")
    (tmp_path / "b.txt").write_text("second A\nsecond B\n")
    out = str(tmp_path / "out")
    args = ["switch", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--output", out, "--num-frames", "21"]
    urls = main([*args, "--switch-frame", "9", "--negative-prompt", "blurry", "--text-dtype", "float32", *TINY])
    samples = read_all(urls, ("text", "negative"))
    assert [(s.prompts, s.switch_frames, s.num_frames) for s in samples] == [
        (["first A", "second A"], [9], 21),
        (["first B", "second B"], [9], 21),
    ]
    enc = WanTextEncoder.tiny(d_model=8, text_len=64).to(torch.bfloat16)
    assert samples[1].text[1].dtype == torch.float32  # --text-dtype: what is stored
    assert torch.equal(samples[1].text[1], enc.encode_unpadded(["second B"])[0].float())
    assert samples[0].negative_prompt == "blurry" and torch.equal(
        samples[0].negative, enc.encode_unpadded(["blurry"])[0]
    )


def test_switch_files_must_be_line_aligned(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("one\n")
    with pytest.raises(ValueError, match="a.txt has 2 lines but .*b.txt has 1"):
        main(["switch", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--output", str(tmp_path / "o"), "--quiet"])


@pytest.mark.skipif(not BENCHMARK.is_file(), reason="needs ../shared/benchmarks beside the repository")
def test_memflow_benchmark_round_trip(tmp_path: Path) -> None:
    urls = main(["benchmark", str(BENCHMARK), "--output", str(tmp_path), "--samples-per-shard", "40", *TINY])
    samples = read_all(urls)
    records = [json.loads(line) for line in BENCHMARK.read_text().splitlines() if line.strip()]
    assert len(samples) == len(records) == 100
    for s, r in zip(samples, records, strict=True):
        assert s.prompts == r["prompts"] and len(s.prompts) == 6
        assert s.switch_frames == [40, 80, 120, 160, 200] and s.num_frames == 240
        assert [t.shape[0] for t in s.text] == [64] * 6  # benchmark prompts are longer than 64 byte tokens


def test_narrative_lines_must_hold_prompts(tmp_path: Path) -> None:
    (tmp_path / "n.jsonl").write_text('{"prompts": ["a"]}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="n.jsonl line 2: expected a JSON object with a prompts list"):
        main(["narratives", str(tmp_path / "n.jsonl"), "--output", str(tmp_path / "o"), "--quiet"])


def _clip(colour: list[int], frames: int = 11) -> torch.Tensor:
    video = torch.zeros(frames, 24, 40, 3, dtype=torch.uint8)
    for t in range(frames):
        video[t, 4:14, 2 + 2 * t : 12 + 2 * t] = torch.tensor(colour, dtype=torch.uint8)
    return video


def test_video_folder_round_trip_skips_unusable_videos(tmp_path: Path) -> None:
    src = tmp_path / "videos"
    (src / "sub").mkdir(parents=True)
    (src / "a.mp4").write_bytes(encode_mp4(_clip([220, 30, 30])))
    (src / "a.txt").write_text("a red box slides right\n")
    (src / "sub" / "b.mp4").write_bytes(encode_mp4(_clip([30, 30, 220])))
    (src / "sub" / "b.txt").write_text("a blue box slides right")
    (src / "broken.mp4").write_bytes(b"\x00" * 100)
    (src / "broken.txt").write_text("unreadable")
    (src / "uncaptioned.mp4").write_bytes(encode_mp4(_clip([30, 220, 30])))
    args = ["videos", str(src), "--output", str(tmp_path / "out"), "--vae", "tiny", "--height", "16", "--width", "16"]
    with pytest.warns(UserWarning) as caught:
        urls = main([*args, "--keep-video", "--latent-dtype", "float32", *TINY])
    messages = " ".join(str(w.message) for w in caught)
    assert "broken: cannot read its video" in messages and "uncaptioned: has no prompt" in messages
    samples = read_all(urls, ("text", "latents", "video"))
    assert [(s.key, s.prompts) for s in samples] == [
        ("a", ["a red box slides right"]),
        ("sub__b", ["a blue box slides right"]),
    ]
    frames = read_video(src / "a.mp4", size=(16, 16))[:9]  # 11 frames -> the longest 1 + 4k prefix
    assert samples[0].num_frames == 3 and samples[0].latents.shape == (4, 3, 2, 2)
    torch.testing.assert_close(samples[0].latents, WanVAE.tiny(z_dim=4).encode(frames)[0])
    assert samples[0].video.shape == (9, 16, 16, 3)
    assert (samples[0].video.float() - frames.float()).abs().mean() < 8  # stored clip = the encoded frames
    assert samples[0].info == {"source": "a.mp4", "fps": 16.0}  # the rate of the stored frames


def test_read_video_resamples_and_crops(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    path.write_bytes(encode_mp4(_clip([200, 200, 200], frames=32), fps=32))
    assert read_video(path).shape == (32, 24, 40, 3)
    assert read_video(path, fps=16).shape == (16, 24, 40, 3)
    assert read_video(path, fps=16, size=(16, 16), max_frames=5).shape == (5, 16, 16, 3)
    assert decode_mp4(path.read_bytes()).shape == (32, 24, 40, 3)


def _items(n: int) -> list[Item]:
    return [Item(f"{i:04d}", [f"prompt number {i}"], num_frames=3) for i in range(n)]


class Interrupt(KeyboardInterrupt):
    pass


def _interrupted(items: list[Item], after: int):
    for i, item in enumerate(items):
        if i == after:
            raise Interrupt
        yield item


def test_interrupted_preparation_resumes_to_identical_shards(tmp_path: Path) -> None:
    enc = Encoders(text=WanTextEncoder.tiny(d_model=8), batch_size=2)
    options = {"source": "test"}
    reference = prepare(_items(11), ShardSink(str(tmp_path / "ref"), options, max_samples=3), enc, progress=False)
    assert reference == f"{tmp_path}/ref/shard-{{000000..000003}}.tar"

    out = str(tmp_path / "run")
    with pytest.raises(Interrupt):
        prepare(_interrupted(_items(11), after=9), ShardSink(out, options, max_samples=3), enc, progress=False)
    progress = json.loads((tmp_path / "run" / "shard-progress.json").read_text())
    assert [s["items"] for s in progress["shards"]] == [[0, 3], [3, 6]] and not progress["done"]
    assert (tmp_path / "run" / "shard-000002.tar.partial").exists()  # never visible under the final name

    encoded: list[str] = []
    counting = Encoders(text=enc.text, batch_size=2)
    original = counting.text.encode_unpadded
    counting.text.encode_unpadded = lambda prompts, *a: encoded.extend(prompts) or original(prompts, *a)
    urls = prepare(_items(11), ShardSink(out, options, max_samples=3), counting, progress=False)
    assert encoded == [f"prompt number {i}" for i in range(6, 11)]  # finished shards are not redone
    assert urls == f"{out}/shard-{{000000..000003}}.tar"
    for i in range(4):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert prepare(_items(11), ShardSink(out, options, max_samples=3), enc, progress=False) == urls  # done: no-op


def test_resuming_with_other_options_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a\nb\n")
    main(["prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o"), "--quiet"])
    with pytest.raises(ValueError, match="other options \\(text_encoder\\)"):
        main(["prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o"), "--quiet", "--text-encoder", "tiny"])
    main(
        [
            "prompts",
            str(tmp_path / "p.txt"),
            "--output",
            str(tmp_path / "o"),
            "--quiet",
            "--text-encoder",
            "tiny",
            "--overwrite",
        ]
    )


def test_shards_roll_over_by_size(tmp_path: Path) -> None:
    sink = ShardSink(str(tmp_path), {}, max_samples=100, max_bytes=parse_size("1K"))
    for i in range(4):
        sink.write(i, Sample(f"{i}", ["p"], text=[torch.zeros(100, 4)]))  # 1.6 KB of embeddings each
    assert sink.close() == f"{tmp_path}/shard-{{000000..000003}}.tar"
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["0.json", f"0.{FIELD_MEMBERS['text']}"]


def test_remote_outputs_need_a_local_progress_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not local"):
        ShardSink("pipe:cat > /dev/null # %06d", {})
    sink = ShardSink(f"pipe:cat > {tmp_path}/r-%06d.tar", {}, max_samples=1, progress=str(tmp_path / "p.json"))
    for i in range(2):
        sink.write(i, Sample(f"{i}", ["p"]))
    sink.close()
    assert [s.key for s in read_all(f"{tmp_path}/r-{{000000..000001}}.tar", ())] == ["0", "1"]


@pytest.mark.parametrize(("text", "size"), [("4096", 4096), ("500M", 500 << 20), ("1.5GB", 3 << 29), ("2k", 2048)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="cannot read 'lots'"):
        parse_size("lots")


def test_brace_pattern() -> None:
    assert brace_pattern("d/x-%06d.tar", 12) == "d/x-{000000..000011}.tar"
    assert brace_pattern("d/x-%06d.tar", 1) == "d/x-000000.tar"


@pytest.mark.parametrize("source", ["prompts", "switch", "narratives", "benchmark", "videos"])
def test_every_command_has_help(source: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([source, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--output" in out and "--text-encoder" in out and "--samples-per-shard" in out


def test_prompts_longer_than_text_len_are_not_cut_silently(tmp_path: Path) -> None:
    long = "a red circle rolls slowly to the left across a grey floor"
    (tmp_path / "p.txt").write_text(f"{long}\nshort\n{long}\n")
    args = ["prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "out")]
    with pytest.warns(PromptTruncatedWarning, match=r"prompt of \d+ tokens cut to text_len=16") as record:
        main([*args, "--text-encoder", "tiny", "--tiny-text-dim", "8", "--text-len", "16", "--quiet"])
    assert len([w for w in record if w.category is PromptTruncatedWarning]) == 1  # once per prompt
    encoder = WanTextEncoder.tiny(d_model=8, text_len=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        encoder([long, "short"])  # fits: no warning


def test_video_sizes_the_transformer_cannot_take_are_refused(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    args = ["videos", str(tmp_path / "v"), "--output", str(tmp_path / "o"), "--vae", "tiny", *TINY]
    with pytest.raises(SystemExit, match=r"multiples of 16 .*got 40x40"):
        main([*args, "--height", "40", "--width", "40"])


@pytest.mark.parametrize(
    "source, option, message",
    [
        ("prompts", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ("prompts", ["--samples-per-shard", "0"], "--samples-per-shard must be >= 1, got 0"),
        ("prompts", ["--seed", "-1"], "--seed must be >= 0, got -1"),
        ("prompts", ["--tiny-text-dim", "0"], "--tiny-text-dim must be >= 1, got 0"),
        ("narratives", ["--frames-per-prompt", "0"], "--frames-per-prompt must be >= 1, got 0"),
        ("videos", ["--fps", "0"], "--fps must be > 0, got 0.0"),  # was replaced by 16 (0 is falsy)
        ("videos", ["--fps", "nan"], "--fps must be finite"),
        ("videos", ["--max-frames", "0"], "--max-frames must be >= 1, got 0"),
        ("videos", ["--min-latent-frames", "0"], "--min-latent-frames must be >= 1, got 0"),
    ],
)
def test_option_values_that_cannot_be_honoured_are_refused_before_work(
    tmp_path: Path, source: str, option: list[str], message: str
) -> None:
    (tmp_path / "in.txt").write_text("a red circle\n")
    (tmp_path / "v").mkdir()
    where = str(tmp_path / ("v" if source == "videos" else "in.txt"))
    with pytest.raises(SystemExit, match=message):
        main([source, where, "--output", str(tmp_path / "o"), "--quiet", *option])
    assert not (tmp_path / "o").exists()


def test_clips_that_lose_frames_or_are_too_short_warn(tmp_path: Path) -> None:
    src = tmp_path / "videos"
    src.mkdir()
    for name, frames in (("long", 45), ("ten", 10), ("five", 5), ("three", 3)):
        (src / f"{name}.mp4").write_bytes(encode_mp4(_clip([200, 40, 40], frames=frames)))
        (src / f"{name}.txt").write_text(f"a {name} clip")
    args = ["videos", str(src), "--output", str(tmp_path / "o"), "--vae", "tiny", "--height", "16", "--width", "16"]
    with pytest.warns(DroppedFramesWarning) as caught:
        urls = main([*args, "--latent-dtype", "float32", *TINY])
    messages = sorted(str(w.message) for w in caught if w.category is DroppedFramesWarning)
    assert any(m.startswith("ten: 10 frames") and "dropping 1" in m for m in messages)
    assert any(m.startswith("three: 3 frames") and "dropping 2" in m for m in messages)
    assert any(m.startswith("five: 5 frames give only 2 latent frames") for m in messages)
    assert any(m.startswith("three: 3 frames give only 1 latent frames") for m in messages)
    assert not any(m.startswith("long") for m in messages)  # 45 = 1 + 4 * 11: nothing lost, 12 latent frames
    frames = {s.key: s.latents.shape[1] for s in read_all(urls, ("text", "latents"))}
    assert frames == {"five": 2, "long": 12, "ten": 3, "three": 1}


def test_an_empty_source_is_an_error_and_a_changed_source_is_not_resumed(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("")
    out = ["--output", str(tmp_path / "o"), "--quiet"]
    with pytest.raises(SystemExit, match="holds no items"):
        main(["prompts", str(prompts), *out])
    assert not (tmp_path / "o" / "shard-progress.json").exists()
    prompts.write_text("a\nb\n")
    main(["prompts", str(prompts), *out])
    prompts.write_text("a\nb\nc\n")  # appended after the run finished
    with pytest.raises(ValueError, match="the source changed since this progress file was written"):
        main(["prompts", str(prompts), *out])
    urls = main(["prompts", str(prompts), *out, "--overwrite"])
    assert [s.prompts for s in read_all(urls, ())] == [["a"], ["b"], ["c"]]
