"""T2I-Adapter (Mou et al. 2023) from diffusers: a small network that reads only the condition and
adds one feature map per UNet encoder block *inside* the encoder
(`down_intrablock_additional_residuals`): control enters the encoder's path, not the skip
connections, and it sees neither the noisy latent, the timestep nor the text.

control.adapter_type picks diffusers' variant; the layout follows the base:
- a base whose first encoder block attends (SD 1.5/2.1): the feature of block k is added before
  its downsampler, at latent / 2^k: `full_adapter` (channels = the blocks' channels) or
  `light_adapter` (channels = all but the last block's, which must repeat the one before);
- a base whose first block does not attend (SDXL, the tiny world): that block's feature is added
  after its downsampler, so blocks 0 and 1 share a resolution: `full_adapter_xl` (3 blocks; the
  adapter's fourth output is added after the middle block, where its shape matches the UNet's:
  it trains like the others). The light adapter has no such layout.
The pixel unshuffle is the latent's downscale factor (the condition embedding's, 2^(stages-1)).

Connectors (control.connector_init): the convs whose zero makes every output exactly zero while
gradients still reach the whole adapter: full - conv_in, each block's in_conv and every resnet's
last conv (block2); light - each block's out_conv. Zero (the default) starts at the base, like
every other arm; connector_init=default is the T2I-Adapter paper's own random start. Export:
T2IAdapter.save_pretrained (users load T2IAdapter.from_pretrained, StableDiffusionAdapterPipeline).

control.connector=cross_norm: feature k enters as h_k + c * cross_normalize(f_k, h_k, s_k), h_k
the encoder hidden state diffusers adds it to (computed in the same forward, so it carries the
earlier blocks' control), c the conditioning scale, s_k learned (cross_norm.py). diffusers adds
the features inside the UNet, so `CrossNormAdapter.normalising(unet, c)` hooks those points for
the length of a call: `predict` in training, `CrossNormAdapterPipeline` (diffusers' adapter
pipeline, whose features are computed once per image, joined per UNet call) in sampling. Export:
T2IAdapter.save_pretrained plus `cross_norm.safetensors`; `get_branch("t2i_adapter").load(dir)`
gives the CrossNormAdapter back.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import StableDiffusionAdapterPipeline, T2IAdapter
from torch import nn

from cnexp.config import ControlConfig
from cnexp.control.branch import Branch, conditioning_kwargs, register
from cnexp.control.cross_norm import CrossNormControl, cross_normalize, load_scales, unwrap
from cnexp.errors import ConfigError


def adapter_layout(unet, cfg: ControlConfig) -> dict:
    """T2IAdapter's constructor arguments for this base and control.adapter_type."""
    channels = list(unet.config.block_out_channels)
    attends_first = "CrossAttn" in unet.config.down_block_types[0]
    factor = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)  # image px per latent px
    kind = str(cfg.adapter_type)
    if attends_first and kind == "full":
        return dict(channels=channels, downscale_factor=factor, adapter_type="full_adapter")
    if attends_first and kind == "light" and len(channels) > 1 and channels[-1] == channels[-2]:
        return dict(channels=channels[:-1], downscale_factor=factor, adapter_type="light_adapter",
                    num_res_blocks=4)
    if not attends_first and kind == "full" and len(channels) == 3:
        return dict(channels=[*channels, channels[-1]], downscale_factor=2 * factor,
                    adapter_type="full_adapter_xl")
    raise ConfigError(f"control.adapter_type={kind} has no diffusers T2I-Adapter layout for this "
                      f"base (down blocks {list(unet.config.down_block_types)}, channels "
                      f"{channels}); use control.adapter_type=full, or a base whose first block "
                      "attends (SD 1.5/2.1) for light")


