"""The ablation axes (issue 3): each knob changes what it says, provably, and nothing else."""
import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import ControlNetModel, ControlNetXSAdapter, UNet2DConditionModel
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from cnexp.control import (branch_of, build_controlnet, count_trainable, decoder_parameters,
                           get_branch)
from cnexp.control.base_damage import METRIC, BaseDamageCallback, base_damage
from cnexp.control.connectors import expected_weight_std
from cnexp.control.lite import ControlNetLite, residual_layout
from cnexp.control.xs import expand_to_two_layers
from cnexp.module import ControlNetModule
from cnexp.sampling import generate, make_pipeline
from cnexp.errors import ConfigError
from cnexp.knobs import Branch
from cnexp.validate import validate
from conftest import compose_cfg

BRANCHES = [b.value for b in Branch]

def control_cfg(tiny_cfg, **knobs):
    cfg = copy.deepcopy(tiny_cfg.control)
    for key, value in knobs.items():
        cfg[key] = value
    return cfg


def make_module(tiny_cfg, base, optim=None, **knobs) -> ControlNetModule:
    control = build_controlnet(base.unet, control_cfg(tiny_cfg, **knobs))
    return ControlNetModule(base, control, optim or tiny_cfg.optim, seed=0)


def own_unet(base):
    """A base whose UNet this test may unfreeze (the session's base stays frozen)."""
    return dataclasses.replace(base, unet=copy.deepcopy(base.unet))


def connector_convs(control):
    return branch_of(control).connectors(control)


def down_connectors(control):
    return branch_of(control).down_connectors(control)


def hint_conv(control):
    return branch_of(control).hint_conv(control)


def conv_params(c_in, c_out, k):
    return c_in * c_out * k * k + c_out


# ---- connector init ---------------------------------------------------------------------------
@pytest.mark.parametrize("branch", BRANCHES)
def test_zero_connectors_make_step0_exactly_the_base(branch, tiny_cfg, tiny_base, tiny_data):
    module = make_module(tiny_cfg, tiny_base, branch=branch)
    convs = [*connector_convs(module.controlnet), hint_conv(module.controlnet)]
    assert len(convs) > 2
    assert all(torch.count_nonzero(p) == 0 for conv in convs for p in conv.parameters())
    assert base_damage(module, tiny_data.eval_batch()) == 0.0  # predictions bit-identical


@pytest.mark.parametrize("scheme", ["gaussian", "kaiming", "xavier", "default"])
def test_other_inits_have_their_statistics_and_damage_the_base(scheme, tiny_cfg, tiny_base,
                                                               tiny_data):
    torch.manual_seed(0)
    module = make_module(tiny_cfg, tiny_base, connector_init=scheme, gaussian_std=0.05)
    for conv in connector_convs(module.controlnet):
        w, b = conv.weight.detach(), conv.bias.detach()
        expected = expected_weight_std(conv, scheme, 0.05)
        assert w.numel() >= 1000
        assert abs(w.std().item() - expected) < 0.1 * expected, (scheme, w.std(), expected)
        assert abs(w.mean().item()) < 5 * expected / math.sqrt(w.numel())
        if scheme == "default":  # PyTorch's uniform(+-1/sqrt(fan_in)) for weights and biases
            bound = 1 / math.sqrt(w[0].numel())
            assert w.abs().max() <= bound and b.abs().max() <= bound and b.abs().sum() > 0
        else:
            assert torch.count_nonzero(b) == 0
    assert torch.count_nonzero(hint_conv(module.controlnet).weight) == 0  # scope: connectors
    assert base_damage(module, tiny_data.eval_batch()) > 1e-6


def test_scope_connectors_and_hint_also_initialises_the_hint_conv(tiny_cfg, tiny_base):
    control = build_controlnet(tiny_base.unet, control_cfg(
        tiny_cfg, connector_init="gaussian", gaussian_std=0.05, init_scope="connectors_and_hint"))
    weight = hint_conv(control).weight.detach()
    assert abs(weight.std().item() - 0.05) < 0.005


