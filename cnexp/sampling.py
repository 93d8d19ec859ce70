"""Generation for evaluation: diffusers' ControlNet pipeline over the module's own components.

Every control branch samples through a stock diffusers pipeline: ControlNetModel (copy, scratch)
directly; ControlNet-lite wrapped in a one-net MultiControlNetModel (the pipeline accepts only
those two types, and lite has ControlNetModel's forward); ControlNet-XS through diffusers'
ControlNet-XS pipeline, whose UNet is the fused model.
"""
from __future__ import annotations

import torch
from diffusers import (ControlNetModel, DDIMScheduler, DPMSolverMultistepScheduler,
                       MultiControlNetModel, StableDiffusionControlNetPipeline,
                       StableDiffusionControlNetXSPipeline, UniPCMultistepScheduler,
                       UNetControlNetXSModel)
from diffusers.utils import logging as diffusers_logging

from cnexp.config import SamplingConfig
from cnexp.errors import CnexpError

SAMPLERS = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler,
            "dpmsolver": DPMSolverMultistepScheduler}


def make_pipeline(module, cfg: SamplingConfig, progress: bool = True
                  ) -> StableDiffusionControlNetPipeline:
    """A pipeline that shares (does not copy) the module's frozen base and its ControlNet."""
    if cfg.scheduler not in SAMPLERS:
        raise CnexpError(f"sampling.scheduler={cfg.scheduler!r} is unknown: use one of "
                         f"{sorted(SAMPLERS)}")
    scheduler = SAMPLERS[cfg.scheduler].from_config(module.noise_scheduler.config)
    parts = dict(vae=module.vae, text_encoder=module.text_encoder, tokenizer=module.tokenizer,
                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    control = module.controlnet
    if isinstance(control, UNetControlNetXSModel):  # the fused model is the pipeline's UNet
        pipe = _xs_pipeline(unet=control, controlnet=None, **parts)
    else:
        if not isinstance(control, ControlNetModel):  # ControlNet-lite
            control = MultiControlNetModel([control]).train(control.training)
        pipe = StableDiffusionControlNetPipeline(unet=module.unet, controlnet=control, **parts)
    pipe.set_progress_bar_config(disable=not progress, desc="sampling", leave=False)
    return pipe


_xs_warned = []


def _xs_pipeline(**parts) -> StableDiffusionControlNetXSPipeline:
    """diffusers warns at every construction that its XS pipeline is deprecated; once will do."""
    verbosity = diffusers_logging.get_verbosity()
    if _xs_warned:
        diffusers_logging.set_verbosity_error()
    try:
        return StableDiffusionControlNetXSPipeline(**parts)
    finally:
        diffusers_logging.set_verbosity(verbosity)
        _xs_warned.append(True)


@torch.no_grad()
def generate(pipe: StableDiffusionControlNetPipeline, conditions: torch.Tensor,
             prompts: list[str], cfg: SamplingConfig, first_index: int = 0) -> torch.Tensor:
    """(B, 3, H, W) conditions in [0, 1] -> (B, 3, H, W) images in [0, 1].

    Image i starts from noise seeded `cfg.seed + first_index + i`, so the same evaluation
    sample gets the same initial noise in every run, whatever the batch size.
    """
    device = pipe.unet.device
    generators = [torch.Generator(device).manual_seed(cfg.seed + first_index + i)
                  for i in range(len(prompts))]
    control = pipe.unet if isinstance(pipe.unet, UNetControlNetXSModel) else pipe.controlnet
    image = conditions.to(device)
    if isinstance(pipe.controlnet, MultiControlNetModel):
        image = [image]  # one condition per wrapped net
    was_training = control.training
    control.eval()
    try:
        out = pipe(prompt=prompts, image=image, num_inference_steps=cfg.steps,
                   guidance_scale=cfg.guidance_scale, generator=generators,
                   controlnet_conditioning_scale=cfg.conditioning_scale,
                   height=conditions.shape[-2], width=conditions.shape[-1], output_type="pt")
    finally:
        control.train(was_training)
    return out.images.float().clamp(0, 1)
