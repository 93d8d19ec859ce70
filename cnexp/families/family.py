"""The base-family interface, and the registry that picks a family by `base.family`.

What differs between UNet bases (SD 1.5/2.1, SDXL) and transformer bases (SD3, Flux) is said
here, once per family: the components a bundle loads, how prompts become the denoiser's text
conditioning, the training objective (which timesteps, how latents are noised, what the
denoiser predicts), what the control branches build on, the sampling pipeline's parts and what
an unlocked base exports. The training step (cnexp/module.py), the run's build (cnexp/train.py)
and sampling (cnexp/sampling.py) ask the family and nothing else about the base.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from cnexp.errors import ConfigError
from cnexp.knobs import FAMILIES_PACKAGE
from cnexp.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from cnexp.base import BaseBundle
    from cnexp.config import BaseConfig


class BaseFamily:
    name: ClassVar[str]  # the value of base.family that selects it

    # ---- loading --------------------------------------------------------------------------
    def load(self, cfg: BaseConfig) -> BaseBundle:
        """The frozen base (no gradients, eval mode) from a hub id or a local bundle; one
        BaseModelUnavailable naming the fix when it cannot be had."""
        raise NotImplementedError

    def frozen(self, base: BaseBundle) -> tuple[nn.Module, ...]:
        """The frozen networks (cast to trainer.frozen_dtype, kept in eval mode)."""
        raise NotImplementedError

    def denoiser(self, base: BaseBundle) -> nn.Module:
        """The network the control branches are built on and steer."""
        raise NotImplementedError

    # ---- prompts and images ---------------------------------------------------------------
    def encode_text(self, base: BaseBundle, prompts: list[str], device) -> torch.Tensor:
        """Prompts -> the denoiser's text conditioning (what the encoder cache stores)."""
        raise NotImplementedError

    def latent_moments(self, base: BaseBundle, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the VAE posterior's (mean, std) stacked on channels."""
        raise NotImplementedError

    def scale_latents(self, base: BaseBundle, latents: torch.Tensor) -> torch.Tensor:
        """A posterior sample -> the denoiser's latent space."""
        raise NotImplementedError

    # ---- the training objective ----------------------------------------------------------
    def timesteps(self, base: BaseBundle, draw: Callable, n: int, generator) -> torch.Tensor:
        """(n,) training timesteps, drawn with `draw(sampler, shape, generator, ...)` (the
        module's per-rank draw, so DDP sees one process's draws)."""
        raise NotImplementedError

    def spread_timesteps(self, base: BaseBundle, n: int, device) -> torch.Tensor:
        """(n,) timesteps spread over the schedule (the step-0 base-damage probe)."""
        raise NotImplementedError

    def noised(self, base: BaseBundle, latents: torch.Tensor, noise: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
        """The denoiser's input at timesteps t."""
        raise NotImplementedError

    def target(self, base: BaseBundle, latents: torch.Tensor, noise: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict there."""
        raise NotImplementedError

    def predict(self, base: BaseBundle, noisy: torch.Tensor, t: torch.Tensor,
                text: torch.Tensor) -> torch.Tensor:
        """The frozen denoiser's own prediction, no control (base damage's reference)."""
        raise NotImplementedError

    # ---- sampling and export ----------------------------------------------------------------
    def pipeline_parts(self, base: BaseBundle, scheduler) -> dict:
        """The keyword arguments (besides the denoiser and the control) that the branch's
        diffusers pipeline takes for this family's components."""
        raise NotImplementedError

    def export_unlocked(self, base: BaseBundle, directory: Path) -> None:
        """control.sd_locked=false trained part of the base too: save it beside the control."""
        raise NotImplementedError


FAMILIES: Registry[BaseFamily] = Registry("base family", "base.family", "cnexp.families",
                                         FAMILIES_PACKAGE, ConfigError)
register = FAMILIES.register


def get_family(name) -> BaseFamily:
    """The family called `name` (a config written before the knob: sd)."""
    return FAMILIES.get(name or "sd")
