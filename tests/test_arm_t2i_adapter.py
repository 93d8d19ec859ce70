"""control.branch=t2i_adapter (cnexp/control/t2i_adapter.py): diffusers' T2IAdapter whose
features enter the UNet encoder; trains, samples through StableDiffusionAdapterPipeline, exports
a T2IAdapter."""
import pytest
import torch
from diffusers import StableDiffusionAdapterPipeline, T2IAdapter, UNet2DConditionModel
from omegaconf import OmegaConf

from arms import train_arm
from cnexp.control import build_controlnet, count_trainable, get_branch
from cnexp.errors import ConfigError


def control_cfg(tiny_cfg, **knobs):
    return OmegaConf.merge(tiny_cfg.control, knobs)


def sd_layout_unet() -> UNet2DConditionModel:
    """A small UNet laid out like SD 1.5: every block but the last attends, last two equal."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def encoder_inputs(unet, control, branch, inputs, condition):
    """What the UNet's second encoder block receives, with the control's output added."""
    seen = []
    hook = unet.down_blocks[1].register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["hidden_states"].clone()),
        with_kwargs=True)
    try:
        with torch.no_grad():
            branch.predict(unet, control, *inputs, condition)
    finally:
        hook.remove()
    return seen[0]


class NoControl:
    def predict(self, unet, control, noisy, t, text, condition):
        return unet(noisy, t, encoder_hidden_states=text).sample


def test_t2i_adapter_trains_samples_exports_and_reloads(tmp_path):
    summary, loaded, _ = train_arm(tmp_path, ["+ablation=t2i_adapter"])
    assert summary["controlnet_class"] == "T2IAdapter"
    assert summary["base_damage_step0"] == 0.0  # zero connectors: step 0 is the base
    assert isinstance(loaded, T2IAdapter)
    again = T2IAdapter.from_pretrained(tmp_path / "run" / "controlnet")  # what users load
    assert again.config.adapter_type == "full_adapter_xl"  # the tiny world's first block: no attn
    branch = get_branch("t2i_adapter")
    assert any(torch.count_nonzero(c.weight) > 0 for c in branch.connectors(again))  # trained


def test_control_enters_the_encoder_not_the_skips(tiny_cfg, tiny_base):
    unet = tiny_base.unet
    torch.manual_seed(0)
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 77, 64))
    condition = torch.rand(2, 3, 64, 64)
    base = encoder_inputs(unet, None, NoControl(), inputs, condition)
    adapter_cfg = control_cfg(tiny_cfg, branch="t2i_adapter", connector_init="default")
    adapter = build_controlnet(unet, adapter_cfg)
    copy = build_controlnet(unet, control_cfg(tiny_cfg, connector_init="gaussian"))
    via_adapter = encoder_inputs(unet, adapter, get_branch("t2i_adapter"), inputs, condition)
    via_copy = encoder_inputs(unet, copy, get_branch("copy"), inputs, condition)
    assert torch.equal(via_copy, base)  # ControlNet's residuals reach only the skips
    assert (via_adapter - base).abs().max() > 1e-3  # the adapter's feature is in the encoder


def test_light_and_full_adapters_fit_an_sd_layout_base(tiny_cfg):
    unet = sd_layout_unet()
    counts = {}
    for kind in ("full", "light"):
        control = build_controlnet(unet, control_cfg(tiny_cfg, branch="t2i_adapter",
                                                     adapter_type=kind, connector_init="default"))
        assert control.config.adapter_type == f"{kind}_adapter"
        prediction = get_branch("t2i_adapter").predict(
            unet, control, torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 16),
            torch.rand(1, 3, 64, 64))  # the features' shapes fit every encoder block
        assert prediction.shape == (1, 4, 16, 16)
        counts[kind] = count_trainable(control)
    assert 0 < counts["light"] < counts["full"]


def test_light_adapter_refuses_a_base_it_has_no_layout_for(tiny_cfg, tiny_base):
    with pytest.raises(ConfigError, match="control.adapter_type=light has no diffusers"):
        build_controlnet(tiny_base.unet, control_cfg(tiny_cfg, branch="t2i_adapter",
                                                     adapter_type="light"))
    with pytest.raises(ConfigError, match="only_mid_control=true does not apply"):
        build_controlnet(tiny_base.unet, control_cfg(tiny_cfg, branch="t2i_adapter",
                                                     only_mid_control=True))


def test_the_adapter_samples_through_diffusers_adapter_pipeline(tiny_cfg, tiny_base):
    from cnexp.module import ControlNetModule
    from cnexp.sampling import make_pipeline

    control = build_controlnet(tiny_base.unet, control_cfg(tiny_cfg, branch="t2i_adapter"))
    module = ControlNetModule(tiny_base, control, tiny_cfg.optim)
    pipe = make_pipeline(module, tiny_cfg.sampling, progress=False)
    assert isinstance(pipe, StableDiffusionAdapterPipeline) and pipe.adapter is control
    inputs = module.branch.sampling_inputs(pipe, torch.rand(1, 3, 64, 64), 0.5)
    assert inputs["adapter_conditioning_scale"] == 0.5 and "controlnet_conditioning_scale" \
        not in inputs
