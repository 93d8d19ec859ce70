"""ControlNet-lite (paper, Fig. 8): the trainable copy replaced by one convolution per block.

The full ControlNet runs a trainable copy of the UNet encoder: every encoder block (each
resnet[+attention] layer and each downsampler, 12 in SD 1.5, plus the middle block) produces one
feature map that a zero connector adds to the matching UNet skip connection. ControlNet-lite keeps
that interface and the condition embedding, and replaces each block by a single layer:

  h0      = conv_in(noisy latent) + condition_embedding(condition)    3x3 conv, like the copy's
  h_k     = SiLU(Conv3x3(h_{k-1}))   one per encoder block: stride 2 where the UNet downsamples,
                                     out channels = that block's channels
  h_mid   = SiLU(Conv3x3(h_last))    the middle block, at the lowest resolution
  residual_k = connector_k(h_k)      1x1 convs, zero at start (`controlnet_down_blocks`,
                                     `controlnet_mid_block`, named as in ControlNetModel)

No timestep, no text, no attention and no pretrained weights (PyTorch's default init): lite sees
only the noisy latent and the condition, which is why the paper finds it fails without a prompt.
Its forward takes and returns what ControlNetModel's does, so the training loop and diffusers'
ControlNet pipeline (through MultiControlNetModel) run it unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.controlnets.controlnet import (ControlNetConditioningEmbedding,
                                                     ControlNetOutput)
from torch import nn

from cnexp.control.branch import register
from cnexp.control.residual import ResidualBranch


def residual_layout(unet: UNet2DConditionModel) -> tuple[list[int], list[int]]:
    """Channels and strides of the UNet's skip connections, in the order ControlNetModel
    returns its down-block residuals: conv_in, then per block its layers and its downsampler."""
    channels, strides = [unet.config.block_out_channels[0]], [1]
    layers = unet.config.layers_per_block
    for i, width in enumerate(unet.config.block_out_channels):
        n = layers if isinstance(layers, int) else layers[i]
        channels += [width] * n
        strides += [1] * n
        if i < len(unet.config.block_out_channels) - 1:  # every block but the last downsamples
            channels.append(width)
            strides.append(2)
    return channels, strides


class ControlNetLite(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 4, residual_channels: tuple[int, ...] = (320,),
                 residual_strides: tuple[int, ...] = (1,), mid_channels: int = 1280,
                 conditioning_channels: int = 3,
                 conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                 global_pool_conditions: bool = False):  # read by diffusers' ControlNet pipeline
        super().__init__()
        first = residual_channels[0]
        self.conv_in = nn.Conv2d(in_channels, first, kernel_size=3, padding=1)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            first, conditioning_channels, tuple(conditioning_embedding_out_channels))
        self.blocks = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1)
            for c_in, c_out, stride in zip(residual_channels[:-1], residual_channels[1:],
                                           residual_strides[1:]))
        self.mid_block = nn.Conv2d(residual_channels[-1], mid_channels, kernel_size=3, padding=1)
        self.controlnet_down_blocks = nn.ModuleList(
            nn.Conv2d(c, c, kernel_size=1) for c in residual_channels)
        self.controlnet_mid_block = nn.Conv2d(mid_channels, mid_channels, kernel_size=1)
        for conv in [*self.controlnet_down_blocks, self.controlnet_mid_block]:
            nn.init.zeros_(conv.weight)  # zero connectors, as in ControlNetModel
            nn.init.zeros_(conv.bias)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, conditioning_channels: int = 3,
                  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
                  ) -> "ControlNetLite":
        channels, strides = residual_layout(unet)
        return cls(in_channels=unet.config.in_channels, residual_channels=tuple(channels),
                   residual_strides=tuple(strides), mid_channels=unet.config.block_out_channels[-1],
                   conditioning_channels=conditioning_channels,
                   conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))

    def forward(self, sample: torch.Tensor, timestep=None, encoder_hidden_states=None,
                controlnet_cond: torch.Tensor = None, conditioning_scale: float = 1.0,
                guess_mode: bool = False, return_dict: bool = True, **unused):
        """ControlNetModel's signature; timestep, text and the other UNet inputs are ignored."""
        if guess_mode:
            raise ValueError("ControlNet-lite does not implement guess_mode")
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)  # (B, C0, h, w)
        features = [h]
        for block in self.blocks:
            h = F.silu(block(h))  # (B, C_k, h / s, w / s)
            features.append(h)
        mid = F.silu(self.mid_block(h))  # (B, C_mid, h_min, w_min)
        down = tuple(conn(f) * conditioning_scale
                     for conn, f in zip(self.controlnet_down_blocks, features))
        mid = self.controlnet_mid_block(mid) * conditioning_scale
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)


@register
class LiteBranch(ResidualBranch):
    name = "lite"
    model_class = ControlNetLite

    def build(self, unet, cfg) -> ControlNetLite:
        return ControlNetLite.from_unet(
            unet, conditioning_channels=cfg.conditioning_channels,
            conditioning_embedding_out_channels=tuple(cfg.conditioning_embedding_out_channels))
