"""The trainable control branch joined to the frozen UNet: the ablation axes live here.

  branch            copy     ControlNetModel.from_unet: trainable copy of the encoder (paper)
                    scratch  the copy's architecture, randomly initialised (not copied)
                    lite     one conv per encoder block, no pretrained weights (lite.py)
                    xs       diffusers' ControlNet-XS, fused with a frozen copy of the base (xs.py)
  connector_init    zero | gaussian | kaiming | xavier | default        (connectors.py)
  sd_locked=false   the UNet decoder (up_blocks, conv_norm_out, conv_out) trains too
  only_mid_control  the skip-connection connectors stay zero: only the mid residual is added
"""
from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel, UNetControlNetXSModel
from torch import nn

from cnexp.config import ControlConfig
from cnexp.control.connectors import (INIT_SCHEMES, INIT_SCOPES, init_connectors,
                                      silence_down_connectors)
from cnexp.control.lite import ControlNetLite
from cnexp.control.xs import build_xs
from cnexp.validate import ConfigError

BRANCHES = ("copy", "lite", "scratch", "xs")
DECODER_PARTS = ("up_blocks", "conv_norm_out", "conv_out")  # authors: output_blocks + out


def build_controlnet(unet: UNet2DConditionModel, cfg: ControlConfig) -> nn.Module:
    """The control branch `cfg` describes, all of it trainable, connectors initialised.

    Also applies the authors' switches that act on the base: with `sd_locked=false` the UNet
    decoder becomes trainable (every other base parameter stays frozen).
    """
    check_control(cfg)
    channels = tuple(cfg.conditioning_embedding_out_channels)
    embedding = dict(conditioning_channels=cfg.conditioning_channels,
                     conditioning_embedding_out_channels=channels)
    if cfg.branch == "xs":
        control = build_xs(unet, cfg)  # its copy of the base stays frozen inside
    else:
        if cfg.branch == "lite":
            control = ControlNetLite.from_unet(unet, **embedding)
        else:
            control = ControlNetModel.from_unet(unet, load_weights_from_unet=cfg.branch == "copy",
                                                **embedding)
        control.requires_grad_(True)
    init_connectors(control, cfg.connector_init, cfg.gaussian_std, cfg.init_scope)
    if cfg.only_mid_control:
        silence_down_connectors(control)
    if not cfg.sd_locked:
        unlock_decoder(unet)
    return control.train()


def check_control(cfg: ControlConfig) -> None:
    """Knob values and combinations the schema cannot express; each error names the fix."""
    choices = {"branch": BRANCHES, "connector_init": INIT_SCHEMES, "init_scope": INIT_SCOPES}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"control.{key}={getattr(cfg, key)!r} is unknown: use one of "
                              f"{list(allowed)} (python run.py control.{key}=...)")
    if cfg.connector_init == "gaussian" and not cfg.gaussian_std > 0:
        raise ConfigError(f"control.gaussian_std is {cfg.gaussian_std}; it must be > 0")
    if cfg.branch == "xs" and (cfg.only_mid_control or not cfg.sd_locked):
        raise ConfigError("control.branch=xs has no residuals and holds its own copy of the "
                          "base, so control.only_mid_control=true and control.sd_locked=false do "
                          "not apply to it; use control.branch=copy|lite|scratch")


def unlock_decoder(unet: UNet2DConditionModel) -> list[nn.Parameter]:
    """sd_locked=false: make the UNet decoder trainable; returns its parameters."""
    params = decoder_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    return params


def decoder_parameters(unet: UNet2DConditionModel) -> list[nn.Parameter]:
    return [p for part in DECODER_PARTS for p in getattr(unet, part).parameters()]


def controlled_prediction(unet: UNet2DConditionModel, control: nn.Module, noisy: torch.Tensor,
                          t: torch.Tensor, text: torch.Tensor, condition: torch.Tensor,
                          conditioning_scale: float = 1.0) -> torch.Tensor:
    """The base's prediction with the control branch attached: (B, C, h, w)."""
    if isinstance(control, UNetControlNetXSModel):  # base and control run as one model
        return control(noisy, t, encoder_hidden_states=text, controlnet_cond=condition,
                       conditioning_scale=conditioning_scale, return_dict=False)[0]
    down, mid = control(noisy, t, encoder_hidden_states=text, controlnet_cond=condition,
                        conditioning_scale=conditioning_scale, return_dict=False)
    return unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
