"""Self-forcing DMD: gradients only through exit steps, independent networks, EMA, LoRA, bad input."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from memflow_train.memory import NAM, MemoryFree
from memflow_train.methods import BackboneSpec, LoraSpec, OptimizerSpec, SelfForcingDMD, StreamingLongTuning
from memflow_train.methods.lora import merge_lora
from memflow_train.methods.optim import MultiNetworkAdamW
from memflow_train.methods.self_forcing import NonFiniteLossError
from memflow_train.sampling import SampleNoise
from tests.method_helpers import dmd_module, fit, loader, prompt_batch
from tests.wan_helpers import tiny_inputs


def test_only_exit_step_forwards_build_a_graph_and_the_cache_holds_none() -> None:
    module = dmd_module()
    texts = module._texts(prompt_batch())
    calls: list[tuple[bool, bool]] = []
    original = module.generator.forward_chunk

    def spy(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), kwargs.get("update_cache", False)))
        return original(*args, **kwargs)

    module.generator.forward_chunk = spy
    streams = []
    new_stream = module.sampler.new_stream
    module.sampler.new_stream = lambda: streams.append(new_stream()) or streams[-1]
    x = module.rollout(texts, step=0, purpose="generator", grad=True)
    exit_steps = module._draw_exit_steps(2, module._shared_rng(0, "generator/exit"))
    assert x.requires_grad
    graph_calls = [c for c in calls if c[0]]
    assert len(graph_calls) == 2 and not any(update for _, update in graph_calls)  # one per chunk
    assert sum(1 for _, update in calls if update) == 2  # the clean re-runs write, without grad
    assert len(calls) == sum(e + 1 for e in exit_steps) + 2
    for layer in streams[0].cache.layers:
        assert all(t.grad_fn is None and not t.requires_grad for t in layer.tensors())


def test_exit_steps_are_shared_and_noise_follows_the_global_sample_index() -> None:
    module = dmd_module()
    a = module._draw_exit_steps(7, module._shared_rng(3, "generator/exit"))
    assert a == module._draw_exit_steps(7, module._shared_rng(3, "generator/exit")) and all(0 <= s < 4 for s in a)
    assert a != module._draw_exit_steps(7, module._shared_rng(4, "generator/exit"))
    # Rank 1 of 2 with 2 samples each holds global samples 2 and 3: the same noise one process with all 4 draws.
    whole = SampleNoise(0, 3, "n", first_index=0, count=4).randn((4, 5))
    second_rank = SampleNoise(0, 3, "n", first_index=2, count=2).randn((2, 5))
    assert torch.equal(whole[2:], second_rank) and not torch.equal(whole[:2], second_rank)
    same = dmd_module(same_exit_step_for_all_chunks=True)
    assert len(set(same._draw_exit_steps(7, same._shared_rng(5, "generator/exit")))) == 1


class _Recorder(MultiNetworkAdamW):
    """Records the gradients (before the optimizer's own clipping) of each step, per network."""

    log: list[dict[str, list[torch.Tensor]]] = []

    def step(self, closure=None):
        _Recorder.log.append(
            {g["name"]: [p.grad.clone() for p in g["params"]] for g in self.param_groups if g["name"] in self.active}
        )
        return super().step(closure)


def test_networks_evolve_as_two_independent_adamw_and_generator_rests_on_critic_steps(monkeypatch) -> None:
    module = dmd_module(
        generator_optimizer=OptimizerSpec(lr=1e-3, betas=(0.0, 0.999), weight_decay=0.01, grad_clip=0.5),
        critic_optimizer=OptimizerSpec(lr=3e-4, betas=(0.0, 0.999), weight_decay=0.01, grad_clip=10.0),
        ema_decay=None,
    )
    start = {"generator": copy.deepcopy(module.generator), "critic": copy.deepcopy(module.critic)}
    monkeypatch.setattr("memflow_train.methods.self_forcing.MultiNetworkAdamW", _Recorder)
    _Recorder.log = []
    trainer = fit(module, steps=5)
    assert trainer.global_step == 5
    assert [sorted(entry) for entry in _Recorder.log] == [
        ["critic", "generator"],
        ["critic"],
        ["critic", "generator"],
        ["critic"],
        ["critic", "generator"],
    ]
    specs = module.optimizer_specs
    for name in ("generator", "critic"):
        reference = start[name]
        params = [p for p in reference.parameters() if p.requires_grad]
        spec = specs[name]
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, eps=spec.eps)
        for entry in _Recorder.log:
            if name in entry:
                for p, g in zip(params, entry[name], strict=True):
                    p.grad = g
                torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
                opt.step()
        live = dict(getattr(module, name).named_parameters())
        for n, p in reference.named_parameters():
            assert torch.equal(p, live[n]), f"{name}.{n}"


