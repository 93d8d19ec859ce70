"""What the branches that work like ControlNetModel share: they return residuals (one per UNet
skip connection, one for the middle block) that the frozen UNet adds to its own features.

Connectors are `controlnet_down_blocks[*]` and `controlnet_mid_block`, the 1x1 convs whose
outputs are the residuals. Sampling goes through diffusers' ControlNet pipeline, which accepts
ControlNetModel or MultiControlNetModel only: any other network with ControlNetModel's forward
(ControlNet-lite) joins it wrapped in a one-net MultiControlNetModel.
"""
from __future__ import annotations

from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline
from torch import nn

from cnexp.control.branch import Branch


class ResidualBranch(Branch):
    def connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        return [*control.controlnet_down_blocks, control.controlnet_mid_block]

    def down_connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        return list(control.controlnet_down_blocks)

    def predict(self, unet, control, noisy, t, text, condition, conditioning_scale=1.0):
        down, mid = control(noisy, t, encoder_hidden_states=text, controlnet_cond=condition,
                            conditioning_scale=conditioning_scale, return_dict=False)
        return unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample

    def pipeline(self, unet, control, **parts) -> StableDiffusionControlNetPipeline:
        if not isinstance(control, ControlNetModel):
            control = MultiControlNetModel([control]).train(control.training)
        return StableDiffusionControlNetPipeline(unet=unet, controlnet=control, **parts)

