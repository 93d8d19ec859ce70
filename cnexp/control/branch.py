"""The control-branch interface, and the registry that picks a branch by `control.branch`.

A branch is one module in cnexp/control/ holding one `Branch` subclass, decorated `@register`
(cnexp/registry.py: dropping the module in is enough; cnexp/knobs.py reads its names for the
`Branch` choices, and a lookup imports just the module that declares the name):
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
from cnexp.knobs import CONTROL_PACKAGE
from cnexp.registry import Registry


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
                t: torch.Tensor, cond: dict | torch.Tensor, condition: torch.Tensor,
                conditioning_scale: float = 1.0) -> torch.Tensor:
        """The frozen UNet steered by the branch: noisy latents (B, C, h, w), timesteps (B,),
        the denoiser's conditioning `cond` (its family's `conditioning`: keyword arguments; a
        bare (B, T, D) tensor is the text), condition (B, 3, H, W) -> the UNet's prediction
        (B, C, h, w)."""
        raise NotImplementedError

    def pipeline(self, unet: UNet2DConditionModel, control: nn.Module,
                 **parts) -> DiffusionPipeline:
        """A stock diffusers pipeline that samples the controlled model; `parts` are the
        frozen vae, text_encoder, tokenizer, scheduler and the safety-checker switches."""
        raise NotImplementedError

    def sampling_inputs(self, pipe: DiffusionPipeline, conditions: torch.Tensor,
                        conditioning_scale: float) -> dict:
        """The arguments `pipe` (this branch's `pipeline`) takes for the condition images
        (B, 3, H, W) in [0, 1] and the control scale (sampling.conditioning_scale)."""
        return {"image": conditions, "controlnet_conditioning_scale": conditioning_scale}

    def wrap_cross_norm(self, control: nn.Module, unet: UNet2DConditionModel,
                        cfg: ControlConfig) -> nn.Module:
        """control.connector=cross_norm: the network whose features enter the UNet normalised
        with the statistics of the UNet features they are added to, times learned scales
        (cnexp/control/cross_norm.py); none by default."""
        able = [name for name, b in BRANCHES.load_all().items()
                if type(b).wrap_cross_norm is not Branch.wrap_cross_norm]
        raise ConfigError(f"control.connector=cross_norm does not apply to control.branch="
                          f"{self.name}: the branch does not say where its features enter the "
                          f"UNet (Branch.wrap_cross_norm; see docs/ablations.md); use one of "
                          f"{', '.join(able)} or control.connector=conv")

    def copied_from_base(self, control: nn.Module, unet: UNet2DConditionModel
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (parameter, the frozen UNet weight it was copied from) for every parameter
        that starts as a copy of the base (copy drift, cnexp/metrics/drift.py); none by default."""
        return {}

    def check(self, cfg: ControlConfig) -> None:
        """Knob combinations this branch cannot honour: raise ConfigError naming the fix."""

    def bind(self, control: nn.Module, unet: UNet2DConditionModel) -> None:
        """Join a network (built, or loaded from an export) to the frozen UNet it steers, where
        it reads the UNet itself (cross_norm); ControlNetModule calls it."""

    def owns(self, network: nn.Module) -> bool:
        """Whether `network` is one this branch builds (branch_of); by default, its class."""
        return type(network) is self.model_class

    def export(self, control: ModelMixin, directory: Path) -> None:
        control.save_pretrained(directory)

    def load(self, directory: Path) -> ModelMixin:
        return self.model_class.from_pretrained(directory)


BRANCHES: Registry[Branch] = Registry("control branch", "control.branch", "cnexp.control",
                                     CONTROL_PACKAGE, ConfigError)
register = BRANCHES.register


def copied_by_name(control: nn.Module, base: nn.Module
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (parameter, the base's parameter of that name and shape): what diffusers'
    from_unet / from_transformer copy keeps under the base's own names."""
    weights = dict(base.named_parameters())
    return {name: (p, weights[name]) for name, p in control.named_parameters()
            if name in weights and weights[name].shape == p.shape}


def conditioning_kwargs(cond: dict | torch.Tensor) -> dict:
    """A branch's `cond`: the family's keyword arguments, or a bare text tensor (SD's only one)."""
    return cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}


def get_branch(name: str) -> Branch:
    """The branch called `name`, importing just the module that declares it."""
    return BRANCHES.get(name)


def branch_of(control: nn.Module) -> Branch:
    """The branch that builds networks of `control`'s class (branches sharing a class, such as
    copy and scratch, differ only in how they build)."""
    network = getattr(control, "network", None) or control  # cross_norm's wrapper holds it
    owners = [branch for branch in BRANCHES.load_all().values() if branch.owns(network)]
    if owners:  # a branch that says more than its class (lora_copy) before the class's first
        return sorted(owners, key=lambda b: type(b).owns is Branch.owns)[0]
    raise TypeError(f"{type(control).__name__} is no registered branch's network "
                    f"(registered: {sorted(BRANCHES)})")
