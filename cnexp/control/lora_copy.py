"""lora_copy: the paper's trainable copy, trained through low-rank adapters instead of in full.

The copy is built as for `copy` (ControlNetModel.from_unet: conv_in, the time embedding, the
encoder and the middle block copied from the base), then every Linear and Conv2d of those copied
parts gets a LoRA adapter of rank control.lora_rank (peft; alpha = rank, so the update is B A,
with B zero at the start: step 0 is exactly the copy) and its copied weight is frozen. What is
new in ControlNet trains in full: the condition embedding and the zero connectors. The arm asks
how much of the copy's capacity the control needs, between lite (no copy) and the full copy.

Export: the adapters merged into the copy's weights and saved as a plain ControlNetModel
(save_pretrained), so users load it with ControlNetModel.from_pretrained like any ControlNet.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

from diffusers import ControlNetModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from cnexp.control.branch import register
from cnexp.control.residual import ResidualBranch

COPIED_PARTS = ("conv_in", "time_embedding", "down_blocks", "mid_block")  # from_unet copies these
NEW_PARTS = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")


def copied_layers(control: ControlNetModel) -> list[str]:
    """Names of the Linear and Conv2d layers that from_unet copied from the base."""
    return [name for name, module in control.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and name.split(".")[0] in COPIED_PARTS]


def merged(control: ControlNetModel) -> ControlNetModel:
    """A plain ControlNetModel whose weights are the copy's plus its adapters' updates."""
    plain = copy.deepcopy(control)
    for name, module in list(plain.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child,
                    module.get_base_layer())
    return plain


@register
class LoraCopyBranch(ResidualBranch):
    name = "lora_copy"
    model_class = ControlNetModel

    def build(self, unet, cfg) -> ControlNetModel:
        control = ControlNetModel.from_unet(
            unet, conditioning_channels=cfg.conditioning_channels,
            conditioning_embedding_out_channels=tuple(cfg.conditioning_embedding_out_channels))
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, lora_dropout=0.0,
                          # a regex matches whole names: a list would also match by suffix
                          # (conv_in would catch controlnet_cond_embedding.conv_in)
                          target_modules="|".join(map(re.escape, copied_layers(control))))
        control = inject_adapter_in_model(lora, control)
        control.requires_grad_(False)
        for name, param in control.named_parameters():
            if "lora_" in name or name.split(".")[0] in NEW_PARTS:
                param.requires_grad_(True)
        return control

    def owns(self, network: nn.Module) -> bool:
        return type(network) is ControlNetModel and any(
            isinstance(m, LoraLayer) for m in network.modules())

    def export_network(self, control: nn.Module, directory: Path) -> None:
        merged(control).save_pretrained(directory)
