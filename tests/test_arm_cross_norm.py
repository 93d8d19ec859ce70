"""control.connector=cross_norm (cnexp/control/cross_norm.py): ControlNeXt's Cross Normalization
in place of zero convolutions, with the branches that return residuals (xs and t2i_adapter:
tests/test_cross_norm_branches.py)."""
import pytest
import torch
from omegaconf import OmegaConf

from arms import per_sample, train_arm, unet_inputs as inputs
from cnexp.control import build_controlnet, get_branch
from cnexp.control.cross_norm import CrossNormControl, skip_features
from cnexp.errors import CnexpError, ConfigError
from cnexp.module import ControlNetModule

PRESET = {"connector": "cross_norm", "connector_init": "default"}


def control_cfg(tiny_cfg, **knobs):
    return OmegaConf.merge(tiny_cfg.control, knobs)


def test_cross_norm_with_lite_trains_samples_exports_and_reloads(tmp_path, tiny_cfg, tiny_base):
    summary, loaded, _ = train_arm(tmp_path, ["+ablation=cross_norm", "control.branch=lite"])
    assert summary["controlnet_class"] == "CrossNormControl"
    assert summary["base_damage_step0"] > 0  # no zero convolutions: scale 1 from the start
    assert (tmp_path / "run" / "controlnet" / "cross_norm.safetensors").exists()
    assert isinstance(loaded, CrossNormControl) and type(loaded.network).__name__ == \
        "ControlNetLite"
    with pytest.raises(CnexpError, match="attach"):
        loaded(*inputs()[:2], encoder_hidden_states=inputs()[2], controlnet_cond=inputs()[3])
    # ControlNetModule joins it to the frozen UNet (what cnexp.evaluate does with an export)
    module = ControlNetModule(tiny_base, loaded, tiny_cfg.optim, branch=get_branch("lite"))
    assert module.controlled_prediction(*inputs()).shape == (2, 4, 16, 16)


@pytest.mark.parametrize("branch", ["copy", "lora_copy"])
def test_residuals_take_the_frozen_features_statistics_times_a_learned_scale(
        branch, tiny_cfg, tiny_base):
    unet = tiny_base.unet
    control = build_controlnet(unet, control_cfg(tiny_cfg, branch=branch, **PRESET))
    with torch.no_grad():
        control.scales.copy_(torch.linspace(0.5, 2.0, len(control.scales)))
    noisy, t, text, condition = inputs()
    down, mid = control(noisy, t, encoder_hidden_states=text, controlnet_cond=condition,
                        return_dict=False)
    ref_down, ref_mid = skip_features(unet, noisy, t, text)
    assert torch.equal(ref_down[0], unet.conv_in(noisy))  # the UNet's own first skip feature
    for residual, reference, scale in zip([*down, mid], [*ref_down, ref_mid], control.scales):
        assert residual.shape == reference.shape
        (mean, std), (ref_mean, ref_std) = per_sample(residual), per_sample(reference)
        assert torch.allclose(mean, scale * ref_mean, atol=1e-4)
        assert torch.allclose(std, scale * ref_std, rtol=1e-3)
    loss = sum(r.square().mean() for r in [*down, mid])
    loss.backward()
    assert control.scales.grad.abs().min() > 0  # the scales learn
    assert not any(p.grad is not None for p in unet.parameters())  # the base stays frozen


def test_scale_zero_starts_at_the_base(tiny_cfg, tiny_base):
    control = build_controlnet(tiny_base.unet, control_cfg(tiny_cfg, cross_norm_scale=0.0,
                                                           **PRESET))
    module = ControlNetModule(tiny_base, control, tiny_cfg.optim)
    noisy, t, text, condition = inputs()
    with torch.no_grad():
        base = tiny_base.unet(noisy, t, encoder_hidden_states=text).sample
        assert torch.equal(module.controlled_prediction(noisy, t, text, condition), base)


def test_only_mid_control_keeps_the_skips_exactly_zero(tiny_cfg, tiny_base, tmp_path):
    branch = get_branch("copy")
    control = build_controlnet(tiny_base.unet, control_cfg(tiny_cfg, only_mid_control=True,
                                                           **PRESET))
    noisy, t, text, condition = inputs()
    with torch.no_grad():
        down, mid = control(noisy, t, encoder_hidden_states=text, controlnet_cond=condition,
                            return_dict=False)
    assert all(torch.count_nonzero(d) == 0 for d in down) and torch.count_nonzero(mid) > 0
    branch.export(control, tmp_path)
    again = branch.load(tmp_path)
    assert torch.equal(again.active, control.active) and torch.equal(again.scales, control.scales)


@pytest.mark.parametrize("knobs, message", [
    ({"connector": "cross_norm"}, "connector_init=default"),
    ({"branch": "xs", "connector": "cross_norm"}, "connector_init=default"),
])
def test_combinations_it_cannot_honour_fail_naming_the_fix(knobs, message, tiny_cfg, tiny_base):
    with pytest.raises(ConfigError, match=message):
        build_controlnet(tiny_base.unet, control_cfg(tiny_cfg, **knobs))
