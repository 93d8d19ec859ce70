"""The trainable control network joined to the frozen UNet."""
from __future__ import annotations

from diffusers import ControlNetModel, UNet2DConditionModel

from cnexp.config import ControlConfig


def build_controlnet(unet: UNet2DConditionModel, cfg: ControlConfig) -> ControlNetModel:
    """The paper's ControlNet: a trainable copy of the UNet encoder + zero-initialised 1x1 convs
    (diffusers' `from_unet` copies the weights and zero-initialises every connector)."""
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(cfg.conditioning_embedding_out_channels),
        conditioning_channels=cfg.conditioning_channels)
    controlnet.requires_grad_(True)
    return controlnet.train()