def test_generator_is_unchanged_on_critic_only_steps() -> None:
    module = dmd_module(gen_update_ratio=3)
    fit(module, steps=1)
    after_first = copy.deepcopy(module.generator.state_dict())
    critic_first = copy.deepcopy(module.critic.state_dict())
    module2 = dmd_module(gen_update_ratio=3)
    fit(module2, steps=3)  # steps 1 and 2 train the critic only
    for k, v in after_first.items():
        assert torch.equal(v, module2.generator.state_dict()[k])
    assert any(not torch.equal(v, module2.critic.state_dict()[k]) for k, v in critic_first.items())


def test_ema_follows_generator_updates() -> None:
    module = dmd_module(ema_decay=0.5, ema_start_step=2, gen_update_ratio=2)
    snapshots = []
    original = module.ema.update

    def spy(net, step):
        original(net, step)
        snapshots.append((step, {n: p.detach().clone() for n, p in net.named_parameters()}))

    module.ema.update = spy
    fit(module, steps=6)  # generator updates at steps 0, 2, 4; EMA starts at step 2
    assert [s for s, _ in snapshots] == [0, 2, 4]
    (_, w2), (_, w4) = snapshots[1], snapshots[2]
    for name, shadow in module.ema.shadow.items():
        assert torch.allclose(shadow, 0.5 * w2[name] + 0.5 * w4[name], atol=1e-7)


