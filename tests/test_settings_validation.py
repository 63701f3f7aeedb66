"""Every numeric setting is finite and in range, or refused before work starts, naming the setting."""

from __future__ import annotations

import math

import pytest

from memflow_train.checks import number, number_range, whole
from memflow_train.memory import NAM
from memflow_train.methods import FlowMatchingFinetune, SelfForcingDMD, StreamingLongTuning
from memflow_train.methods.specs import BackboneSpec, LoraSpec, OptimizerSpec, TextEncoderSpec
from memflow_train.sampling import FlowMatchSchedule

NAN, INF = math.nan, math.inf


def test_number_and_whole_follow_their_rules() -> None:
    assert number("x", 3, low=0) == 3.0
    assert whole("n", 4.0, low=1) == 4
    for bad in (NAN, INF, -INF, "1", None, True):
        with pytest.raises(ValueError, match="x must be"):
            number("x", bad)
    with pytest.raises(ValueError, match=r"x must be > 0, got 0"):
        number("x", 0, low=0, low_open=True)
    with pytest.raises(ValueError, match=r"x must be >= 0 and < 1, got 1"):
        number("x", 1, low=0, high=1, high_open=True)
    for bad in (2.7, NAN, True, "3"):
        with pytest.raises(ValueError, match="n must be an integer"):
            whole("n", bad)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        whole("n", 0, low=1)
    assert number_range("r", [20, 980], low=0, high=1000) == (20.0, 980.0)
    for bad in ([980, 20], [0, NAN], [1, 2, 3], 5):
        with pytest.raises(ValueError, match="r must"):
            number_range("r", bad, low=0, high=1000)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: OptimizerSpec(lr=NAN), "optimizer.lr"),
        (lambda: OptimizerSpec(lr=INF), "optimizer.lr"),
        (lambda: OptimizerSpec(lr=0.0), "optimizer.lr"),
        (lambda: OptimizerSpec(betas=(0.0, NAN)), "optimizer.betas"),
        (lambda: OptimizerSpec(betas=(0.0, 1.0)), "optimizer.betas"),
        (lambda: OptimizerSpec(betas=(0.9,)), "optimizer.betas"),
        (lambda: OptimizerSpec(weight_decay=-0.1), "optimizer.weight_decay"),
        (lambda: OptimizerSpec(weight_decay=INF), "optimizer.weight_decay"),
        (lambda: OptimizerSpec(eps=0.0), "optimizer.eps"),
        (lambda: OptimizerSpec(grad_clip=NAN), "optimizer.grad_clip"),
        (lambda: OptimizerSpec(warmup_updates=2.5), "optimizer.warmup_updates"),
        (lambda: LoraSpec(rank=0), "lora.rank"),
        (lambda: LoraSpec(alpha=NAN), "lora.alpha"),
        (lambda: LoraSpec(dropout=1.0), "lora.dropout"),
        (lambda: BackboneSpec(lora_alpha=INF), "lora_alpha"),
        (lambda: BackboneSpec(dtype="float33"), "dtype"),
        (lambda: BackboneSpec(seed=-1), "seed"),
        (lambda: TextEncoderSpec(tiny_d_model=16, text_len=0), "text_encoder.text_len"),
        (lambda: TextEncoderSpec(tiny_d_model=16, dtype="bf16"), "dtype"),
        (lambda: NAM(bank_size=2.5), "memory.bank_size"),
        (lambda: NAM(sink_size=NAN), "memory.sink_size"),
        (lambda: NAM(sma="yes"), "memory.sma"),
        (lambda: FlowMatchSchedule(shift=NAN), "timestep_shift"),
        (lambda: FlowMatchSchedule().warp([1000, NAN]), "denoising steps"),
        (lambda: FlowMatchSchedule().warp([1000, 750.5]), "denoising steps"),
    ],
)
def test_specs_refuse_non_finite_and_out_of_range_values(build, name: str) -> None:
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        build()


_TINY = {"preset": "tiny"}


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"timestep_shift": NAN}, "timestep_shift"),
        ({"timestep_shift": 0.0}, "timestep_shift"),
        ({"context_timestep": INF}, "context_timestep"),
        ({"context_timestep": -1.0}, "context_timestep"),
        ({"guidance_scale": NAN}, "guidance_scale"),
        ({"score_timestep_range": (20.0, NAN)}, "score_timestep_range"),
        ({"score_timestep_range": (980.0, 20.0)}, "score_timestep_range"),
        ({"gen_update_ratio": 0}, "gen_update_ratio"),
        ({"ema_decay": NAN}, "ema_decay"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_start_step": -5}, "ema_start_step"),
        ({"num_frames": 12.5}, "num_frames"),
        ({"latent_size": (4, 0)}, "latent_size"),
        ({"seed": 1.5}, "seed"),
        ({"generator_optimizer": {"lr": NAN}}, "optimizer.lr"),
        ({"critic_optimizer": {"lr": INF}}, "optimizer.lr"),
        ({"denoising_steps": (1000, NAN)}, "denoising steps"),
    ],
)
def test_self_forcing_refuses_bad_numbers_before_building(overrides: dict, name: str) -> None:
    args = {"generator": _TINY, "teacher": _TINY, "num_frames": 12, "latent_size": (4, 4), **overrides}
    with pytest.raises(ValueError, match=name):
        SelfForcingDMD(**args)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"max_length": 12.5}, "max_length"),
        ({"frames_per_step": NAN}, "frames_per_step"),
        ({"window": 0}, "window"),
        ({"min_switch_frame": 2.5}, "min_switch_frame"),
    ],
)
def test_streaming_long_tuning_refuses_bad_numbers(overrides: dict, name: str) -> None:
    args = {"generator": _TINY, "teacher": _TINY, "num_frames": 12, "latent_size": (4, 4)}
    args |= {"max_length": 12, "frames_per_step": 6, "window": 6, **overrides}
    with pytest.raises(ValueError, match=name):
        StreamingLongTuning(**args)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"timestep_range": (0.0, NAN)}, "timestep_range"),
        ({"timestep_range": (500.0, 100.0)}, "timestep_range"),
        ({"optimizer": {"lr": NAN}}, "optimizer.lr"),
        ({"max_frames": 6.5}, "max_frames"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"ema_decay": -0.5}, "ema_decay"),
    ],
)
def test_flow_matching_refuses_bad_numbers(overrides: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        FlowMatchingFinetune(model=_TINY, **overrides)