@pytest.mark.parametrize("branch", ["scratch", "lite", "xs"])
def test_gaussian_connectors_damage_the_base_in_every_branch(branch, tiny_cfg, tiny_base,
                                                             tiny_data):
    module = make_module(tiny_cfg, tiny_base, branch=branch, connector_init="gaussian")
    assert all(torch.count_nonzero(c.weight) > 0 for c in connector_convs(module.controlnet))
    assert base_damage(module, tiny_data.eval_batch()) > 1e-6


def test_base_damage_callback_logs_once_at_step_0(tiny_cfg, tiny_base, tiny_data):
    module = make_module(tiny_cfg, tiny_base, connector_init="gaussian")
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((metrics, step)))
    callback = BaseDamageCallback(tiny_data.eval_batch())
    callback.on_train_start(SimpleNamespace(global_step=0, loggers=[logger], callback_metrics={}),
                            module)
    assert logged == [({METRIC: callback.value}, 0)] and callback.value > 0
    callback.on_train_start(SimpleNamespace(global_step=7, loggers=[logger], callback_metrics={}),
                            module)  # a resumed run: already logged by the first one
    assert len(logged) == 1


# ---- branches: parameter counts, shapes, what is frozen, what the optimizer holds -------------
def test_trainable_parameter_counts(tiny_cfg, tiny_base):
    unet, cfg = tiny_base.unet, tiny_cfg.control
    counts = {b: count_trainable(build_controlnet(unet, control_cfg(tiny_cfg, branch=b)))
              for b in BRANCHES}
    full_copy = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(cfg.conditioning_embedding_out_channels))
    assert counts["copy"] == counts["scratch"] == full_copy.num_parameters()
    # lite: conv_in + condition embedding + one 3x3 conv per block + mid conv + 1x1 connectors
    channels, _ = residual_layout(unet)
    mid = unet.config.block_out_channels[-1]
    embedding = full_copy.controlnet_cond_embedding.parameters()
    lite = (conv_params(unet.config.in_channels, channels[0], 3) + sum(p.numel() for p in embedding)
            + sum(conv_params(a, b, 3) for a, b in zip(channels[:-1], channels[1:]))
            + conv_params(channels[-1], mid, 3)
            + sum(conv_params(c, c, 1) for c in channels) + conv_params(mid, mid, 1))
    assert counts["lite"] == lite and counts["lite"] < counts["copy"] / 2
    adapter = ControlNetXSAdapter.from_unet(
        expand_to_two_layers(unet), size_ratio=cfg.xs_size_ratio,
        conditioning_embedding_out_channels=tuple(cfg.conditioning_embedding_out_channels))
    assert counts["xs"] == adapter.num_parameters() and counts["xs"] < counts["copy"] / 2


def test_lite_returns_the_copys_residual_shapes_and_round_trips(tiny_cfg, tiny_base, tmp_path):
    full = build_controlnet(tiny_base.unet, control_cfg(tiny_cfg, connector_init="gaussian"))
    lite = build_controlnet(tiny_base.unet, control_cfg(tiny_cfg, branch="lite",
                                                        connector_init="gaussian"))
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([1, 500]), torch.randn(2, 77, 64))
    kwargs = dict(controlnet_cond=torch.rand(2, 3, 64, 64), return_dict=False)
    with torch.no_grad():
        down_full, mid_full = full(*inputs, **kwargs)
        down_lite, mid_lite = lite(*inputs, **kwargs)
        assert [d.shape for d in down_lite] == [d.shape for d in down_full]
        assert mid_lite.shape == mid_full.shape
        lite.save_pretrained(tmp_path)
        down_again, _ = ControlNetLite.from_pretrained(tmp_path)(*inputs, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(down_lite, down_again))


@pytest.mark.parametrize("knobs", [{"branch": b} for b in BRANCHES] + [{"sd_locked": False},
                                                                      {"only_mid_control": True}],
                         ids=[*BRANCHES, "sd_unlocked", "only_mid_control"])