def test_lora_trains_only_adapters_and_merges_to_the_same_function() -> None:
    module = dmd_module(generator_lora=LoraSpec(rank=2), critic_lora=LoraSpec(rank=2), ema_decay=None)
    base = {n: p.detach().clone() for n, p in module.generator.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in module.generator.named_parameters() if "lora_" in n}
    assert lora and all(not p.requires_grad for n, p in module.generator.named_parameters() if "lora_" not in n)
    fit(module, steps=3)
    live = dict(module.generator.named_parameters())
    assert all(torch.equal(v, live[n]) for n, v in base.items())
    assert any(not torch.equal(v, live[n]) for n, v in lora.items() if "lora_B" in n)
    x, t, text = tiny_inputs(frames=3)
    with torch.no_grad():
        unmerged = module.generator(x, t, text)
        merge_lora(module.generator)
        assert not any("lora_" in n for n, _ in module.generator.named_parameters())
        assert (module.generator(x, t, text) - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_critic_loss_is_reported_with_step_and_network(policy: str) -> None:
    module = dmd_module(nonfinite=policy, gen_update_ratio=100)
    with torch.no_grad():
        module.critic.proj_out.bias.fill_(float("nan"))
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="non-finite critic loss .* at step 0"):
            fit(module, steps=1)
        return
    before = copy.deepcopy(module.critic.state_dict())
    with pytest.warns(UserWarning, match="non-finite critic loss .* at step 1"):
        fit(module, steps=2)
    after = module.critic.state_dict()
    assert all(torch.equal(v, after[k]) or torch.isnan(v).any() for k, v in before.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (lambda: {"memory": NAM(local_attn_size=2)}, "local_attn_size"),
        ({"num_frames": 7}, "num_frames"),
        ({"latent_size": (5, 4)}, "latent_size"),
        ({"teacher": BackboneSpec(config={"text_dim": 8})}, "teacher.text_dim"),
        ({"gen_update_ratio": 0}, "gen_update_ratio"),
        ({"score_timestep_range": (500.0, 100.0)}, "score_timestep_range"),
        (lambda: {"generator_optimizer": OptimizerSpec(lr=0.0)}, r"optimizer.lr must be > 0"),
    ],
)
def test_impossible_configs_fail_at_start_naming_the_key(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        dmd_module(**(overrides() if callable(overrides) else overrides))


def test_missing_text_inputs_are_named() -> None:
    module = dmd_module()
    batch = prompt_batch()
    batch.prompt_embeds = None
    with pytest.raises(ValueError, match="no prompt_embeds and no text_encoder"):
        module._texts(batch)


def test_checkpoint_leaves_out_the_frozen_teacher() -> None:
    module = dmd_module()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    assert any(k.startswith("critic.") for k in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    assert SelfForcingDMD.load_state_dict(module, checkpoint["state_dict"], strict=True) is not None


def test_lightning_checkpoint_loads_into_the_backbone_with_ema_and_lora(tmp_path) -> None:
    from memflow_train.models.loading import load_transformer

    module = dmd_module(generator_lora=LoraSpec(rank=2, alpha=4), ema_decay=0.5, ema_start_step=0)
    trainer = fit(module, steps=5)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    assert "teacher.patch_embedding.weight" not in torch.load(path, weights_only=True)["state_dict"]
    x, t, text = tiny_inputs(frames=3)
    with torch.no_grad():
        live = module.generator(x, t, text)
        with module.ema.swapped_in(module.generator):
            ema = module.generator(x, t, text)
        assert (load_transformer(path)(x, t, text) - ema).abs().max() <= 1e-5
        assert (load_transformer(path, checkpoint_key="generator")(x, t, text) - live).abs().max() <= 1e-5
        assert (ema - live).abs().max() > 1e-4
        critic = load_transformer(path, checkpoint_key="critic")
        assert (critic(x, t, text) - module.critic(x, t, text)).abs().max() <= 1e-5
    restored = SelfForcingDMD.load_from_checkpoint(path, weights_only=True)
    assert restored.optimizer_specs == module.optimizer_specs and restored.memory == module.memory


def test_text_encoder_loads_only_when_a_batch_lacks_embeddings() -> None:
    from memflow_train.methods import TextEncoderSpec
    from memflow_train.models.text_encoder import WanTextEncoder

    spec = TextEncoderSpec(tiny_d_model=16, text_len=8)
    module = dmd_module(text_encoder=spec)
    module._texts(prompt_batch())  # precomputed embeddings: the encoder stays unbuilt
    assert module.text_encoder._encoder is None
    assert "text_encoder" not in dict(module.named_children())
    batch = prompt_batch(prompts=2)
    batch.prompt_embeds = batch.negative_embeds = None
    texts = module._texts(batch)
    expected, mask = WanTextEncoder.tiny(d_model=16, text_len=8).to(torch.bfloat16)(batch.prompts[0])
    assert expected.dtype == torch.bfloat16  # the spec's dtype (default bfloat16), as a real encoder loads
    assert torch.equal(texts.embeds[0], expected.float()) and torch.equal(texts.mask[0], mask)
    as_float = TextEncoderSpec(tiny_d_model=16, text_len=8, dtype="float32").build()
    assert next(as_float.parameters()).dtype == torch.float32
    assert texts.negative.shape == (2, 8, 16)
    with pytest.raises(ValueError, match="text_encoder width 8 differs from generator.text_dim 16"):
        dmd_module(text_encoder=TextEncoderSpec(tiny_d_model=8))


def test_validation_is_repeatable_and_leaves_training_unchanged() -> None:
    import lightning as L

    from tests.method_helpers import loader

    def trainer(**kwargs) -> L.Trainer:
        return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **kwargs)  # fmt: skip

    module = dmd_module()
    first = trainer().validate(module, loader(3), verbose=False)
    assert first == trainer().validate(module, loader(3), verbose=False)
    assert {"val/generator_loss", "val/critic_loss"} <= set(first[0])
    plain, validated = dmd_module(), dmd_module()
    trainer(max_steps=4).fit(plain, loader(8))
    trainer(max_steps=4, val_check_interval=2, limit_val_batches=2).fit(validated, loader(8), loader(2))
    for (name, a), b in zip(plain.state_dict().items(), validated.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_skipping_stops_after_max_skipped_updates_in_a_row_naming_step_network_and_lr() -> None:
    """lr 1e6 makes every update after the first non-finite: 'skip' must not skip to the end and exit 0."""
    module = dmd_module(
        nonfinite="skip",
        generator_optimizer=OptimizerSpec(lr=1e6),
        critic_optimizer=OptimizerSpec(lr=1e6),
        max_skipped_updates=2,
    )
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            NonFiniteLossError,
            match=r"3 critic updates in a row skipped .* last at step 3 .*critic_optimizer: lr 1e\+06",
        ),
    ):
        fit(module, steps=30)


