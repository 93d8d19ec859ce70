"""What the branches that work like ControlNetModel share: they return residuals (one per UNet
skip connection, one for the middle block) that the frozen UNet adds to its own features.

Connectors are `controlnet_down_blocks[*]` and `controlnet_mid_block`, the 1x1 convs whose
outputs are the residuals. Sampling goes through diffusers' ControlNet pipeline, which accepts
ControlNetModel or MultiControlNetModel only: any other network with ControlNetModel's forward
(ControlNet-lite, the cross_norm wrapper) joins it wrapped in a one-net MultiControlNetModel.
With control.connector=cross_norm the network is wrapped in CrossNormControl (cross_norm.py);
connectors, copy drift and export act on the network inside.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline
from torch import nn

from cnexp.control.branch import Branch, conditioning_kwargs
from cnexp.control.cross_norm import CrossNormControl, load_scales


def network(control: nn.Module) -> nn.Module:
    """The branch's own network (inside a cross_norm wrapper, if any)."""
    inner = getattr(control, "network", None)
    return control if inner is None else inner


class ResidualBranch(Branch):
    def connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        control = network(control)
        return [*control.controlnet_down_blocks, control.controlnet_mid_block]

    def down_connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        return list(network(control).controlnet_down_blocks)

    def hint_conv(self, control: nn.Module) -> nn.Conv2d:
        return super().hint_conv(network(control))

    def predict(self, unet, control, noisy, t, cond, condition, conditioning_scale=1.0):
        cond = conditioning_kwargs(cond)  # SDXL's adds added_cond_kwargs to the text
        down, mid = control(noisy, t, controlnet_cond=condition,
                            conditioning_scale=conditioning_scale, return_dict=False, **cond)
        return unet(noisy, t, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, **cond).sample

    def pipeline(self, unet, control, pipeline_class=StableDiffusionControlNetPipeline,
                 **parts) -> StableDiffusionControlNetPipeline:
        """`pipeline_class`: the family's ControlNet pipeline (SDXL's for SDXL)."""
        if not isinstance(control, ControlNetModel):
            control = MultiControlNetModel([control]).train(control.training)
        return pipeline_class(unet=unet, controlnet=control, **parts)

    def sampling_inputs(self, pipe, conditions, conditioning_scale):
        if isinstance(pipe.controlnet, MultiControlNetModel):
            conditions = [conditions]  # one condition per wrapped net
        return {"image": conditions, "controlnet_conditioning_scale": conditioning_scale}

    def wrap_cross_norm(self, control, unet, cfg) -> CrossNormControl:
        wrapper = CrossNormControl(num_residuals=len(self.connectors(control)),
                                   initial_scale=cfg.cross_norm_scale)
        wrapper.network = control
        if cfg.only_mid_control:  # the skips' residuals stay exactly 0, as their connectors
            wrapper.active[:-1] = 0
        wrapper.attach(unet)
        return wrapper.train(control.training)

    def bind(self, control, unet) -> None:
        if isinstance(control, CrossNormControl):
            control.attach(unet)

    def export(self, control, directory: Path) -> None:
        if isinstance(control, CrossNormControl):
            control.save_scales(directory)
        self.export_network(network(control), directory)

    def export_network(self, control: nn.Module, directory: Path) -> None:
        """The branch's own network, in the form its users load (save_pretrained by default)."""
        control.save_pretrained(directory)

    def load(self, directory: Path) -> nn.Module:
        """The exported network; a cross_norm export comes back wrapped (attach the frozen UNet
        before running it)."""
        loaded = self.model_class.from_pretrained(directory)
        parts = load_scales(directory)
        return loaded if parts is None else CrossNormControl.from_parts(loaded, **parts)
