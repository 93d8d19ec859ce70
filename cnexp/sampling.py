"""Generation for evaluation: diffusers' ControlNet pipeline over the module's own components."""
from __future__ import annotations

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline,
                       UniPCMultistepScheduler)

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
    pipe = StableDiffusionControlNetPipeline(
        vae=module.vae, text_encoder=module.text_encoder, tokenizer=module.tokenizer,
        unet=module.unet, controlnet=module.controlnet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=not progress, desc="sampling", leave=False)
    return pipe


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
    was_training = pipe.controlnet.training
    pipe.controlnet.eval()
    try:
        out = pipe(prompt=prompts, image=conditions.to(device), num_inference_steps=cfg.steps,
                   guidance_scale=cfg.guidance_scale, generator=generators,
                   controlnet_conditioning_scale=cfg.conditioning_scale,
                   height=conditions.shape[-2], width=conditions.shape[-1], output_type="pt")
    finally:
        pipe.controlnet.train(was_training)
    return out.images.float().clamp(0, 1)