def test_only_the_intended_parameters_train_in_their_own_groups(knobs, tiny_cfg, tiny_base):
    base = own_unet(tiny_base)
    module = make_module(tiny_cfg, base, **knobs)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    unet_trainable = {n for n in trainable if n.startswith("unet.")}
    assert not {n for n in trainable if n.startswith(("vae.", "text_encoder."))}
    if knobs.get("sd_locked") is False:
        decoder = {f"unet.{n}" for n, _ in base.unet.named_parameters()
                   if n.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))}
        assert unet_trainable == decoder and decoder
    else:
        assert not unet_trainable
    if knobs.get("branch") == "xs":  # the fused model's copy of the base stays frozen
        fused = dict(module.controlnet.named_parameters())
        base_parts = {n for n in fused if (n.startswith("up_blocks.") and "ctrl_to_base" not in n)
                      or any(s.startswith("base_") and s != "base_to_ctrl" for s in n.split("."))}
        assert base_parts and not any(fused[n].requires_grad for n in base_parts)
    if knobs.get("only_mid_control"):
        assert not any(p.requires_grad for conv in down_connectors(module.controlnet)
                       for p in conv.parameters())

    optimizer = module.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    control = [p for p in module.controlnet.parameters() if p.requires_grad]
    assert {id(p) for p in groups["control"]["params"]} == {id(p) for p in control}
    assert groups["control"]["lr"] == tiny_cfg.optim.lr
    if knobs.get("sd_locked") is False:
        assert set(groups) == {"control", "decoder"}
        assert {id(p) for p in groups["decoder"]["params"]} == \
            {id(p) for p in decoder_parameters(base.unet)}
        assert groups["decoder"]["lr"] == 2e-4 != tiny_cfg.optim.lr  # 0.2 x lr (authors')
    else:
        assert set(groups) == {"control"}
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == \
        sum(p.numel() for n, p in module.named_parameters() if n in trainable)
    checkpoint = {"state_dict": module.state_dict()}  # holds what trains, and only that
    module.on_save_checkpoint(checkpoint)
    params = {n for n, _ in module.named_parameters()}
    assert {k for k in checkpoint["state_dict"] if k in params} == trainable


def test_xs_needs_a_four_channel_latent_base(tiny_cfg):
    unet = UNet2DConditionModel(
        in_channels=8, out_channels=8, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=8,
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, sample_size=8)
    with pytest.raises(ConfigError, match="4-channel latents"):
        build_controlnet(unet, control_cfg(tiny_cfg, branch="xs"))


@pytest.mark.parametrize("override, choices", [
    ("control.branch=lit", ", ".join(Branch)),  # the registered branches (cnexp/control/)
    ("control.connector_init=zeros", "zero, gaussian, kaiming, xavier, default"),
    ("control.init_scope=all", "connectors, connectors_and_hint"),
])
def test_a_misspelt_choice_fails_at_composition_listing_the_choices(override, choices):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg([override])
    message = f"{err.value}: {err.value.__cause__}"
    knob, value = override.split("=")
    assert f"Invalid value '{value}', expected one of [{choices}]" in message, message
    assert f"full_key: {knob}" in message


def test_the_branch_choices_are_the_registered_branches():
    from cnexp.control import BRANCHES as REGISTERED

    assert sorted(REGISTERED.load_all()) == sorted(BRANCHES)
    assert all(get_branch(name).name == name for name in BRANCHES)
    with pytest.raises(ConfigError, match=r"control\.branch='toy' is unknown: use one of .*\bcopy, scratch\b"):
        get_branch("toy")  # an untyped config (a recorded config.yaml) names an absent branch


