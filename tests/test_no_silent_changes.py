"""Issue 14 A, settings and options: a value the program cannot honour exactly is refused or warned about,
naming it; never rounded, dropped or replaced without a word. One section per instance the audit found."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from callbacks.evaluate import main as evaluate_main
from callbacks.long_video import LongVideoEvaluation
from data.datamodule import ShardDataModule
from memflow_train.benchmarks import attention_backends, bank_exposure, cost_growth, dmd_step, memory_overhead
from memflow_train.checks import IgnoredSettingWarning
from memflow_train.cli import MemflowCLI
from memflow_train.cli import run as train_run
from memflow_train.evaluation.features import FeatureModelSpec
from memflow_train.export import main as export_main
from memflow_train.generation.build import Recipe, load_generator, load_text_encoder, with_memory_flags
from memflow_train.generation.cli import main as generate_main
from memflow_train.memory import NAM
from memflow_train.methods.specs import BackboneSpec, TextEncoderSpec
from memflow_train.models.loading import load_transformer
from memflow_train.models.text_encoder import WanTextEncoder

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"

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


# ----------------------------------------------------------------------------------- memory settings


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bank_size": -4}, "memory.bank_size must be >= 0, got -4"),
        ({"record_interval": 0}, "memory.record_interval must be >= 1, got 0"),
        ({"sma": False, "sma_topk": 0}, "memory.sma_topk must be >= 1, got 0"),
    ],
)
def test_memory_ranges_hold_whatever_the_mode(settings: dict, message: str) -> None:
    """A memory-free config skipped every range check, so a later --memory on met bank_size -4."""
    with pytest.raises(ValueError, match=message):
        NAM(**settings)


@pytest.mark.parametrize(
    ("mode", "knobs", "message"),
    [
        ("off", {"bank_size": 4, "record_interval": 2}, r"--bank-size 4, --record-interval 2: no effect, the memory "
         r"is off \(--memory off\); drop them or pass --memory on, --memory sma or another policy that reads them"),
        ("on", {"sma_topk": 1}, r"--sma-topk 1: no effect, SMA is off \(--memory on\); drop them or pass --memory sma"),
        (None, {"sma_include_sink": False}, r"--sma-include-sink False: no effect, SMA is off \(the recipe's memory"),
        ("off", {"prototype": "relevance_merge"}, "--prototype relevance_merge: no effect"),
    ],
)  # fmt: skip
def test_memory_flags_the_mode_does_not_read_are_refused(mode: str | None, knobs: dict, message: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredSettingWarning)  # the refusal says it once, without a warning first
        with pytest.raises(ValueError, match=message):
            with_memory_flags(NAM(), mode, **knobs)
    assert with_memory_flags(NAM(), "off", sink_size=1, recache="joint").sink_size == 1  # still read


@pytest.mark.parametrize(
    ("mode", "knobs", "message"),
    [
        ("on", {"bank_size": -1}, r"--bank-size must be >= 0, got -1"),
        ("memflow_train.memory.SlowFastMemory", {"slow_size": 2, "surprise_threshold": -0.5}, "--surprise-threshold"),
        ("memflow_train.memory.SurpriseGatedBank", {"read_topk": 3}, r"--read-topk \(3\) must be below bank_size"),
    ],
)
def test_a_bad_memory_knob_is_named_as_the_flag_the_user_typed(mode: str, knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        with_memory_flags(NAM(), mode, **knobs)


def test_generation_refuses_memory_flags_before_loading_models(tmp_path: Path) -> None:
    (tmp_path / "n.txt").write_text("a\n")
    args = [str(tmp_path / "n.txt"), "--config", str(DEMO), "--output", str(tmp_path / "o"), "--num-frames", "6"]
    with pytest.raises(ValueError, match="--bank-size -4, --record-interval 0: no effect, the memory is off"):
        generate_main([*args, "--memory", "off", "--bank-size", "-4", "--record-interval", "0"])
    with pytest.raises(ValueError, match="--bank-size must be >= 0, got -4"):
        generate_main([*args, "--memory", "on", "--bank-size", "-4"])
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
        (["model", "init_args", "memory", "init_args"], "bank_sise", "model.init_args.memory.init_args.bank_size"),
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


def test_export_of_a_sample_predicting_network_warns_for_diffusers_and_round_trips(tmp_path: Path) -> None:
    """diffusers' WanTransformer3DModel drops prediction_type: its pipelines would read x0 as a flow. Our loader
    keeps it (the folder's and the single file's config), so the exported network returns the same flow."""
    from memflow_train.methods.specs import BackboneSpec
    from tests.method_helpers import dmd_module, fit

    spec = BackboneSpec(config={"prediction_type": "sample"})
    trainer = fit(dmd_module(generator=spec, teacher=spec), steps=1)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    with pytest.warns(UserWarning, match="predicts prediction_type 'sample'.*read the output as a flow"):
        export_main([str(tmp_path / "last.ckpt"), str(tmp_path / "folder"), "--live-weights"])
    export_main([str(tmp_path / "last.ckpt"), str(tmp_path / "one.safetensors"), "--live-weights"])
    x, t, text = torch.randn(1, 4, 3, 4, 4), torch.tensor([300.0]), torch.randn(1, 5, 16)
    with torch.no_grad():
        flows = [load_transformer(tmp_path / name).eval()(x, t, text) for name in ("folder", "one.safetensors")]
    assert load_transformer(tmp_path / "folder").config["prediction_type"] == "sample"
    with torch.no_grad():
        trained = trainer.lightning_module.generator.eval()(x, t, text)
        assert torch.equal(flows[0], trained) and torch.equal(flows[1], trained)


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


def test_bidirectional_flow_matching_names_the_memory_settings_it_does_not_read() -> None:
    """A bidirectional model (a teacher) reads the memory's chunk grid only and writes no cache."""
    from memflow_train.memory import MemoryFree, SurpriseGatedBank
    from memflow_train.methods import FlowMatchingFinetune

    tiny = {"preset": "tiny"}
    message = r"memory.bank_size=5, context_timestep=10.0 not used: bidirectional attention reads only memory.num_fr"
    with pytest.warns(IgnoredSettingWarning, match=message):
        FlowMatchingFinetune(model=tiny, attention="bidirectional", memory=NAM(bank_size=5), context_timestep=10.0)
    with pytest.warns(IgnoredSettingWarning, match="memory SurpriseGatedBank not used"):
        FlowMatchingFinetune(model=tiny, attention="bidirectional", memory=SurpriseGatedBank())
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredSettingWarning)
        FlowMatchingFinetune(model=tiny, attention="bidirectional", memory=MemoryFree(num_frame_per_block=2))
        FlowMatchingFinetune(model=tiny, attention="bidirectional")
        FlowMatchingFinetune(model=tiny, memory=NAM(bank_size=5), context_timestep=10.0)  # streaming reads them
