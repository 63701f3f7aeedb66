"""The generation command on tiny models: narratives, streaming decode, mp4 output, switches, bounded memory."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import av
import pytest
import torch

from memflow_train.benchmarks.tensor_memory import PeakTensorMemory
from memflow_train.checks import IgnoredSettingWarning
from memflow_train.generation import Mp4Writer, StreamingVideoPipeline, read_narratives
from memflow_train.generation.build import recipe_from_config, with_memory_flags
from memflow_train.generation.cli import main
from memflow_train.generation.narrative import Narrative, narrative_from_record
from memflow_train.memory import NAM, MemoryFree, MemoryPolicy
from memflow_train.memory.policy import plain_policy
from memflow_train.models.causal_wan import CausalWanTransformer
from memflow_train.models.presets import wan_config
from memflow_train.models.text_encoder import WanTextEncoder
from memflow_train.models.vae import WanVAE
from memflow_train.rollout import StreamingGenerator
from memflow_train.sampling import FlowMatchSchedule, seeded

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
TEXT_DIM, Z_DIM = 16, 4  # the tiny preset's text_dim and in_channels


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the demo data / a Wan diffusers folder: text_encoder/, tokenizer/, vae/."""
    root = tmp_path_factory.mktemp("models")
    WanTextEncoder.tiny(d_model=TEXT_DIM, text_len=32).save_pretrained(root)
    WanVAE.tiny(z_dim=Z_DIM).save_pretrained(root)
    return root


def _pipeline(models: Path, memory: MemoryPolicy, latent_size=(4, 4)) -> StreamingVideoPipeline:
    torch.manual_seed(0)
    model = CausalWanTransformer(**wan_config("tiny")).eval()
    sampler = StreamingGenerator(model, FlowMatchSchedule(5.0), [1000, 750, 500, 250], memory)
    text = WanTextEncoder.from_pretrained(models, text_len=32, dtype=torch.float32)
    return StreamingVideoPipeline(sampler, text, WanVAE.from_pretrained(models), latent_size)


def _read(path: Path) -> torch.Tensor:
    with av.open(str(path)) as c:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(c.streams.video[0])])


DEMO_MEMORY = NAM(bank_size=2, record_interval=1, local_attn_size=6, sma=True, sma_topk=2)


# ----------------------------------------------------------------------------------- narratives


