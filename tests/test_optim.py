"""One MultiNetworkAdamW equals two independent torch AdamW optimizers, step for step."""

from __future__ import annotations

import copy

import pytest
import torch

from memflow_train.methods.optim import MultiNetworkAdamW, NonFiniteGradientError


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


def test_each_network_is_clipped_by_its_own_norm_like_clip_grad_norm() -> None:
    gen, critic = _nets()
    ref_gen, ref_critic = copy.deepcopy(gen), copy.deepcopy(critic)
    multi = MultiNetworkAdamW(
        [
            {"name": "generator", "params": list(gen.parameters()), "lr": 0.1, "max_grad_norm": 1.0},
            {"name": "critic", "params": list(critic.parameters()), "lr": 0.1, "max_grad_norm": None},
        ]
    )
    plain_gen = torch.optim.AdamW(ref_gen.parameters(), lr=0.1)
    plain_critic = torch.optim.AdamW(ref_critic.parameters(), lr=0.1)
    for _ in range(3):
        for net, ref in ((gen, ref_gen), (critic, ref_critic)):
            for p, r in zip(net.parameters(), ref.parameters(), strict=True):
                g = torch.randn_like(p) * 10
                p.grad, r.grad = g.clone(), g.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(ref_gen.parameters(), 1.0)
        plain_gen.step()
        plain_critic.step()
        multi.step()
        assert torch.equal(multi.grad_norms["generator"], expected_norm)
    for net, ref in ((gen, ref_gen), (critic, ref_critic)):
        assert all(torch.equal(p, r) for p, r in zip(net.parameters(), ref.parameters(), strict=True))


def test_non_finite_gradients_stop_or_skip_only_that_network() -> None:
    gen, critic = _nets()
    groups = lambda: [  # noqa: E731
        {"name": "generator", "params": list(gen.parameters()), "lr": 0.1},
        {"name": "critic", "params": list(critic.parameters()), "lr": 0.1},
    ]
    for p in gen.parameters():
        p.grad = torch.full_like(p, float("nan"))
    for p in critic.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(NonFiniteGradientError, match="non-finite generator gradient norm"):
        MultiNetworkAdamW(groups()).step()
    before_gen = [p.clone() for p in gen.parameters()]
    before_critic = [p.clone() for p in critic.parameters()]
    skipping = MultiNetworkAdamW(groups(), nonfinite="skip")
    skipping.step()
    assert skipping.skipped == ["generator"]
    assert all(torch.equal(a, b) for a, b in zip(before_gen, gen.parameters(), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(before_critic, critic.parameters(), strict=True))


def test_bad_groups_are_refused() -> None:
    gen, critic = _nets()
    with pytest.raises(ValueError, match="unique name"):
        MultiNetworkAdamW([{"params": list(gen.parameters()), "lr": 1.0}])
    multi = MultiNetworkAdamW([{"name": "generator", "params": list(gen.parameters()), "lr": 1.0}])
    with pytest.raises(KeyError, match="critic"):
        multi.set_active(["critic"])
