"""control.connector=cross_norm with the branches whose control enters inside the UNet: xs
(cnexp/control/xs.py, CrossNormXS) and t2i_adapter (cnexp/control/t2i_adapter.py,
CrossNormAdapter). Each feature they add is normalised with the per-sample statistics of the
UNet feature it is added to, times a learned scale - in training, sampling and a reloaded export."""
import pytest
import torch
from diffusers import UNetControlNetXSModel
from omegaconf import OmegaConf

from arms import per_sample, train_arm, unet_inputs as inputs
from cnexp.control import build_controlnet, get_branch
from cnexp.control.branch import Branch
from cnexp.control.cross_norm import SCALES_FILE, unwrap
from cnexp.control.t2i_adapter import CrossNormAdapter, CrossNormAdapterPipeline
from cnexp.control.xs import CrossNormXS, reference_points
from cnexp.errors import ConfigError
from cnexp.module import ControlNetModule
from cnexp.sampling import generate, make_pipeline

PRESET = {"connector": "cross_norm", "connector_init": "default"}
WRAPPERS = {"xs": CrossNormXS, "t2i_adapter": CrossNormAdapter}


def build(tiny_cfg, tiny_base, branch, **knobs):
    return build_controlnet(tiny_base.unet, OmegaConf.merge(
        tiny_cfg.control, {"branch": branch, **PRESET, **knobs}))


def assert_normalised(added, reference, scale):
    """`added` has the per-sample mean and std of `reference`, times `scale`."""
    assert added.shape == reference.shape
    (mean, std), (ref_mean, ref_std) = per_sample(added), per_sample(reference)
    assert torch.allclose(mean, scale * ref_mean, atol=1e-4), (mean, scale * ref_mean)
    assert torch.allclose(std, scale * ref_std, rtol=1e-3, atol=1e-5), (std, scale * ref_std)


def spread_scales(control):
    with torch.no_grad():
        control.scales.copy_(torch.linspace(0.5, 2.0, len(control.scales)))
    return control.scales.detach().clone()


@pytest.mark.parametrize("branch", ["xs", "t2i_adapter"])
def test_builds_and_scale_zero_starts_exactly_at_the_base(branch, tiny_cfg, tiny_base):
    control = build(tiny_cfg, tiny_base, branch, cross_norm_scale=0.0)
    assert type(control) is WRAPPERS[branch]
    assert control.scales.requires_grad and torch.count_nonzero(control.scales) == 0
    assert len(control.scales) == (19 if branch == "xs" else 4)  # one per connector / feature
    noisy, t, text, condition = inputs()
    module = ControlNetModule(tiny_base, control, tiny_cfg.optim)
    assert module.branch is get_branch(branch)
    with torch.no_grad():
        base = tiny_base.unet(noisy, t, encoder_hidden_states=text).sample
        assert torch.equal(module.controlled_prediction(noisy, t, text, condition), base)
        control.scales.fill_(1.0)  # the connectors are not zero: the control now shows
        assert (module.controlled_prediction(noisy, t, text, condition) - base).abs().max() > 1e-3


def test_xs_connectors_take_the_statistics_of_the_base_feature_they_add_into(tiny_cfg,
                                                                            tiny_base):
    control = build(tiny_cfg, tiny_base, "xs")
    scales = spread_scales(control)
    fused = unwrap(control)
    order = get_branch("xs").connectors(control)
    added, references, hooks = {}, {}, []
    for conv, source, where in reference_points(fused):
        k = order.index(conv)
        hooks.append(conv.register_forward_hook(  # runs after the cross_norm hook
            lambda m, a, out, k=k: added.__setitem__(k, out.detach().clone())))
        if where == "input":  # an up block adds in place into its input: keep it as it was
            hooks.append(source.register_forward_pre_hook(
                lambda m, a, kw, k=k: references.__setitem__(k, kw["hidden_states"].clone()),
                with_kwargs=True))
        else:
            hooks.append(source.register_forward_hook(lambda m, a, out, k=k: references.__setitem__(
                k, (out[0] if isinstance(out, tuple) else out).detach().clone())))
    noisy, t, text, condition = inputs()
    prediction = get_branch("xs").predict(tiny_base.unet, control, noisy, t, text, condition)
    for hook in hooks:
        hook.remove()
    assert sorted(added) == list(range(len(order))) == sorted(references)
    # the first connector adds into the base's conv_in output, the UNet's own
    assert torch.equal(references[order.index(fused.control_to_base_for_conv_in)],
                       tiny_base.unet.conv_in(noisy))
    for k in added:
        assert_normalised(added[k], references[k], scales[k])
    prediction.square().mean().backward()
    assert torch.count_nonzero(control.scales.grad) == len(scales)  # every scale learns
    assert not any(p.grad is not None for p in tiny_base.unet.parameters())


