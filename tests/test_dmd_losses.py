"""DMD and critic losses against their formulas computed by hand."""

from __future__ import annotations

import torch

from memflow_train.methods.dmd_losses import critic_flow_loss, dmd_gradient, dmd_loss, guided
from memflow_train.sampling import FlowMatchSchedule, SampleNoise


def test_generator_loss_gradient_is_the_normalised_dmd_direction() -> None:
    x = torch.randn(2, 3, 4, 2, 2, requires_grad=True)
    fake, real = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    grad = dmd_gradient(x, fake, real)
    dmd_loss(x, grad).backward()
    # By hand: per sample, (fake - real) / mean |x - real|; d/dx 0.5 * mean((x - (x - g))^2) = g / numel.
    expected = torch.stack([(fake[i] - real[i]) / (x[i] - real[i]).abs().mean() for i in range(2)])
    assert torch.allclose(grad.float(), expected.detach(), atol=1e-6)
    assert torch.allclose(x.grad, (expected / x.numel()).detach(), atol=1e-9)
    assert dmd_gradient(x, fake, real).dtype == torch.float64


def test_masked_generator_loss_only_reaches_new_frames() -> None:
    x = torch.randn(1, 2, 5, 2, 2, requires_grad=True)
    grad = dmd_gradient(x, torch.randn_like(x), torch.randn_like(x))
    mask = torch.zeros(1, 1, 5, 1, 1, dtype=torch.bool)
    mask[:, :, 3:] = True
    dmd_loss(x, grad, mask).backward()
    selected = mask.expand_as(x)
    assert torch.equal(x.grad[~selected], torch.zeros_like(x.grad[~selected]))
    assert torch.allclose(x.grad[selected], (grad[selected] / selected.sum()).float(), atol=1e-9)


def test_normaliser_of_zero_distance_gives_finite_zero_gradient() -> None:
    x = torch.ones(1, 1, 1, 1, 1)
    assert torch.equal(dmd_gradient(x, x, x), torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64))


def test_critic_loss_is_flow_matching_mse() -> None:
    flow = torch.randn(2, 4, 3, 2, 2, requires_grad=True)
    x0, noise = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    loss = critic_flow_loss(flow, x0, noise)
    loss.backward()
    target = noise - x0
    assert torch.allclose(loss, ((flow - target) ** 2).mean())
    assert torch.allclose(flow.grad, 2 * (flow - target).detach() / flow.numel())


def test_guidance_follows_self_forcing_convention() -> None:
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert guided(cond, uncond, 3.0).item() == 2.0 + 3.0 * (2.0 - 1.0)


def test_schedule_matches_self_forcing_warp_and_inverts() -> None:
    s = FlowMatchSchedule(shift=5.0)
    assert torch.allclose(s.warp([1000, 750, 500, 250]), torch.tensor([1000.0, 937.5, 833.3333, 625.0]))
    x0, noise = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    t = torch.tensor([937.5, 20.0])
    x_t = s.add_noise(x0, noise, t)
    assert torch.allclose(s.x0_from_flow(x_t, s.flow_target(x0, noise), t), x0, atol=1e-5)
    per_frame = torch.tensor([[1000.0, 500.0, 250.0, 0.0]] * 2)
    x_t = s.add_noise(x0, noise, per_frame)
    assert torch.allclose(x_t[:, :, 3], x0[:, :, 3]) and torch.allclose(x_t[:, :, 0], noise[:, :, 0])
    draws = s.training_timesteps(SampleNoise(0, first_index=0, count=1000), 20.0, 980.0)
    assert draws.min() >= 20.0 and draws.max() <= 980.0
    assert draws.median() > 700  # shift 5 pushes timesteps towards high noise
