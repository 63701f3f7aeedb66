"""The causal backbone against diffusers' WanTransformer3DModel (the oracle), same random weights."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from diffusers import WanTransformer3DModel

from memflow_train.checks import IgnoredSettingWarning
from memflow_train.models.attention import register_attention_backend
from memflow_train.models.causal_wan import CausalWanTransformer
from memflow_train.models.presets import wan_config
from tests.wan_helpers import tiny_inputs


@pytest.fixture
def pair() -> tuple[WanTransformer3DModel, CausalWanTransformer]:
    ref = WanTransformer3DModel(**wan_config("tiny")).eval()
    ours = CausalWanTransformer(**wan_config("tiny")).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@torch.no_grad()
def test_bidirectional_equals_diffusers_scalar_timestep(pair) -> None:
    ref, ours = pair
    x, _, text = tiny_inputs(batch=2, frames=5)
    t = torch.tensor([999.0, 17.0])
    expected = ref(x, t, text, return_dict=False)[0]
    assert (ours(x, t, text) - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_per_frame_timesteps_equal_diffusers_per_token_timesteps(pair) -> None:
    ref, ours = pair
    x, t, text = tiny_inputs(batch=2, frames=4, height=4, width=6)
    tokens_per_frame = (4 // 2) * (6 // 2)
    expected = ref(x, t.repeat_interleave(tokens_per_frame, dim=1), text, return_dict=False)[0]
    assert (ours(x, t, text) - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_text_context_reuse_equals_raw_text(pair) -> None:
    _, ours = pair
    x, t, text = tiny_inputs()
    assert torch.equal(ours(x, t, ours.encode_text(text)), ours(x, t, text))


@torch.no_grad()
def test_registered_attention_backend_is_used_and_matches_sdpa(pair) -> None:
    _, ours = pair
    calls = []

    def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(q.shape)
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return w @ v

    register_attention_backend("test-reference", reference_attention)
    x, t, text = tiny_inputs()
    expected = ours(x, t, text)
    ours.set_attention_backend("test-reference")
    got = ours(x, t, text)
    assert len(calls) == len(ours.blocks)
    assert (got - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="unknown attention backend"):
        ours.set_attention_backend("no-such-kernel")


def test_gradient_checkpointing_gives_identical_gradients(pair) -> None:
    _, ours = pair
    x, t, text = tiny_inputs()

    def grads() -> list[torch.Tensor]:
        ours.zero_grad()
        ours(x, t, text).square().mean().backward()
        return [p.grad.clone() for p in ours.parameters()]

    plain = grads()
    ours.enable_gradient_checkpointing()
    assert ours.gradient_checkpointing
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@torch.no_grad()
def test_bf16_forward_keeps_fp32_norms_and_stays_close(pair) -> None:
    _, ours = pair
    x, t, text = tiny_inputs()
    expected = ours(x, t, text)
    from memflow_train.models.causal_wan import cast_keeping_fp32

    cast_keeping_fp32(ours, torch.bfloat16)
    assert ours.scale_shift_table.dtype == torch.float32
    assert ours.blocks[0].scale_shift_table.dtype == torch.float32
    assert ours.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert ours.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    got = ours(x.bfloat16(), t, text.bfloat16())
    assert got.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    assert (got.float() - expected).abs().max() <= 0.1 * expected.abs().max()


def test_bad_inputs_raise_clear_errors(pair) -> None:
    _, ours = pair
    x, t, text = tiny_inputs(frames=4)
    with pytest.raises(ValueError, match="timestep must be"):
        ours(x, torch.zeros(1, 3), text)
    with pytest.raises(ValueError, match="in_channels"):
        ours(torch.randn(1, 3, 4, 4, 6), t, text)
    with pytest.raises(ValueError, match="patch_size"):
        ours(torch.randn(1, 4, 4, 5, 6), t, text)
    with pytest.raises(ValueError, match="expected latents"):
        ours(torch.randn(4, 4, 6), t, text)
    with pytest.raises(NotImplementedError, match="text-to-video"):
        CausalWanTransformer(**wan_config("tiny", image_dim=8))


@torch.no_grad()
def test_sample_prediction_returns_the_flow_of_diffusers_output_as_x0(pair) -> None:
    """prediction_type "sample": the network's output (diffusers' forward, same weights) is x0, and the forward
    returns the flow (x_t - x0) / sigma, sigma = t / 1000 floored at sample_sigma_floor; per-frame timesteps too."""
    ref, _ = pair
    ours = CausalWanTransformer(**wan_config("tiny", prediction_type="sample", sample_sigma_floor=0.1)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, _, text = tiny_inputs(batch=3, frames=4)
    t = torch.tensor([999.0, 400.0, 30.0])
    x0 = ref(x, t, text, return_dict=False)[0]
    sigma = torch.tensor([0.999, 0.4, 0.1])[:, None, None, None, None]  # 30 / 1000 is under the floor
    assert torch.allclose(ours(x, t, text), (x - x0) / sigma, atol=1e-5)
    assert torch.allclose(x[:2] - sigma[:2] * ours(x, t, text)[:2], x0[:2], atol=1e-5)  # x0 back above the floor
    per_frame = torch.tensor([[999.0, 500.0, 250.0, 125.0]]).expand(3, 4)
    tokens = x.shape[-2] * x.shape[-1] // 4
    x0 = ref(x, per_frame.repeat_interleave(tokens, dim=1), text, return_dict=False)[0]
    sigma = (per_frame / 1000)[:, None, :, None, None]
    assert torch.allclose(ours(x, per_frame, text), (x - x0) / sigma, atol=1e-5)


@torch.no_grad()
def test_preconditioned_prediction_is_edms_skip_and_output_scaling_of_diffusers_output(pair) -> None:
    """prediction_type "preconditioned": x0 = c_skip x_t + c_out F with F diffusers' forward (same weights),
    c_skip = a s_d^2 / (a^2 s_d^2 + sigma^2), c_out = sigma s_d / sqrt(a^2 s_d^2 + sigma^2), a = 1 - sigma (EDM,
    Karras et al. 2022, Table 1, on the rectified-flow path); the forward returns (x_t - x0) / sigma, and at
    sigma = 0 its limit -x_t - F. Per-frame timesteps too."""
    ref, _ = pair
    data = 0.5
    ours = CausalWanTransformer(**wan_config("tiny", prediction_type="preconditioned", sigma_data=data)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, _, text = tiny_inputs(batch=3, frames=4)
    t = torch.tensor([1000.0, 400.0, 0.0])
    out = ref(x, t, text, return_dict=False)[0]
    got = ours(x, t, text)
    for i, sigma in enumerate([1.0, 0.4]):
        a = 1 - sigma
        c_skip = a * data**2 / (a**2 * data**2 + sigma**2)
        c_out = sigma * data / math.sqrt(a**2 * data**2 + sigma**2)
        x0 = c_skip * x[i] + c_out * out[i]
        assert torch.allclose(got[i], (x[i] - x0) / sigma, atol=1e-5)
    assert torch.allclose(got[2], -x[2] - out[2], atol=1e-5)
    per_frame = torch.tensor([[1000.0, 500.0, 250.0, 125.0]]).expand(3, 4)
    tokens = x.shape[-2] * x.shape[-1] // 4
    out = ref(x, per_frame.repeat_interleave(tokens, dim=1), text, return_dict=False)[0]
    sigma = (per_frame / 1000)[:, None, :, None, None]
    a = 1 - sigma
    x0 = a * data**2 / (a**2 * data**2 + sigma**2) * x + sigma * data / (a**2 * data**2 + sigma**2).sqrt() * out
    assert torch.allclose(ours(x, per_frame, text), (x - x0) / sigma, atol=1e-5)
    per_channel = [0.5, 2.0, 1.0, 0.1]  # one data RMS per latent channel
    ours.register_to_config(sigma_data=per_channel)
    t = torch.tensor([600.0, 600.0, 600.0])
    out, got = ref(x, t, text, return_dict=False)[0], ours(x, t, text)
    for c, data in enumerate(per_channel):
        d = math.sqrt(0.4**2 * data**2 + 0.6**2)
        x0 = 0.4 * data**2 / d**2 * x[:, c] + 0.6 * data / d * out[:, c]
        assert torch.allclose(got[:, c], (x[:, c] - x0) / 0.6, atol=1e-5)


def test_prediction_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        CausalWanTransformer(**wan_config("tiny", prediction_type="epsilon"))
    with pytest.raises(ValueError, match="sample_sigma_floor"):
        CausalWanTransformer(**wan_config("tiny", sample_sigma_floor=0.0))
    for bad in (0.0, -1.0, [1.0, 1.0, 0.0, 1.0]):
        with pytest.raises(ValueError, match="sigma_data"):
            CausalWanTransformer(**wan_config("tiny", sigma_data=bad))
    with pytest.raises(ValueError, match=r"sigma_data: one value per latent channel \(4\), got 3"):
        CausalWanTransformer(**wan_config("tiny", sigma_data=[1.0, 1.0, 1.0]))
    with pytest.warns(IgnoredSettingWarning, match="sigma_data=0.5 is not used: only prediction_type 'preconditioned'"):
        CausalWanTransformer(**wan_config("tiny", prediction_type="sample", sigma_data=0.5))
    with pytest.warns(IgnoredSettingWarning, match="sample_sigma_floor=0.1 is not used: only prediction_type 'sample'"):
        CausalWanTransformer(**wan_config("tiny", sample_sigma_floor=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CausalWanTransformer(**wan_config("tiny", prediction_type="preconditioned", sigma_data=0.5))
