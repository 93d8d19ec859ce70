"""Connectors: the convolutions through which the trainable branch reaches the frozen UNet.

The paper's central trick is that they start at zero ("zero convolutions"), so at step 0 the
controlled model *is* the base model. The other schemes are the ablation: any non-zero start adds
noise to the base's features before the branch has learnt anything ("base damage").

Which convolutions are connectors:
  copy / scratch / lite  `controlnet_down_blocks[*]` and `controlnet_mid_block` (1x1 convs whose
                         outputs are added to the UNet's skip connections and middle block)
  xs                     every control->base conv (`control_to_base_for_conv_in`, `*.ctrl_to_base`);
                         its base->control convs keep diffusers' zero init
  hint (init_scope=connectors_and_hint only)  `controlnet_cond_embedding.conv_out`, the last conv
                         of the condition embedding; otherwise it keeps its zero init
"""
from __future__ import annotations

import math

import torch
from torch import nn

INIT_SCHEMES = ("zero", "gaussian", "kaiming", "xavier", "default")
INIT_SCOPES = ("connectors", "connectors_and_hint")


def connector_convs(control: nn.Module) -> list[nn.Conv2d]:
    """Every conv whose output is added to the frozen UNet's features, in forward order."""
    if hasattr(control, "controlnet_down_blocks"):  # ControlNetModel and ControlNetLite
        return [*control.controlnet_down_blocks, control.controlnet_mid_block]
    # UNetControlNetXSModel: its control->base convs (control_to_base_for_conv_in, *.ctrl_to_base)
    return [m for name, m in control.named_modules() if isinstance(m, nn.Conv2d)
            and ("ctrl_to_base" in name or "control_to_base" in name)]


def down_connectors(control: nn.Module) -> list[nn.Conv2d]:
    """The connectors feeding the UNet's skip connections (not the middle block)."""
    return list(control.controlnet_down_blocks)


def hint_conv(control: nn.Module) -> nn.Conv2d:
    """The last conv of the condition embedding (zero-initialised by diffusers)."""
    return control.controlnet_cond_embedding.conv_out


@torch.no_grad()
def init_conv(conv: nn.Conv2d, scheme: str, gaussian_std: float = 0.02) -> None:
    """Initialise one connector. Biases start at 0 except under `default` (PyTorch's own init:
    weights and biases uniform in +-1/sqrt(fan_in))."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown connector init {scheme!r}; use one of {INIT_SCHEMES}")
    if scheme == "default":
        conv.reset_parameters()
        return
    if scheme == "zero":
        nn.init.zeros_(conv.weight)
    elif scheme == "gaussian":  # the paper's "no zero convolution": N(0, std^2)
        nn.init.normal_(conv.weight, mean=0.0, std=gaussian_std)
    elif scheme == "kaiming":  # He: N(0, 2 / fan_in)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    elif scheme == "xavier":  # Glorot: N(0, 2 / (fan_in + fan_out))
        nn.init.xavier_normal_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def expected_weight_std(conv: nn.Conv2d, scheme: str, gaussian_std: float = 0.02) -> float:
    """The std that `init_conv` gives the weights (what tests and docs compare against)."""
    fan_in = conv.weight[0].numel()
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    return {"zero": 0.0, "gaussian": gaussian_std, "kaiming": math.sqrt(2.0 / fan_in),
            "xavier": math.sqrt(2.0 / (fan_in + fan_out)),
            "default": 1.0 / math.sqrt(3.0 * fan_in)}[scheme]  # uniform(+-1/sqrt(fan_in))


def init_connectors(control: nn.Module, scheme: str, gaussian_std: float = 0.02,
                    scope: str = "connectors") -> list[nn.Conv2d]:
    """Initialise the connectors (and the hint's last conv if scope says so); returns them."""
    if scope not in INIT_SCOPES:
        raise ValueError(f"unknown connector init scope {scope!r}; use one of {INIT_SCOPES}")
    convs = connector_convs(control)
    if scope == "connectors_and_hint":
        convs.append(hint_conv(control))
    for conv in convs:
        init_conv(conv, scheme, gaussian_std)
    return convs


@torch.no_grad()
def silence_down_connectors(control: nn.Module) -> None:
    """only_mid_control: the skip-connection connectors are fixed at zero and never trained, so
    only the middle-block residual reaches the UNet - in training, in sampling, and in any
    diffusers pipeline that loads the exported model (the UNet adds an exact zero)."""
    for conv in down_connectors(control):
        init_conv(conv, "zero")
        conv.requires_grad_(False)
