"""Issue 14 A: a value the program cannot honour exactly is refused or warned about, naming it; never rounded,
truncated, dropped or replaced without a word. One section per instance the audit found."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import av
import pytest
import torch
import yaml

from callbacks.evaluate import main as evaluate_main
from callbacks.long_video import LongVideoEvaluation
from data.datamodule import ShardDataModule
from data.format import SampleSpec, decode_sample
from data.prepare.__main__ import SkippedFilesWarning
from data.prepare.__main__ import main as prepare_main
from data.reading import expand_urls, iter_raw_samples
from data.video_io import FrameRateWarning, encode_mp4
from memflow_train.benchmarks import attention_backends, bank_exposure, cost_growth, dmd_step, memory_overhead
from memflow_train.checks import IgnoredSettingWarning
from memflow_train.cli import MemflowCLI
from memflow_train.cli import run as train_run
from memflow_train.evaluation.features import FeatureModelSpec
from memflow_train.evaluation.narratives import ChunkGridWarning, EvalNarrative, warn_off_grid
from memflow_train.export import main as export_main
from memflow_train.generation.build import Recipe, load_generator, load_text_encoder, with_memory_flags
from memflow_train.generation.cli import main as generate_main
from memflow_train.generation.mp4 import Mp4Writer
from memflow_train.generation.narrative import Narrative, narrative_from_record, read_narratives
from memflow_train.memory import MemoryConfig
from memflow_train.methods.specs import BackboneSpec, TextEncoderSpec
from memflow_train.models.loading import load_transformer
from memflow_train.models.text_encoder import PromptTruncatedWarning, WanTextEncoder

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _read_shards(urls: str) -> list:
    return [
        decode_sample(raw, SampleSpec(fields=()))
        for url in expand_urls(urls)
        for raw in iter_raw_samples(url, pytest.fail)
    ]


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


# ----------------------------------------------------------------------------------- memory settings


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"enabled": False, "bank_size": -4}, "memory.bank_size must be >= 1, got -4"),
        ({"enabled": False, "record_interval": 0}, "memory.record_interval must be >= 1, got 0"),
        ({"sma": False, "sma_topk": 0}, "memory.sma_topk must be >= 1, got 0"),
    ],
)
def test_memory_ranges_hold_whatever_the_mode(settings: dict, message: str) -> None:
    """A memory-free config skipped every range check, so a later --memory on met bank_size -4."""
    with pytest.raises(ValueError, match=message):
        MemoryConfig(**settings)


@pytest.mark.parametrize(
    ("mode", "knobs", "message"),
    [
        ("off", {"bank_size": 4, "record_interval": 2}, r"--bank-size 4, --record-interval 2: no effect, the memory "
         r"is off \(--memory off\); drop them or pass --memory on or sma"),
        ("on", {"sma_topk": 1}, r"--sma-topk 1: no effect, SMA is off \(--memory on\); drop them or pass --memory sma"),
        (None, {"sma_include_sink": False}, r"--sma-include-sink False: no effect, SMA is off \(the recipe's memory"),
        ("off", {"prototype": "relevance_merge"}, "--prototype relevance_merge: no effect"),
    ],
)  # fmt: skip
def test_memory_flags_the_mode_does_not_read_are_refused(mode: str | None, knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        with_memory_flags(MemoryConfig(), mode, **knobs)
    assert with_memory_flags(MemoryConfig(), "off", sink_size=1, recache="joint").sink_size == 1  # still read


def test_generation_refuses_memory_flags_before_loading_models(tmp_path: Path) -> None:
    (tmp_path / "n.txt").write_text("a\n")
    args = [str(tmp_path / "n.txt"), "--config", str(DEMO), "--output", str(tmp_path / "o"), "--num-frames", "6"]
    with pytest.raises(ValueError, match="memory.bank_size must be >= 1, got -4"):
        generate_main([*args, "--memory", "off", "--bank-size", "-4", "--record-interval", "0"])
    with pytest.raises(ValueError, match="--sma-topk 1: no effect, SMA is off"):
        generate_main([*args, "--memory", "on", "--sma-topk", "1"])


# ----------------------------------------------------------------------------------- generation's model flags


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("text")
    WanTextEncoder.tiny(d_model=16, text_len=32).save_pretrained(root)
    WanTextEncoder.tiny(d_model=16, vocabulary=["red", "ball"]).tokenizer.save_pretrained(root / "words")
    return root


def test_tokenizer_and_dtype_apply_to_the_configs_text_encoder(text_folder: Path) -> None:
    """With the text encoder from the config's spec, --tokenizer and --text-dtype were dropped."""
    recipe = Recipe(text_encoder=TextEncoderSpec(path=str(text_folder), text_len=32, dtype="float32"))
    cpu = torch.device("cpu")
    encoder = load_text_encoder(recipe, None, str(text_folder / "words"), None, torch.bfloat16, cpu)
    assert len(encoder.tokenizer) == 5 and next(encoder.parameters()).dtype == torch.bfloat16
    assert next(load_text_encoder(recipe, None, None, None, None, cpu).parameters()).dtype == torch.float32
    tiny = Recipe(text_encoder=TextEncoderSpec(tiny_d_model=8, text_len=16))
    assert next(load_text_encoder(tiny, None, None, None, torch.bfloat16, cpu).parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--tokenizer words: the config's text encoder is the tiny random one"):
        load_text_encoder(tiny, None, "words", None, None, cpu)


def test_a_checkpoint_key_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "n.txt").write_text("a\n")
    args = [str(tmp_path / "n.txt"), "--config", str(DEMO), "--output", str(tmp_path / "o"), "--num-frames", "6"]
    with pytest.raises(ValueError, match="--checkpoint-key generator_ema names an entry of --checkpoint, and no"):
        generate_main([*args, "--checkpoint-key", "generator_ema"])
    with pytest.raises(ValueError, match="--trust-checkpoint: no checkpoint is loaded"):
        generate_main([*args, "--trust-checkpoint"])