def entering(store, key):
    """A pre-hook that records the hidden state a module receives."""
    def hook(module, args, kwargs):
        store[key] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
    return hook


def leaving(store, key):
    def hook(module, args, out):
        store[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()
    return hook


def test_t2i_features_take_the_statistics_of_the_encoder_state_they_are_added_to(tiny_cfg,
                                                                                tiny_base):
    """Where diffusers adds the tiny world's 4 adapter features (full_adapter_xl): after down
    block 0 (no attention), inside blocks 1 and 2 after their last attention, after the middle
    block (the fourth, XL's). What each point receives minus what the base computed there is the
    added feature: its statistics are the base state's, times the scale (and the conditioning
    scale, applied after the normalisation)."""
    unet = tiny_base.unet
    control = build(tiny_cfg, tiny_base, "t2i_adapter")
    scales = spread_scales(control)
    before, after = {}, {}
    hooks = [unet.down_blocks[0].register_forward_hook(leaving(before, 0)),
             unet.down_blocks[1].register_forward_pre_hook(entering(after, 0), with_kwargs=True),
             unet.down_blocks[1].attentions[-1].register_forward_hook(leaving(before, 1)),
             unet.down_blocks[1].downsamplers[0].register_forward_pre_hook(
                 entering(after, 1), with_kwargs=True),
             unet.down_blocks[2].attentions[-1].register_forward_hook(leaving(before, 2)),
             unet.mid_block.register_forward_pre_hook(entering(after, 2), with_kwargs=True),
             unet.mid_block.register_forward_hook(leaving(before, 3)),
             unet.up_blocks[0].register_forward_pre_hook(entering(after, 3), with_kwargs=True)]
    noisy, t, text, condition = inputs()
    prediction = get_branch("t2i_adapter").predict(unet, control, noisy, t, text, condition,
                                                   conditioning_scale=0.5)
    for hook in hooks:
        hook.remove()
    assert sorted(before) == sorted(after) == [0, 1, 2, 3]
    for k in range(4):
        assert_normalised((after[k] - before[k]) / 0.5, before[k], scales[k])
    prediction.square().mean().backward()
    assert torch.count_nonzero(control.scales.grad) == 4
    assert not any(p.grad is not None for p in unet.parameters())


@pytest.mark.parametrize("branch", ["xs", "t2i_adapter"])
def test_export_loads_back_to_the_same_outputs(branch, tiny_cfg, tiny_base, tmp_path):
    control = build(tiny_cfg, tiny_base, branch)
    spread_scales(control)
    get_branch(branch).export(control, tmp_path)
    assert (tmp_path / SCALES_FILE).exists()
    loaded = get_branch(branch).load(tmp_path)
    assert type(loaded) is WRAPPERS[branch] and torch.equal(loaded.scales, control.scales)
    if branch == "xs":
        assert type(loaded.network) is UNetControlNetXSModel
    batch = inputs(1)
    with torch.no_grad():
        want = ControlNetModule(tiny_base, control, tiny_cfg.optim).controlled_prediction(*batch)
        got = ControlNetModule(tiny_base, loaded, tiny_cfg.optim).controlled_prediction(*batch)
    assert torch.equal(got, want)


def test_plain_xs_export_loads_back_the_norms_it_trained_with(tiny_cfg, tiny_base, tmp_path):
    """diffusers' from_pretrained rebuilds some of the fused model's GroupNorms with other group
    counts and eps than from_unet + match_norm_eps gave it; group_norms.json puts them back."""
    control = build_controlnet(tiny_base.unet, OmegaConf.merge(
        tiny_cfg.control, {"branch": "xs", "connector_init": "default"}))
    get_branch("xs").export(control, tmp_path)
    loaded = get_branch("xs").load(tmp_path)
    assert type(loaded) is UNetControlNetXSModel
    batch = inputs(2)
    with torch.no_grad():
        want = ControlNetModule(tiny_base, control, tiny_cfg.optim).controlled_prediction(*batch)
        got = ControlNetModule(tiny_base, loaded, tiny_cfg.optim).controlled_prediction(*batch)
    assert torch.equal(got, want)


def plain_twin(control, branch, tiny_cfg, tiny_base):
    """The same weights with control.connector=conv: the features enter as they are."""
    if branch == "t2i_adapter":
        return control.network  # the adapter itself: its hooks live on the wrapper
    twin = build_controlnet(tiny_base.unet, OmegaConf.merge(
        tiny_cfg.control, {"branch": "xs", "connector_init": "default"}))
    twin.load_state_dict(control.network.state_dict())  # XS's hooks sit on the fused model
    return twin


@pytest.mark.parametrize("branch", ["xs", "t2i_adapter"])
def test_sampling_normalises_the_features(branch, tiny_cfg, tiny_base):
    control = build(tiny_cfg, tiny_base, branch).eval()
    twin = plain_twin(control, branch, tiny_cfg, tiny_base).eval()
    conditions, prompts = torch.rand(1, 3, 64, 64), ["a red circle"]
    sampling = OmegaConf.merge(tiny_cfg.sampling, {"steps": 2})
    images = {}
    for name, network in (("cross_norm", control), ("conv", twin)):
        module = ControlNetModule(tiny_base, network, tiny_cfg.optim)
        pipe = make_pipeline(module, sampling, progress=False)
        if name == "cross_norm" and branch == "t2i_adapter":
            assert isinstance(pipe, CrossNormAdapterPipeline)
        images[name] = generate(pipe, conditions, prompts, sampling)
    assert (images["cross_norm"] - images["conv"]).abs().max() > 1e-3
    with torch.no_grad():  # scale 0: the normalised features add exactly nothing
        control.scales.zero_()
    module = ControlNetModule(tiny_base, control, tiny_cfg.optim)
    cfg = OmegaConf.merge(sampling, {"conditioning_scale": 0.7})
    zero = generate(make_pipeline(module, cfg, progress=False), conditions, prompts, cfg)
    twin_module = ControlNetModule(tiny_base, twin, tiny_cfg.optim)
    off = OmegaConf.merge(sampling, {"conditioning_scale": 0.0})
    base = generate(make_pipeline(twin_module, off, progress=False), conditions, prompts, off)
    assert torch.equal(zero, base)


@pytest.mark.parametrize("branch", ["xs", "t2i_adapter"])
def test_a_few_training_steps_move_the_scales_and_the_run_reloads(branch, tmp_path):
    summary, loaded, cfg = train_arm(tmp_path, ["+ablation=cross_norm",
                                                f"control.branch={branch}"])
    assert summary["controlnet_class"] == WRAPPERS[branch].__name__
    assert summary["base_damage_step0"] > 0  # scale 1 and no zero convolutions at step 0
    assert type(loaded) is WRAPPERS[branch]
    start = torch.full_like(loaded.scales, cfg.control.cross_norm_scale)
    assert not torch.equal(loaded.scales, start)  # the scales trained


def test_a_branch_that_does_not_say_where_its_features_enter_refuses_cross_norm():
    class Opaque(Branch):
        name = "opaque"

    with pytest.raises(ConfigError, match="does not say where its features enter the UNet"):
        Opaque().wrap_cross_norm(None, None, None)
