"""The control-branch interface, and the registry that picks a branch by `control.branch`.

A branch is one module in cnexp/control/ holding one `Branch` subclass, decorated `@register`:
it says how the trainable network is built from the frozen UNet, which of its convs are the
connectors (what `control.connector_init` initialises), how the controlled model predicts, how
diffusers samples it, and how it is exported and loaded. Everything else (connector init, the
authors' switches, training, evaluation, export) is written once against this interface.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from diffusers import DiffusionPipeline, ModelMixin, UNet2DConditionModel
from torch import nn

from cnexp.config import ControlConfig
from cnexp.errors import ConfigError


class Branch:
    name: ClassVar[str]  # the value of control.branch that selects it
    model_class: ClassVar[type[ModelMixin]]  # what `build` returns; `load` reads it back

    def build(self, unet: UNet2DConditionModel, cfg: ControlConfig) -> ModelMixin:
        """The network, with exactly the parameters that train requiring grad; the frozen UNet
        is read, never changed."""
        raise NotImplementedError

    def connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        """Every conv whose output enters the frozen UNet's features, in forward order."""
        raise NotImplementedError

    def down_connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        """The connectors feeding the UNet's skip connections (control.only_mid_control keeps
        them at zero)."""
        raise NotImplementedError

    def hint_conv(self, control: nn.Module) -> nn.Conv2d:
        """The condition embedding's last conv (control.init_scope=connectors_and_hint)."""
        return control.controlnet_cond_embedding.conv_out

    def predict(self, unet: UNet2DConditionModel, control: nn.Module, noisy: torch.Tensor,
                t: torch.Tensor, text: torch.Tensor, condition: torch.Tensor,
                conditioning_scale: float = 1.0) -> torch.Tensor:
        """The frozen UNet steered by the branch: noisy latents (B, C, h, w), timesteps (B,),
        text (B, T, D), condition (B, 3, H, W) -> the UNet's prediction (B, C, h, w)."""
        raise NotImplementedError

    def pipeline(self, unet: UNet2DConditionModel, control: nn.Module,
                 **parts) -> DiffusionPipeline:
        """A stock diffusers pipeline that samples the controlled model; `parts` are the
        frozen vae, text_encoder, tokenizer, scheduler and the safety-checker switches."""
        raise NotImplementedError

    def copied_from_base(self, control: nn.Module, unet: UNet2DConditionModel
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (parameter, the frozen UNet weight it was copied from) for every parameter
        that starts as a copy of the base (copy drift, cnexp/metrics/drift.py); none by default."""
        return {}

    def check(self, cfg: ControlConfig) -> None:
        """Knob combinations this branch cannot honour: raise ConfigError naming the fix."""

    def export(self, control: ModelMixin, directory: Path) -> None:
        control.save_pretrained(directory)

    def load(self, directory: Path) -> ModelMixin:
        return self.model_class.from_pretrained(directory)


BRANCHES: dict[str, Branch] = {}


def register(cls: type[Branch]) -> type[Branch]:
    """Class decorator: make `cls` selectable as control.branch=<cls.name>."""
    BRANCHES[cls.name] = cls()
    return cls


def get_branch(name: str) -> Branch:
    import cnexp.control  # noqa: F401 - imports the built-in branches, which register

    if str(name) not in BRANCHES:
        raise ConfigError(f"control.branch={name!s} is unknown: use one of {sorted(BRANCHES)} "
                          "(python run.py control.branch=...)")
    return BRANCHES[str(name)]


def branch_of(control: nn.Module) -> Branch:
    """The branch that builds networks of `control`'s class (branches sharing a class, such as
    copy and scratch, differ only in how they build)."""
    import cnexp.control  # noqa: F401

    for branch in BRANCHES.values():
        if type(control) is branch.model_class:
            return branch
    raise TypeError(f"{type(control).__name__} is no registered branch's network "
                    f"(registered: {sorted(BRANCHES)})")
