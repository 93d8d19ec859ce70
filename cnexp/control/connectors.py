"""Connectors: the convolutions through which the trainable branch reaches the frozen UNet.

The paper's central trick is that they start at zero ("zero convolutions"), so at step 0 the
controlled model *is* the base model. The other schemes are the ablation: any non-zero start adds
noise to the base's features before the branch has learnt anything ("base damage").

Which convolutions are connectors is the branch's to say (`Branch.connectors`, cnexp/control/
branch.py); with control.init_scope=connectors_and_hint the condition embedding's last conv
(`Branch.hint_conv`, otherwise left at its zero init) is set too.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cnexp.control.branch import Branch


@torch.no_grad()
def init_conv(conv: nn.Conv2d, scheme: str, gaussian_std: float = 0.02) -> None:
    """Initialise one connector (a control.connector_init choice). Biases start at 0 except
    under `default` (PyTorch's own init: weights and biases uniform in +-1/sqrt(fan_in))."""
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


def init_connectors(branch: Branch, control: nn.Module, scheme: str, gaussian_std: float = 0.02,
                    scope: str = "connectors") -> list[nn.Conv2d]:
    """Initialise the connectors (and the hint's last conv if scope says so); returns them."""
    convs = branch.connectors(control)
    if scope == "connectors_and_hint":
        convs.append(branch.hint_conv(control))
    for conv in convs:
        init_conv(conv, scheme, gaussian_std)
    return convs


@torch.no_grad()
def silence_down_connectors(branch: Branch, control: nn.Module) -> None:
    """only_mid_control: the skip-connection connectors are fixed at zero and never trained, so
    only the middle-block residual reaches the UNet - in training, in sampling, and in any
    diffusers pipeline that loads the exported model (the UNet adds an exact zero)."""
    for conv in branch.down_connectors(control):
        init_conv(conv, "zero")
        conv.requires_grad_(False)