@register
class T2IAdapterBranch(Branch):
    name = "t2i_adapter"
    model_class = T2IAdapter

    def build(self, unet, cfg) -> T2IAdapter:
        adapter = T2IAdapter(in_channels=cfg.conditioning_channels, **adapter_layout(unet, cfg))
        return adapter.requires_grad_(True)

    def connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        control = unwrap(control)
        inner = control.adapter
        if control.config.adapter_type == "light_adapter":
            return [block.out_conv for block in inner.body]
        convs = [inner.conv_in] + [block.in_conv for block in inner.body if block.in_conv]
        return convs + [resnet.block2 for block in inner.body for resnet in block.resnets]

    def down_connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        raise ConfigError("control.branch=t2i_adapter has no skip-connection residuals")

    def hint_conv(self, control: nn.Module) -> nn.Conv2d:
        control = unwrap(control)
        inner = control.adapter  # the first conv that reads the condition
        return inner.body[0].in_conv if control.config.adapter_type == "light_adapter" \
            else inner.conv_in

    def predict(self, unet, control, noisy, t, cond, condition, conditioning_scale=1.0):
        cond = conditioning_kwargs(cond)
        if isinstance(control, CrossNormAdapter):  # the scale multiplies the normalised feature
            with control.normalising(unet, conditioning_scale):
                return unet(noisy, t, **cond,
                            down_intrablock_additional_residuals=control(condition)).sample
        features = [f * conditioning_scale for f in control(condition)]  # (B, C_k, h_k, w_k)
        return unet(noisy, t, **cond,
                    down_intrablock_additional_residuals=features).sample

    def pipeline(self, unet, control, **parts) -> StableDiffusionAdapterPipeline:
        kind = CrossNormAdapterPipeline if isinstance(control, CrossNormAdapter) \
            else StableDiffusionAdapterPipeline
        return kind(unet=unet, adapter=control, **parts)

    def sampling_inputs(self, pipe, conditions, conditioning_scale):
        return {"image": conditions, "adapter_conditioning_scale": conditioning_scale}

    def wrap_cross_norm(self, control, unet, cfg) -> CrossNormAdapter:
        scales = torch.full((len(control.adapter.body),), float(cfg.cross_norm_scale))
        return CrossNormAdapter.from_parts(control, scales).train(control.training)

    def export(self, control, directory: Path) -> None:
        if isinstance(control, CrossNormAdapter):
            control.save_scales(directory)
        unwrap(control).save_pretrained(directory)

    def load(self, directory: Path) -> nn.Module:
        adapter = T2IAdapter.from_pretrained(directory)
        parts = load_scales(directory)
        return adapter if parts is None else CrossNormAdapter.from_parts(adapter, **parts)

    def check(self, cfg: ControlConfig) -> None:
        if cfg.only_mid_control:
            raise ConfigError("control.branch=t2i_adapter adds its features inside the encoder "
                              "and has no middle-block residual: control.only_mid_control=true "
                              "does not apply; use control.branch=copy|lite|scratch|lora_copy")


class CrossNormAdapter(CrossNormControl):
    """A T2IAdapter whose features (one scale each) enter cross-normalised; it returns them raw,
    `normalising` joins them to the UNet."""

    def forward(self, condition: torch.Tensor) -> list[torch.Tensor]:
        return self.network(condition)

    @property
    def downscale_factor(self) -> int:  # read by diffusers' adapter pipeline
        return self.network.downscale_factor

    @property
    def total_downscale_factor(self) -> int:
        return self.network.total_downscale_factor

    @contextmanager
    def normalising(self, unet, conditioning_scale: float = 1.0):
        """Within: the UNet's down_intrablock_additional_residuals enter cross-normalised."""
        def join(k, feature, hidden):
            return hidden + conditioning_scale * cross_normalize(feature, hidden, self.scales[k])

        with intrablock_features(unet, join):
            yield


class CrossNormAdapterPipeline(StableDiffusionAdapterPipeline):
    """diffusers' adapter pipeline for a CrossNormAdapter: adapter_conditioning_scale multiplies
    the normalised features (scaling the raw ones would be undone by the normalisation)."""

    def __call__(self, *args, adapter_conditioning_scale: float = 1.0, **kwargs):
        with self.adapter.normalising(self.unet, adapter_conditioning_scale):
            return super().__call__(*args, adapter_conditioning_scale=1.0, **kwargs)


@contextmanager
def intrablock_features(unet, join):
    """Within: the features a UNet call gets as down_intrablock_additional_residuals enter where
    diffusers adds them - an attending down block's last layer, after any other down block, a
    leftover of the middle block's shape after it (T2I-Adapter-XL) - as join(k, f_k, hidden)
    instead of hidden + f_k. The UNet itself never sees them.

    Mirrors diffusers' `UNet2DConditionModel.forward` (its `is_adapter` branches: an attending
    block's `additional_residuals`, `sample += ....pop(0)` after a plain block and after the
    middle block when the shapes match); tests/test_t2i_intrablock_pin.py pins the two equal."""
    state = {"features": [], "next": 0}

    def take(module, args, kwargs):
        state["features"] = list(kwargs.get("down_intrablock_additional_residuals") or [])
        state["next"] = 0
        return args, {**kwargs, "down_intrablock_additional_residuals": None}

    def pending(shape=None) -> bool:
        k = state["next"]
        return k < len(state["features"]) and shape in (None, state["features"][k].shape)

    def joined(hidden):
        state["next"] += 1
        k = state["next"] - 1
        return join(k, state["features"][k], hidden)

    def after_attention(module, args, out):  # (hidden,) from return_dict=False
        return (joined(out[0]), *out[1:]) if pending() else None

    def after_block(module, args, out):  # (hidden, skips): the last skip is the hidden state
        if not pending():
            return None
        hidden, skips = out
        new = joined(hidden)
        return new, tuple(new if skip is hidden else skip for skip in skips)

    def after_mid(module, args, out):
        return joined(out) if pending(out.shape) else None

    handles = [unet.register_forward_pre_hook(take, with_kwargs=True)]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            handles.append(block.attentions[-1].register_forward_hook(after_attention))
        else:
            handles.append(block.register_forward_hook(after_block))
    if unet.mid_block is not None:
        handles.append(unet.mid_block.register_forward_hook(after_mid))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