def test_logged_values_belong_to_their_step(tmp_path) -> None:
    """A value a step did not produce is NaN in the log, never the previous step's value."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = dmd_module(gen_update_ratio=2)
    logger = CSVLogger(tmp_path, name="log")
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, loader())
    rows = list(csv.DictReader(next(tmp_path.glob("log/*/metrics.csv")).read_text().splitlines()))
    generator = {int(r["step"]): r["train/generator_loss"] for r in rows if r.get("train/generator_loss")}
    assert [k for k, v in generator.items() if v != "nan"] == [0, 2]  # generator steps only
    assert generator[1] == generator[3] == "nan"
    critic = [float(r["train/critic_loss"]) for r in rows if r.get("train/critic_loss")]
    assert len(critic) == 4 and len(set(critic)) == 4  # a fresh value every step


def test_flow_matching_skipping_stops_after_max_skipped_updates_in_a_row() -> None:
    from memflow_train.methods import FlowMatchingFinetune

    module = FlowMatchingFinetune(model={"preset": "tiny"}, nonfinite="skip", max_skipped_updates=1)
    module.flow_matching_loss = lambda *args: torch.tensor(float("nan"))  # every step's loss is non-finite
    with pytest.raises(NonFiniteLossError, match=r"2 steps in a row skipped .* last at step 1 .*lr 1e-05"):
        fit(module, steps=10, latents=True)


@pytest.mark.parametrize("method", [SelfForcingDMD, StreamingLongTuning])
@pytest.mark.parametrize("memory", ["off", "nam", "sma"], ids=str)
def test_gradient_checkpointing_trains_exactly_like_keeping_activations(method, memory: str) -> None:
    """Checkpointing recomputes each exit-step chunk in backward, after the rollout moved the cache on: the
    recomputed attention must read the cache as the forward did (weights equal to keeping activations)."""
    config = {
        "off": MemoryFree(),
        "nam": NAM(record_interval=1, bank_size=2),
        "sma": NAM(record_interval=1, bank_size=2, sma=True, sma_topk=1),
    }[memory]
    weights = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = dmd_module(method, memory=config, gradient_checkpointing=checkpointing, num_frames=12)
        fit(module, steps=4)
        weights.append({k: v.detach().clone() for k, v in module.generator.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.allclose(value, weights[1][key], rtol=0, atol=1e-6), key


def test_a_negative_prompt_the_batch_overrides_is_named_in_a_warning() -> None:
    """The batch's negative embeddings are the teacher's uncond: a configured negative_prompt is then unused."""
    import warnings

    from memflow_train.checks import IgnoredSettingWarning

    module = dmd_module(negative_prompt="blurry")
    with pytest.warns(IgnoredSettingWarning, match="negative_prompt 'blurry' is not used: the batch's negative"):
        module._texts(prompt_batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module._texts(prompt_batch())  # once
        dmd_module()._texts(prompt_batch())  # the default negative prompt: nothing to say
    with pytest.warns(IgnoredSettingWarning, match="negative_prompt 'blurry' is not used: .*guidance_scale 0 runs no"):
        quiet = dmd_module(negative_prompt="blurry", guidance_scale=0.0)  # named once, when built
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet._texts(prompt_batch())
        dmd_module(guidance_scale=0.0)._texts(prompt_batch())  # the default negative prompt: nothing to say
    with pytest.raises(ValueError, match="negative_prompt must be a string"):
        dmd_module(negative_prompt=3)


def test_guidance_zero_runs_the_teacher_on_the_conditional_batch_only() -> None:
    """Self-Forcing's convention cond + s * (cond - uncond): at s = 0 the unconditional half changes nothing."""
    from memflow_train.methods.dmd_losses import dmd_gradient, dmd_loss, guided

    module = dmd_module(guidance_scale=0.0)
    texts = module._texts(prompt_batch())
    x = torch.randn(2, 4, 6, 4, 4, requires_grad=True)
    seen = []
    forward = module.teacher.forward

    def spy(hidden, *args, **kwargs):
        seen.append(hidden.shape[0])
        return forward(hidden, *args, **kwargs)

    module.teacher.forward = spy
    loss, logs = module.distribution_matching_loss(x, texts.embeds[:, 0], texts.negative, step=3)
    assert seen == [2]
    # the same loss from the doubled batch, guided with scale 0 (what runs for any other scale)
    rng = module._sample_noise(3, "dmd", 2)
    t = module.schedule.training_timesteps(rng, *module.hparams.score_timestep_range)
    x_t = module.schedule.add_noise(x.detach(), rng.randn(tuple(x.shape), module.device, x.dtype), t)
    with torch.no_grad():
        _, fake = module._predict_x0(module.critic, x_t, t, texts.embeds[:, 0])
        _, real = module._predict_x0(module.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]),
                                     torch.cat([texts.embeds[:, 0], texts.negative]))  # fmt: skip
    expected = dmd_loss(x, dmd_gradient(x, fake, guided(*real.chunk(2), 0.0)))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
