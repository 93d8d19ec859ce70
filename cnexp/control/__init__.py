"""The trainable control branch joined to the frozen UNet: the ablation axes live here.

  control.branch    one module per branch, each a `Branch` (branch.py) that registers itself:
                    copy, scratch (trainable_copy.py), lite (lite.py), xs (xs.py),
                    lora_copy (lora_copy.py), t2i_adapter (t2i_adapter.py); a new branch is
                    one new module (cnexp/registry.py)
  connector_init    how the branch's connectors start                    (connectors.py)
  connector         conv (the connectors' output enters as it is) | cross_norm (normalised
                    with the frozen UNet's statistics, a learned scale)  (cross_norm.py)
  sd_locked=false   the UNet decoder (up_blocks, conv_norm_out, conv_out) trains too
  only_mid_control  the skip-connection connectors stay zero: only the mid residual is added
"""
from __future__ import annotations

from diffusers import ModelMixin, UNet2DConditionModel
from torch import nn

from cnexp.config import ControlConfig
from cnexp.control.branch import BRANCHES, Branch, branch_of, get_branch  # noqa: F401
from cnexp.control.connectors import init_connectors, silence_down_connectors
from cnexp.errors import ConfigError


DECODER_PARTS = ("up_blocks", "conv_norm_out", "conv_out")  # authors: output_blocks + out


def build_controlnet(unet: UNet2DConditionModel, cfg: ControlConfig,
                     branch: Branch | None = None) -> ModelMixin:
    """The control branch `cfg` describes (`branch`: as the base's family builds it; default
    the registered one), trainable, its connectors initialised.

    Also applies the authors' switches that act on the base: with `sd_locked=false` the UNet
    decoder becomes trainable (every other base parameter stays frozen).
    """
    branch = branch or get_branch(cfg.branch)
    branch.check(cfg)
    cross_norm = getattr(cfg, "connector", "conv") == "cross_norm"  # absent in older configs
    if cross_norm and cfg.connector_init == "zero":
        raise ConfigError("control.connector=cross_norm normalises the connectors' output by its "
                          "own std, which zero connectors leave at 0: set control.connector_init="
                          "default (ControlNeXt's; +ablation=cross_norm does) or gaussian|kaiming|"
                          "xavier")
    control = branch.build(unet, cfg)
    init_connectors(branch, control, cfg.connector_init, cfg.gaussian_std, cfg.init_scope)
    if cfg.only_mid_control:
        silence_down_connectors(branch, control)
    if cross_norm:
        control = branch.wrap_cross_norm(control, unet, cfg)
    if not cfg.sd_locked:
        unlock_decoder(unet)
    return control.train()


def unlock_decoder(unet: UNet2DConditionModel) -> list[nn.Parameter]:
    """sd_locked=false: make the UNet decoder trainable; returns its parameters."""
    params = decoder_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    return params


def decoder_parameters(unet: UNet2DConditionModel) -> list[nn.Parameter]:
    return [p for part in DECODER_PARTS for p in getattr(unet, part).parameters()]


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
