"""The base-family interface, and the registry that picks a family by `base.family`.

What differs between UNet bases (SD 1.5/2.1, SDXL) and transformer bases (SD3, Flux) is said
here, once per family: the components a bundle loads, how prompts become the denoiser's text
conditioning, the training objective (which timesteps, how latents are noised, what the
denoiser predicts), what the control branches build on, the sampling pipeline's parts and what
an unlocked base exports. The training step (cnexp/module.py), the run's build (cnexp/train.py)
and sampling (cnexp/sampling.py) ask the family and nothing else about the base.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
import torch.nn.functional as F

from cnexp.errors import ConfigError
from cnexp.knobs import FAMILIES_PACKAGE
from cnexp.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from cnexp.base import BaseBundle
    from cnexp.config import BaseConfig, ControlConfig
    from cnexp.control.branch import Branch


class BaseFamily:
    name: ClassVar[str]  # the value of base.family that selects it
    # sampling.guidance_scale is an input of the denoiser (Flux), not classifier-free guidance
    guidance_embedded: ClassVar[bool] = False
    # the ControlNet reads the condition's VAE latents (SD3, Flux), not its pixels: the encoder
    # cache can then hold them (cache.conditions)
    control_reads_latents: ClassVar[bool] = False

    def build_tiny(self, directory: Path) -> None:
        """Save a random bundle of this family's shape, the size of diffusers' own tiny test
        pipelines, as a diffusers pipeline directory (base.random_bundle=true)."""
        raise ConfigError(f"base.random_bundle=true: base.family={self.name} has no tiny "
                          "random bundle; set base.random_bundle=false")

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

    def encoders(self, base: BaseBundle) -> dict:
        """name -> every frozen encoder and tokenizer whose weights make the encoder cache's key
        (a cached latent or prompt embedding is valid only for these exact weights)."""
        return {"vae": base.vae, "text_encoder": base.text_encoder,
                "tokenizer": base.tokenizer, **base.extra}

    # ---- the control branches it takes -----------------------------------------------------
    def branch(self, name: str) -> Branch:
        """The control.branch `name` as built on this family's denoiser; ConfigError naming the
        family's branches (and why the others do not apply) when it has no such branch."""
        from cnexp.control.branch import get_branch

        return get_branch(name)

    def check(self, control: ControlConfig) -> None:
        """Knob combinations the family cannot honour (beside its branches' own checks)."""

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

    def loss_prediction(self, base: BaseBundle, pred: torch.Tensor, noisy: torch.Tensor,
                        t: torch.Tensor) -> torch.Tensor:
        """The denoiser's output as the loss compares it with `target`: as it is (SD3
        preconditions it into a clean-latent estimate)."""
        return pred

    def conditioning(self, base: BaseBundle, text: torch.Tensor, noisy: torch.Tensor) -> dict:
        """The encoder cache's text tensor -> the denoiser's conditioning keyword arguments
        (what the branch's `predict` passes to the denoiser and to its control network)."""
        return {"encoder_hidden_states": text}

    def control_input(self, base: BaseBundle, condition: torch.Tensor) -> torch.Tensor:
        """The condition image (B, 3, H, W) in [0, 1] -> what the control network reads (the
        pixels for the UNet families; SD3's and Flux's ControlNets read its VAE latents)."""
        return condition

    def control_from_moments(self, base: BaseBundle, moments: torch.Tensor) -> torch.Tensor:
        """The condition's VAE posterior moments (B, 2C, h, w) -> what the control network reads
        (control_reads_latents families: control_input without the VAE call)."""
        raise NotImplementedError

    def predict(self, base: BaseBundle, noisy: torch.Tensor, t: torch.Tensor,
                text: torch.Tensor) -> torch.Tensor:
        """The frozen denoiser's own prediction, no control (base damage's reference)."""
        raise NotImplementedError

    # ---- sampling and export ----------------------------------------------------------------
    def sampling_scheduler(self, base: BaseBundle, name: str):
        """A fresh sampling.scheduler over the base's noise schedule (schedulers keep state)."""
        from cnexp.sampling import SAMPLERS

        return SAMPLERS[name].from_config(base.noise_scheduler.config)

    def pipeline_parts(self, base: BaseBundle, scheduler) -> dict:
        """The keyword arguments (besides the denoiser and the control) that the branch's
        diffusers pipeline takes for this family's components."""
        raise NotImplementedError

    def export_unlocked(self, base: BaseBundle, directory: Path) -> None:
        """control.sd_locked=false trained part of the base too: save it beside the control."""
        raise NotImplementedError


def pack_text(sequence: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, T, D) token states and (B, P) pooled embedding -> one (B, T + ceil(P / D), D) tensor:
    the pooled vector zero-padded onto rows of its own after the tokens. One tensor per prompt
    keeps the encoder cache, the empty prompt and prompt dropout (one torch.where drops every
    encoder's output together, pooled included) the same for every family."""
    batch, _, width = sequence.shape
    rows = math.ceil(pooled.shape[-1] / width)
    pooled = F.pad(pooled, (0, rows * width - pooled.shape[-1])).view(batch, rows, width)
    return torch.cat([sequence, pooled.to(sequence.dtype)], dim=1)


def unpack_text(text: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_text's inverse: (B, T + rows, D) -> ((B, T, D), (B, pooled_dim))."""
    rows = math.ceil(pooled_dim / text.shape[-1])
    return text[:, :-rows], text[:, -rows:].reshape(text.shape[0], -1)[:, :pooled_dim]


FAMILIES: Registry[BaseFamily] = Registry("base family", "base.family", "cnexp.families",
                                         FAMILIES_PACKAGE, ConfigError)
register = FAMILIES.register


def get_family(name) -> BaseFamily:
    """The family called `name` (a config written before the knob: sd)."""
    return FAMILIES.get(name or "sd")