def test_narrative_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "n.jsonl"
    jsonl.write_text(
        '{"prompts": ["a", "b", "c"]}\n\n'
        '{"prompts": ["a", "b"], "switch_frames": [9], "num_frames": 15}\n'
        '{"prompts": ["a", "b"], "segment_frames": [6, 12]}\n'
    )
    plain, switched, segments = read_narratives(jsonl, frames_per_prompt=40)
    assert (plain.switch_frames, plain.num_frames) == ((40, 80), 120)  # MemFlow's benchmark layout
    assert (switched.switch_frames, switched.num_frames) == ((9,), 15)
    assert (segments.switch_frames, segments.num_frames) == ((6,), 18)
    text = tmp_path / "n.txt"
    text.write_text("x\ny\n\nz\n")
    (even,) = read_narratives(text, num_frames=30)  # one narrative, --num-frames split evenly
    assert even.prompts == ("x", "y", "z") and even.switch_frames == (10, 20) and even.num_frames == 30


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompts": ["a", "b"], "switch_frames": [12], "num_frames": 12}', "increase strictly"),
        ('{"prompts": ["a", "b"], "switch_frames": [3, 6], "num_frames": 12}', "need 1 switch frames"),
        ('{"prompts": []}', "non-empty prompts"),
        ('{"prompts": ["a", " "], "num_frames": 6}', "non-empty strings"),
        ('{"prompts": ["a"]}', "fixes no length"),
        ("not json", "not JSON"),
    ],
)
def test_narrative_errors(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_narratives(path)


def test_memory_flags() -> None:
    base = NAM(bank_size=2, sma=True)
    assert with_memory_flags(base, "off", bank_size=None).enabled is False
    on = with_memory_flags(base, "on", sink_size=1)
    assert on.enabled and not on.sma and on.sink_size == 1 and on.bank_size == 2
    assert with_memory_flags(NAM(), "sma", sma_topk=2).sma_topk == 2
    assert recipe_from_config(DEMO).memory == DEMO_MEMORY
    with warnings.catch_warnings():  # --memory on: the recipe's SMA options are idle, back to their defaults
        warnings.simplefilter("error")
        on = with_memory_flags(NAM(bank_size=2, sma=True, sma_topk=1, sma_include_sink=False), "on")
    assert on == NAM(bank_size=2)
    with pytest.warns(IgnoredSettingWarning, match="memory.sma=True is not used: NAM never reads it when bank_size"):
        with_memory_flags(NAM(bank_size=0), "sma")  # asked for, idle: said


# ----------------------------------------------------------------------------------- decoding, writing


def test_streaming_decoder_equals_whole_video_decode() -> None:
    vae = WanVAE.tiny(z_dim=Z_DIM)
    latents = torch.randn(1, Z_DIM, 9, 4, 6)
    decoder = vae.streaming_decoder()
    pieces = [decoder.decode(latents[:, :, s : s + 3]) for s in range(0, 9, 3)]
    assert [p.shape[2] for p in pieces] == [9, 12, 12]  # 1 + 4 * (3 - 1), then 4 per latent frame
    torch.testing.assert_close(torch.cat(pieces, 2), vae.decode(latents), rtol=0, atol=1e-6)


def test_mp4_writer_streams_and_publishes(tmp_path: Path) -> None:
    frames = torch.randint(0, 255, (5, 16, 24, 3), dtype=torch.uint8)
    with Mp4Writer(tmp_path / "v.mp4", 16, 24) as w:
        w.write(frames[:2])
        w.write(frames[2:])
        assert not (tmp_path / "v.mp4").exists()  # published on close only
    assert _read(tmp_path / "v.mp4").shape == (5, 16, 24, 3) and not (tmp_path / "v.mp4.partial").exists()
    with pytest.raises(ValueError, match="uint8 frames"):
        Mp4Writer(tmp_path / "w.mp4", 16, 24).write(frames[:, :8])
    with pytest.raises(RuntimeError), Mp4Writer(tmp_path / "x.mp4", 16, 24) as w:
        raise RuntimeError("interrupted")
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.mp4.partial").exists()
    with pytest.raises(ValueError, match="even frame size"):
        Mp4Writer(tmp_path / "y.mp4", 15, 24)


# ----------------------------------------------------------------------------------- the pipeline


def test_chunks_equal_one_rollout_and_switch_at_the_given_frame(models: Path) -> None:
    """Chunk-by-chunk generation is the sampler's one-shot rollout of the same noise; the second prompt
    takes over at its switch frame: earlier frames equal a single-prompt video, later ones differ."""
    pipe = _pipeline(models, DEMO_MEMORY)
    narrative = Narrative(("a red ball", "a blue cube"), (9,), 18)
    chunks = list(pipe.chunks(narrative, seed=3))
    latents = torch.cat([c.latents for c in chunks], 2)
    assert [c.prompt_index for c in chunks] == [0, 0, 0, 1, 1, 1]
    assert [c.start_frame for c in chunks] == [0, 3, 6, 9, 12, 15]

    noise_rng = seeded(3, "noise")
    noise = torch.cat([torch.randn(1, Z_DIM, 3, 4, 4, generator=noise_rng) for _ in chunks], 2)
    reference = pipe.sampler.rollout(
        pipe.sampler.new_stream(), noise, pipe.prompt_schedule(narrative), generator=seeded(3, "steps")
    )
    torch.testing.assert_close(latents, reference, rtol=0, atol=0)

    single = torch.cat([c.latents for c in pipe.chunks(Narrative(("a red ball",), (), 18), seed=3)], 2)
    torch.testing.assert_close(single[:, :, :9], latents[:, :, :9], rtol=0, atol=0)
    assert (single[:, :, 9:] - latents[:, :, 9:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3


def test_switch_inside_a_chunk_starts_at_the_next_chunk(models: Path) -> None:
    pipe = _pipeline(models, DEMO_MEMORY)
    chunks = list(pipe.chunks(Narrative(("a", "b"), (4,), 9), seed=0))
    assert [c.prompt_index for c in chunks] == [0, 0, 1]


def test_whole_chunks_required(models: Path) -> None:
    with pytest.raises(ValueError, match="whole number of 3-frame chunks"):
        list(_pipeline(models, DEMO_MEMORY).chunks(Narrative(("a",), (), 10)))


@pytest.mark.parametrize("memory", [DEMO_MEMORY, replace(DEMO_MEMORY, sma=False), MemoryFree()])
def test_peak_memory_does_not_grow_with_length(models: Path, tmp_path: Path, memory: MemoryPolicy) -> None:
    """Tensor memory at its peak is the same for a video 3x longer (a sink keeping the frames would grow)."""
    pipe = _pipeline(models, memory, latent_size=(2, 2))

    def peak(chunks: int, sink) -> int:
        with PeakTensorMemory() as m:
            pipe.generate(Narrative(("a", "b"), (6,), 3 * chunks), sink)
        return m.peak_bytes

    short = peak(5, Mp4Writer(tmp_path / "short.mp4", 16, 16))
    long = peak(15, Mp4Writer(tmp_path / "long.mp4", 16, 16))
    assert long <= short, (short, long)

    class Hoard(list):  # the oracle that the measurement sees growth: keep every frame
        def write(self, frames: torch.Tensor) -> None:
            self.append(frames.clone())

        def close(self) -> None:
            pass

    hoard = Hoard()
    grown = peak(15, hoard)
    assert grown - long >= sum(f.nbytes for f in hoard) * 0.9


# ----------------------------------------------------------------------------------- the command


def test_command_writes_the_video(models: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    narratives = tmp_path / "story.jsonl"
    narratives.write_text(
        json.dumps({"prompts": ["a red ball", "a blue cube", "a green star"], "switch_frames": [6, 12]})
        + "\n"
        + json.dumps({"prompts": ["a yellow ring"]})
        + "\n"
    )
    out = tmp_path / "videos"
    args = [str(narratives), "--config", str(DEMO), "--text-encoder", str(models), "--output", str(out)]
    stats = main([*args, "--num-frames", "18", "--height", "48", "--width", "32", "--no-progress"])
    for i, s in enumerate(stats):
        video = _read(out / f"{i:04d}.mp4")
        assert video.shape == (1 + 4 * (18 - 1), 48, 32, 3) and s.video_frames == video.shape[0]
        assert 0 < s.transformer_s < s.total_s and s.transformer_fps > s.end_to_end_fps > 0
    info = json.loads((out / "0000.json").read_text())
    assert info["prompt_start_latent_frames"] == [0, 6, 12]
    assert info["prompt_start_video_frames"] == [0, 21, 45]  # latent frame f starts at video frame 4f - 3
    assert info["memory"]["class_path"] == "memflow_train.memory.nam.NAM"
    assert info["memory"]["init_args"]["sma"] and info["memory"]["init_args"]["bank_size"] == 2  # demo.yaml's
    assert "Loading weights" not in capfd.readouterr().err  # transformers' per-load bar is not shown


def test_command_checkpoint_and_memory_flags(models: Path, tmp_path: Path) -> None:
    """--checkpoint loads the weights the config would build; --memory off changes the generation."""
    torch.manual_seed(0)
    recipe = recipe_from_config(DEMO)
    recipe.generator.build().save_pretrained(tmp_path / "generator")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\na blue cube\n")
    common = [str(prompts), "--text-encoder", str(models), "--num-frames", "24", "--no-progress"]
    main([*common, "--config", str(DEMO), "--output", str(tmp_path / "config.mp4")])
    main([*common, "--checkpoint", str(tmp_path / "generator"), "--height", "32", "--width", "32",
          "--bank-size", "2", "--record-interval", "1", "--local-attn-size", "6", "--memory", "sma",
          "--sma-topk", "2", "--output", str(tmp_path / "ckpt.mp4")])  # fmt: skip
    main([*common, "--config", str(DEMO), "--memory", "off", "--output", str(tmp_path / "off.mp4")])
    config, ckpt, off = (_read(tmp_path / f"{n}.mp4") for n in ("config", "ckpt", "off"))
    assert torch.equal(config, ckpt)
    assert config.shape == off.shape == (93, 32, 32, 3) and not torch.equal(config, off)
    assert json.loads((tmp_path / "off.json").read_text())["memory"]["class_path"].endswith(".MemoryFree")


def test_command_errors(models: Path, tmp_path: Path) -> None:
    two = tmp_path / "two.jsonl"
    two.write_text('{"prompts": ["a"]}\n{"prompts": ["b"]}\n')
    base = [str(two), "--config", str(DEMO), "--text-encoder", str(models)]
    with pytest.raises(SystemExit, match="must be a folder"):
        main([*base, "--output", str(tmp_path / "x.mp4"), "--num-frames", "6"])
    with pytest.raises(SystemExit, match="outside the 2 narratives"):
        main([*base, "--output", str(tmp_path / "x.mp4"), "--num-frames", "6", "--index", "5"])
    with pytest.raises(ValueError, match="fixes no length"):
        main([*base, "--output", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="whole number"):
        main([*base, "--output", str(tmp_path / "x"), "--num-frames", "7"])
    with pytest.raises(SystemExit, match=r"multiples of 16 \(VAE stride 8 x patch 2\), got 40x32"):
        main([*base, "--output", str(tmp_path / "x"), "--num-frames", "6", "--height", "40", "--width", "32"])
    with pytest.raises(ValueError, match="pass --text-encoder"):
        main([str(two), "--config", str(DEMO), "--output", str(tmp_path / "x"), "--num-frames", "6"])


def test_command_takes_settings_from_a_lightning_checkpoint(models: Path, tmp_path: Path) -> None:
    """A training checkpoint alone gives the generator (EMA weights), its memory and its latent size."""
    from tests.method_helpers import dmd_module, fit

    memory = NAM(record_interval=1, bank_size=2, sma=True, sma_topk=1)
    module = dmd_module(memory=memory, ema_decay=0.5, ema_start_step=0, latent_size=(2, 4))
    fit(module, steps=1).save_checkpoint(tmp_path / "last.ckpt")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\n")
    (stats,) = main([str(prompts), "--checkpoint", str(tmp_path / "last.ckpt"), "--text-encoder", str(models),
                     "--num-frames", "9", "--output", str(tmp_path / "v.mp4"), "--no-progress"])  # fmt: skip
    assert _read(tmp_path / "v.mp4").shape == (stats.video_frames, 16, 32, 3) == (33, 16, 32, 3)
    assert json.loads((tmp_path / "v.json").read_text())["memory"] == plain_policy(memory)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--timestep-shift", "0"], "--timestep-shift must be > 0"),
        (["--timestep-shift", "nan"], "--timestep-shift must be finite"),
        (["--fps", "nan"], "--fps must be finite"),
        (["--fps", "0"], "--fps must be > 0"),
        (["--crf", "60"], "--crf must be >= 0 and <= 51"),
        (["--height", "0"], "--height must be >= 1"),
        (["--text-len", "0"], "--text-len must be >= 1"),
        (["--frames-per-prompt", "0"], "--frames-per-prompt must be >= 1"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--index", "0", "0"], "names a narrative twice"),
    ],
)
def test_command_refuses_option_values_it_cannot_honour(
    models: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    """Each of these used to be replaced by a default (0 is falsy) or passed on unchecked."""
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompts": ["a"]}\n')
    base = [str(one), "--config", str(DEMO), "--text-encoder", str(models), "--output", str(tmp_path / "x")]
    with pytest.raises(SystemExit, match=message):
        main([*base, "--num-frames", "6", *flags])


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompts": ["a", "b", "c", "d", "e"], "num_frames": 12}, "prompt 4 .* would condition no chunk"),
        ({"prompts": ["a", "b"], "switch_frames": [10], "num_frames": 12}, "prompt 1 .* the video ends"),
        ({"prompts": ["a", "b", "c"], "switch_frames": [4, 5], "num_frames": 12}, "prompt 1 .* next prompt"),
    ],
)
def test_prompts_that_would_never_take_effect_are_refused(models: Path, record: dict, message: str) -> None:
    """A switch takes effect at the next 3-frame chunk; a prompt that gets no chunk is an error, not None."""
    (narrative,) = [narrative_from_record(record, None, None, "n.jsonl line 1")]
    with pytest.raises(ValueError, match=message):
        _pipeline(models, DEMO_MEMORY).check(narrative)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompts": ["a", "b"], "switch_frames": [4.5], "num_frames": 12}, "switch_frames must be an integer"),
        ({"prompts": ["a", "b"], "segment_frames": [6, 6.5]}, "segment_frames must be an integer"),
        ({"prompts": ["a"], "num_frames": "12"}, "num_frames must be an integer"),
    ],
)
def test_narrative_numbers_are_not_truncated(record: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        narrative_from_record(record, None, None, "n.jsonl line 1")


def test_median_chunk_fps_ignores_the_first_chunk_and_one_slow_outlier() -> None:
    from memflow_train.generation.pipeline import GenerationStats

    stats = GenerationStats(chunk_transformer_s=[10.0, 1.0, 1.0, 100.0, 1.0], chunk_video_frames=[9, 12, 12, 12, 12])
    assert stats.median_chunk_fps == 12.0
    assert GenerationStats(chunk_transformer_s=[1.0], chunk_video_frames=[9]).median_chunk_fps != 12.0  # nan
