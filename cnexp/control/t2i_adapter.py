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
  adapter's fourth output, which no block reads, is frozen). The light adapter has no such layout.
The pixel unshuffle is the latent's downscale factor (the condition embedding's, 2^(stages-1)).

Connectors (control.connector_init): the convs whose zero makes every output exactly zero while
gradients still reach the whole adapter: full - conv_in, each block's in_conv and every resnet's
last conv (block2); light - each block's out_conv. Zero (the default) starts at the base, like
every other arm; connector_init=default is the T2I-Adapter paper's own random start. Export:
T2IAdapter.save_pretrained (users load T2IAdapter.from_pretrained, StableDiffusionAdapterPipeline).
"""
from __future__ import annotations

from diffusers import StableDiffusionAdapterPipeline, T2IAdapter
from torch import nn

from cnexp.config import ControlConfig
from cnexp.control.branch import Branch, register
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
        adapter.requires_grad_(True)
        if adapter.config.adapter_type == "full_adapter_xl":
            adapter.adapter.body[3].requires_grad_(False)  # its output enters no block
        return adapter

    def connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        inner = control.adapter
        if control.config.adapter_type == "light_adapter":
            return [block.out_conv for block in inner.body]
        convs = [inner.conv_in] + [block.in_conv for block in inner.body if block.in_conv]
        return convs + [resnet.block2 for block in inner.body for resnet in block.resnets]

    def down_connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        raise ConfigError("control.branch=t2i_adapter has no skip-connection residuals")

    def hint_conv(self, control: nn.Module) -> nn.Conv2d:
        inner = control.adapter  # the first conv that reads the condition
        return inner.body[0].in_conv if control.config.adapter_type == "light_adapter" \
            else inner.conv_in

    def predict(self, unet, control, noisy, t, text, condition, conditioning_scale=1.0):
        features = [f * conditioning_scale for f in control(condition)]  # (B, C_k, h_k, w_k)
        return unet(noisy, t, encoder_hidden_states=text,
                    down_intrablock_additional_residuals=features).sample

    def pipeline(self, unet, control, **parts) -> StableDiffusionAdapterPipeline:
        return StableDiffusionAdapterPipeline(unet=unet, adapter=control, **parts)

    def sampling_inputs(self, pipe, conditions, conditioning_scale):
        return {"image": conditions, "adapter_conditioning_scale": conditioning_scale}

    def check(self, cfg: ControlConfig) -> None:
        if cfg.only_mid_control:
            raise ConfigError("control.branch=t2i_adapter adds its features inside the encoder "
                              "and has no middle-block residual: control.only_mid_control=true "
                              "does not apply; use control.branch=copy|lite|scratch|lora_copy")
