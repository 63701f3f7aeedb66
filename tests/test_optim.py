"""One MultiNetworkAdamW equals two independent torch AdamW optimizers, step for step."""

from __future__ import annotations

import copy

import pytest
import torch

from memflow_train.methods.optim import MultiNetworkAdamW, clip_group


def _nets() -> tuple[torch.nn.Module, torch.nn.Module]:
    return torch.nn.Linear(4, 3), torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))


def test_matches_two_plain_adamw_with_skipped_updates() -> None:
    gen, critic = _nets()
    ref_gen, ref_critic = copy.deepcopy(gen), copy.deepcopy(critic)
    hyper = {
        "generator": {"lr": 1e-2, "betas": (0.0, 0.999), "weight_decay": 0.01, "eps": 1e-8},
        "critic": {"lr": 3e-3, "betas": (0.9, 0.99), "weight_decay": 0.1, "eps": 1e-6},
    }
    multi = MultiNetworkAdamW(
        [
            {"name": "generator", "params": list(gen.parameters()), **hyper["generator"]},
            {"name": "critic", "params": list(critic.parameters()), **hyper["critic"]},
        ]
    )
    plain = {
        "generator": torch.optim.AdamW(ref_gen.parameters(), **hyper["generator"]),
        "critic": torch.optim.AdamW(ref_critic.parameters(), **hyper["critic"]),
    }
    nets = {"generator": (gen, ref_gen), "critic": (critic, ref_critic)}
    for step in range(12):
        active = ["critic"] + (["generator"] if step % 5 == 0 else [])
        for name in active:
            net, ref = nets[name]
            grads = [torch.randn_like(p) for p in net.parameters()]
            for p, r, g in zip(net.parameters(), ref.parameters(), grads, strict=True):
                p.grad, r.grad = g.clone(), g.clone()
            plain[name].step()
            plain[name].zero_grad(set_to_none=True)
        multi.set_active(active)
        multi.step()
        multi.zero_grad(set_to_none=True)
    for name, (net, ref) in nets.items():
        for p, r in zip(net.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, r)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(multi.state[p][key], plain[name].state[r][key])


def test_inactive_network_is_untouched_even_with_gradients() -> None:
    gen, critic = _nets()
    multi = MultiNetworkAdamW(
        [
            {"name": "generator", "params": list(gen.parameters()), "lr": 1.0},
            {"name": "critic", "params": list(critic.parameters()), "lr": 1.0},
        ]
    )
    before = [p.clone() for p in gen.parameters()]
    for p in [*gen.parameters(), *critic.parameters()]:
        p.grad = torch.ones_like(p)
    multi.set_active(["critic"])
    multi.step()
    assert all(torch.equal(a, b) for a, b in zip(before, gen.parameters(), strict=True))
    assert all(p not in multi.state for p in gen.parameters())
    assert len(multi.param_groups) == 2


def test_clip_group_clips_one_network_by_its_own_norm() -> None:
    gen, critic = _nets()
    multi = MultiNetworkAdamW(
        [
            {"name": "generator", "params": list(gen.parameters()), "lr": 1.0},
            {"name": "critic", "params": list(critic.parameters()), "lr": 1.0},
        ]
    )
    for p in [*gen.parameters(), *critic.parameters()]:
        p.grad = torch.full_like(p, 10.0)
    critic_grads = [p.grad.clone() for p in critic.parameters()]
    norm = clip_group(multi, "generator", 1.0)
    assert norm == pytest.approx(10.0 * sum(p.numel() for p in gen.parameters()) ** 0.5)
    total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in gen.parameters()]))
    assert total == pytest.approx(1.0, rel=1e-5)
    assert all(torch.equal(p.grad, g) for p, g in zip(critic.parameters(), critic_grads, strict=True))


def test_bad_groups_are_refused() -> None:
    gen, critic = _nets()
    with pytest.raises(ValueError, match="unique name"):
        MultiNetworkAdamW([{"params": list(gen.parameters()), "lr": 1.0}])
    multi = MultiNetworkAdamW([{"name": "generator", "params": list(gen.parameters()), "lr": 1.0}])
    with pytest.raises(KeyError, match="critic"):
        multi.set_active(["critic"])