@pytest.mark.parametrize("override, message", [
    ("control.gaussian_std=0", "control.gaussian_std"),
    ("control.xs_size_ratio=1.5", "control.xs_size_ratio"),
    ("optim.condition_dropout=-0.1", "optim.condition_dropout"),
    ("optim.prompt_dropout=1.01", "optim.prompt_dropout"),
])
def test_bad_knob_values_fail_with_the_knob_named(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(compose_cfg([override]))


def test_xs_refuses_switches_that_need_residuals():
    with pytest.raises(ConfigError, match="only_mid_control"):
        validate(compose_cfg(["+ablation=controlnet_xs", "control.only_mid_control=true"]))


# ---- prompt dropout -----------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_prompt_dropout_rate_over_10000_draws_is_reproducible(p, tiny_cfg, tiny_base):
    optim = copy.deepcopy(tiny_cfg.optim)
    optim.prompt_dropout = p
    module = ControlNetModule(tiny_base, torch.nn.Identity(), optim, branch=get_branch("copy"))
    captions = [f"caption {i}" for i in range(10_000)]
    kept = module.drop_prompts(captions, torch.Generator().manual_seed(0))
    assert abs(kept.count("") / 10_000 - p) <= 0.02
    assert all(k in ("", c) for k, c in zip(kept, captions))  # per sample: dropped or untouched
    assert kept == module.drop_prompts(captions, torch.Generator().manual_seed(0))
    if 0 < p < 1:
        assert kept != module.drop_prompts(captions, torch.Generator().manual_seed(1))


def test_condition_dropout_rate_and_zero_draws_nothing(tiny_cfg, tiny_base):
    optim = copy.deepcopy(tiny_cfg.optim)
    module = ControlNetModule(tiny_base, torch.nn.Identity(), optim, branch=get_branch("copy"))
    conditions = torch.rand(10_000, 3, 2, 2) + 0.1
    generator = torch.Generator().manual_seed(0)
    assert module.drop_conditions(conditions, generator) is conditions  # 0: nothing drawn
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())
    optim.condition_dropout = 0.3
    dropped = module.drop_conditions(conditions, generator)
    zeroed = (dropped.flatten(1).abs().sum(1) == 0).float().mean().item()
    assert abs(zeroed - 0.3) <= 0.02


# ---- only_mid_control ---------------------------------------------------------------------------
def test_only_mid_control_keeps_down_residuals_out_in_training_and_sampling(tiny_cfg, tiny_base,
                                                                             tiny_data):
    module = make_module(tiny_cfg, tiny_base, only_mid_control=True, connector_init="gaussian")
    received = []

    def record(_, args, kwargs):
        received.append((kwargs["down_block_additional_residuals"],
                         kwargs["mid_block_additional_residual"]))

    hook = module.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        batch = {k: v for k, v in tiny_data.eval_batch().items() if k != "index"}  # no cache
        optimizer = module.configure_optimizers()
        for step in range(2):  # the down connectors must stay silent after training too
            loss = module.diffusion_loss(batch, torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sampling = OmegaConf.merge(tiny_cfg.sampling, {"steps": 2})
        generate(make_pipeline(module, sampling, progress=False), batch["condition"][:1],
                 batch["caption"][:1], sampling)
    finally:
        hook.remove()
    assert len(received) == 2 + 2  # two training steps, two sampling steps
    for down, mid in received:
        assert all(torch.count_nonzero(d) == 0 for d in down)
        assert torch.count_nonzero(mid) > 0


# ---- sampling through diffusers for every branch -----------------------------------------------
def test_every_branch_samples_the_base_at_step0(tiny_cfg, tiny_base, tiny_data):
    batch = tiny_data.eval_batch()
    sampling = OmegaConf.merge(tiny_cfg.sampling, {"steps": 2})
    images = {}
    for branch in BRANCHES:
        module = make_module(tiny_cfg, tiny_base, branch=branch)
        pipe = make_pipeline(module, sampling, progress=False)
        images[branch] = generate(pipe, batch["condition"][:2], batch["caption"][:2], sampling)
        assert module.controlnet.training  # generate() restores the train/eval state
    assert images["copy"].shape == (2, 3, 64, 64)
    for branch in BRANCHES:  # zero connectors: every branch draws the base's images
        assert torch.allclose(images[branch], images["copy"], atol=1e-5), branch
