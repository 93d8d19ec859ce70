"""The paper's branch: a trainable copy of the UNet encoder (ControlNetModel.from_unet), and
its ablation `scratch`: the same architecture, randomly initialised instead of copied."""
from __future__ import annotations

from diffusers import ControlNetModel

from cnexp.control.branch import copied_by_name, register
from cnexp.control.residual import ResidualBranch, network


@register
class CopyBranch(ResidualBranch):
    name = "copy"
    model_class = ControlNetModel
    copy_weights = True

    def build(self, unet, cfg) -> ControlNetModel:
        control = ControlNetModel.from_unet(
            unet, load_weights_from_unet=self.copy_weights,
            conditioning_channels=cfg.conditioning_channels,
            conditioning_embedding_out_channels=tuple(cfg.conditioning_embedding_out_channels))
        return control.requires_grad_(True)

    def copied_from_base(self, control, unet):
        if not self.copy_weights:
            return {}
        # from_unet copies conv_in, the time embedding, the down blocks and the mid block under
        # the UNet's own names; the connectors and the hint embedding are the copy's own
        return copied_by_name(network(control), unet)


@register
class ScratchBranch(CopyBranch):
    name = "scratch"
    copy_weights = False