def test_a_checkpoint_names_the_config_weights_it_replaces(tmp_path: Path) -> None:
    spec = BackboneSpec(preset="tiny")
    spec.build().save_pretrained(tmp_path / "g")
    with_weights = BackboneSpec(preset="tiny", weights="elsewhere", lora_weights="lora.safetensors")
    with pytest.warns(IgnoredSettingWarning, match=r"replaces the config generator's weights elsewhere, lora_weights"):
        load_generator(with_weights, str(tmp_path / "g"), None, torch.float32, torch.device("cpu"))


# ----------------------------------------------------------------------------------- the shard data module


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"val_batch_size": 0}, "data.val_batch_size must be >= 1, got 0"),  # was replaced by batch_size (an `or`)
        ({"val_batch_size": -2}, "data.val_batch_size must be >= 1, got -2"),
        ({"text_len": 0}, "data.text_len must be >= 1, got 0"),
        ({"num_frames": 0}, "data.num_frames must be >= 1, got 0"),
        ({"num_frames": -3}, "data.num_frames must be >= 1, got -3"),
        ({"min_latent_frames": -1}, "data.min_latent_frames must be >= 1, got -1"),
        ({"max_consecutive_bad": 0}, "data.max_consecutive_bad must be >= 1, got 0"),
        ({"seed": -1}, "data.seed must be >= 0, got -1"),
        ({"shuffle_buffer": -5}, "data.shuffle_buffer must be >= 0, got -5"),
        ({"text_dim": 0}, "data.text_dim must be >= 1, got 0"),
        ({"latent_channels": 0}, "data.latent_channels must be >= 1, got 0"),
        ({"latent_size": (0, 0)}, "data.latent_size must be >= 1, got 0"),
        ({"latent_size": (4, 4, 4)}, r"data.latent_size must be \(height, width\)"),
        ({"batch_size": 2.5}, "data.batch_size must be an integer, got 2.5"),
        ({"dtype": "float64"}, "data.dtype must be float32, bfloat16 or float16"),
    ],
)
def test_the_shard_data_module_refuses_numbers_it_cannot_honour(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShardDataModule(train_urls="x.tar", **settings)
    assert ShardDataModule(train_urls="x.tar", batch_size=3).val_batch_size == 3  # None: the training batch size


# ----------------------------------------------------------------------------------- backbone and feature specs


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"eps": math.nan}, "config.eps must be finite, got nan"),
        ({"eps": -1}, "config.eps must be > 0, got -1"),
        ({"num_layers": 0}, "config.num_layers must be >= 1, got 0"),
        ({"num_layers": 2.5}, "config.num_layers must be an integer, got 2.5"),
        ({"rope_max_seq_len": -1}, "config.rope_max_seq_len must be >= 1, got -1"),
        ({"attention_head_dim": 13}, "config.attention_head_dim must be even"),
        ({"out_channels": 0}, "config.out_channels must be >= 1, got 0"),  # the model read 0 as in_channels
        ({"patch_size": [1, 2]}, r"config.patch_size must be \(frames, height, width\)"),
        ({"num_layer": 2}, r"unknown Wan config keys \['num_layer'\]"),
    ],
)
def test_backbone_config_overrides_are_checked(config: dict, message: str) -> None:
    """These built a model (or failed later with an unrelated error)."""
    with pytest.raises(ValueError, match=message):
        BackboneSpec(preset="tiny", config=config)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_size": 0}, "clip.batch_size must be >= 1, got 0"),
        ({"seed": -1}, "clip.seed must be >= 0, got -1"),
        ({"dtype": "float33"}, "unknown dtype 'float33'"),
    ],
)
def test_feature_model_numbers_are_checked(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureModelSpec(kind="clip", tiny=True, **settings)


def test_the_evaluation_refuses_denoising_steps_the_methods_sampler_overrides() -> None:
    """A DMD method generates with its sampler's steps; the callback's used to be dropped without a word."""
    from tests.method_helpers import dmd_module

    module = dmd_module(denoising_steps=(1000, 750, 500, 250))
    message = r"denoising_steps \[1000, 500\] differ from .*SelfForcingDMD's sampler \(\[1000, 750, 500, 250\]\)"
    with pytest.raises(ValueError, match=message):
        LongVideoEvaluation(denoising_steps=(1000, 500)).setup(None, module, "fit")
    LongVideoEvaluation(denoising_steps=(1000, 750, 500, 250))._check_denoising_steps(module)  # the same: fine


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


# ----------------------------------------------------------------------------------- benchmarks


TINY_BENCH = ["--preset", "tiny", "--num-layers", "1", "--text-len", "8"]


@pytest.mark.parametrize(
    ("main", "flags", "message"),
    [
        (attention_backends.main, ["--height", "100", "--width", "96"], r"--height must be a positive multiple of 16 "
         r"\(VAE stride 8 x patch 2\), got 100"),
        (attention_backends.main, ["--height", "4"], "--height must be a positive multiple of 16"),
        (attention_backends.main, ["--key-frames", "2", "--frames-per-chunk", "3"], r"--key-frames \[2\] fewer than "
         "--frames-per-chunk 3"),
        (attention_backends.main, ["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (memory_overhead.main, [*TINY_BENCH, "--width", "100"], "--width must be a positive multiple of 16"),
        (memory_overhead.main, [*TINY_BENCH, "--repeats", "0"], "--repeats must be >= 1, got 0"),
        (memory_overhead.main, [*TINY_BENCH, "--chunks", "-1"], "--chunks must be >= 0, got -1"),
        (cost_growth.main, [*TINY_BENCH, "--steps", "0"], "--steps must be >= 1, got 0"),
        (dmd_step.main, [*TINY_BENCH, "--height", "100"], "--height must be a positive multiple of 16"),
        (dmd_step.main, [*TINY_BENCH, "--prompt-tokens", "9"], "--prompt-tokens 9 exceeds --text-len 8"),
        (dmd_step.main, [*TINY_BENCH, "--repeats", "0"], "--repeats must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_benchmarks_refuse_what_they_cannot_measure(main, flags: list[str], message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        main(["--device", "cpu", *flags])


def test_bank_exposure_checks_the_configs_num_frames(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["model"]["init_args"]["num_frames"] = 12.5
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"c\.yaml: model\.init_args\.num_frames must be an integer, got 12\.5"):
        bank_exposure.main(["--config", str(tmp_path / "c.yaml")])


def test_benchmark_errors_are_one_line(tmp_path: Path) -> None:
    """--repeats 0 ended in a raw StatisticsError traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MEMFLOW_TRAIN_TRACEBACK", None)
    command = [sys.executable, "-m", "memflow_train.benchmarks.memory_overhead", *TINY_BENCH, "--repeats", "0"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.startswith("error: --repeats must be >= 1, got 0")


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


# ----------------------------------------------------------------------------------- resume


class _Parsed(Exception):
    pass


class _ParseOnly(MemflowCLI):
    """Stops after parsing and the resume check (before any model or data is built)."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed


@pytest.mark.parametrize("alias", ["last", "best"])
def test_resume_aliases_are_refused_for_a_path(alias: str) -> None:
    """Lightning resolves them after the settings check, which then never ran."""
    with pytest.raises(SystemExit, match=f"--ckpt_path {alias}: pass the checkpoint's path"):
        _ParseOnly(args=["fit", "--config", str(DEMO), "--ckpt_path", alias])
    with pytest.raises(SystemExit, match="--ckpt_path nowhere.ckpt: no such checkpoint"):
        _ParseOnly(args=["fit", "--config", str(DEMO), "--ckpt_path", "nowhere.ckpt"])


def test_max_skipped_updates_may_change_at_resume(tmp_path: Path) -> None:
    cli = MemflowCLI(args=["--config", str(DEMO)], run=False)
    hparams = {k: v for k, v in cli.model.hparams.items() if k != "_instantiator"}
    torch.save({"hyper_parameters": hparams}, tmp_path / "saved.ckpt")
    args = ["fit", "--config", str(DEMO), "--ckpt_path", str(tmp_path / "saved.ckpt")]
    with pytest.raises(_Parsed):
        _ParseOnly(args=[*args, "--model.init_args.max_skipped_updates=7"])
    with pytest.raises(SystemExit, match="seed: 0 in the checkpoint, 3 now"):
        _ParseOnly(args=[*args, "--model.init_args.seed=3"])


# ----------------------------------------------------------------------------------- did you mean, in config files


@pytest.mark.parametrize(
    ("section", "key", "suggestion"),
    [
        (["model", "init_args", "memory"], "bank_sise", "model.init_args.memory.bank_size"),
        (["model", "init_args", "generator_optimizer"], "lrr", "model.init_args.generator_optimizer.lr"),
        (["model", "init_args"], "num_frame", "model.init_args.num_frames"),
        (["trainer"], "max_step", "trainer.max_steps"),
        (["data", "init_args"], "batch_sise", "data.init_args.batch_size"),
    ],
)
def test_unknown_config_file_keys_get_a_did_you_mean(
    tmp_path: Path, section: list[str], key: str, suggestion: str
) -> None:
    """Only flags had one: a config file's bank_sise gave "Group 'memory' does not accept option 'bank_sise'"."""
    config = yaml.safe_load(DEMO.read_text())
    node = config
    for part in section:
        node = node[part]
    node[key] = 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        train_run(["fit", "--config", str(tmp_path / "c.yaml")])
    text = str(exit_.value.code)
    assert f"did you mean {suggestion} (in the config)?" in text, text
    assert key in text and len(text.splitlines()) <= 4 and "Traceback" not in text


# ----------------------------------------------------------------------------------- export


def test_export_takes_its_format_from_a_safetensors_name(tmp_path: Path) -> None:
    """Without --format, out.safetensors became a diffusers folder of that name."""
    from tests.method_helpers import dmd_module, fit

    fit(dmd_module(), steps=1).save_checkpoint(tmp_path / "last.ckpt")
    export_main([str(tmp_path / "last.ckpt"), str(tmp_path / "out.safetensors"), "--live-weights"])
    assert (tmp_path / "out.safetensors").is_file()
    assert load_transformer(tmp_path / "out.safetensors").config["num_layers"] == 2
    with pytest.raises(ValueError, match="--format diffusers writes a folder, but .*x.safetensors is named like"):
        export_main([str(tmp_path / "last.ckpt"), str(tmp_path / "x.safetensors"), "--format", "diffusers"])
    with pytest.raises(ValueError, match="--format safetensors writes one file: name it"):
        export_main([str(tmp_path / "last.ckpt"), str(tmp_path / "y"), "--format", "safetensors"])
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------------- training methods


def test_flow_matching_names_frames_past_the_last_chunk_and_unfollowed_prompts() -> None:
    """A 13-frame clip trained on 12 frames, and a multi-prompt sample without switch frames conditioned by its
    first prompt, said nothing."""
    from types import SimpleNamespace

    from memflow_train.methods import FlowMatchingFinetune

    module = FlowMatchingFinetune(model={"preset": "tiny"})
    g = torch.Generator().manual_seed(0)
    batch = SimpleNamespace(
        keys=["a", "b"],
        prompts=[["p", "q"], ["p", "q"]],
        latents=torch.randn(2, 4, 13, 4, 4, generator=g),
        num_frames=torch.tensor([13, 12]),
        segment_start=torch.tensor([[0, -1], [0, 6]]),
        prompt_embeds=torch.randn(2, 2, 6, 16, generator=g),
        prompt_mask=torch.ones(2, 2, 6, dtype=torch.bool),
    )
    with pytest.warns(UserWarning, match="a loses 1"):
        assert module._frames(batch)[1].tolist() == [4, 4]
    with pytest.warns(UserWarning, match="1 samples of a batch have several prompts but no switch frames"):
        _, _, starts = module._prompts(batch)
    assert starts[0, 1] == torch.iinfo(torch.long).max and starts[1].tolist() == [0, 6]  # b follows its narrative
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module._frames(batch)  # once per run


def test_stage_two_refuses_a_first_switch_past_the_sequence_and_names_unused_prompts() -> None:
    """min_switch_frame 35 with max_length 36 (3-frame chunks) drew switch frame 36 every time: no switch ever."""
    from memflow_train.methods import StreamingLongTuning
    from tests.method_helpers import dmd_module, prompt_batch

    with pytest.raises(ValueError, match=r"min_switch_frame \(35\) takes effect .* frame 36, which is not before"):
        dmd_module(StreamingLongTuning, max_length=36, frames_per_step=6, window=9, min_switch_frame=35)
    module = dmd_module(StreamingLongTuning)
    with pytest.warns(UserWarning, match="3 prompts and no switch frames fixed by the data"):
        module._start_sequence(prompt_batch(batch=2, prompts=3), 0)


def test_synthetic_narratives_refuse_a_negative_seed(tmp_path: Path) -> None:
    """--seed -5 wrote what --seed 5 writes (random.Random takes the absolute value)."""
    from data.synthetic.__main__ import main as synthetic_main

    with pytest.raises(SystemExit):
        synthetic_main(["narratives", "--out", str(tmp_path / "n.jsonl"), "--seed", "-5"])
    assert not (tmp_path / "n.jsonl").exists()
