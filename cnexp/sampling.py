"""Generation for evaluation: a stock diffusers pipeline over the module's own components.

Which pipeline is the branch's to say (`Branch.pipeline`): diffusers' ControlNet pipeline for
the branches that return residuals, its ControlNet-XS pipeline for the fused XS model.
"""
from __future__ import annotations

import torch
from diffusers import (DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       MultiControlNetModel, UniPCMultistepScheduler)

from cnexp.config import SamplingConfig

# sampling.scheduler -> diffusers' scheduler (the choices: cnexp/knobs.py Scheduler)
SAMPLERS = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler,
            "dpmsolver": DPMSolverMultistepScheduler}


def make_pipeline(module, cfg: SamplingConfig, progress: bool = True) -> DiffusionPipeline:
    """A pipeline that shares (does not copy) the module's frozen base and its control branch."""
    scheduler = SAMPLERS[cfg.scheduler].from_config(module.noise_scheduler.config)
    pipe = module.branch.pipeline(
        module.unet, module.controlnet, vae=module.vae, text_encoder=module.text_encoder,
        tokenizer=module.tokenizer, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=not progress, desc="sampling", leave=False)
    return pipe


@torch.no_grad()
def generate(pipe: DiffusionPipeline, conditions: torch.Tensor, prompts: list[str],
             cfg: SamplingConfig, first_index: int = 0) -> torch.Tensor:
    """(B, 3, H, W) conditions in [0, 1] -> (B, 3, H, W) images in [0, 1].

    Image i starts from noise seeded `cfg.seed + first_index + i`, so the same evaluation
    sample gets the same initial noise in every run, whatever the batch size.
    """
    device = pipe.unet.device
    generators = [torch.Generator(device).manual_seed(cfg.seed + first_index + i)
                  for i in range(len(prompts))]
    image = conditions.to(device)
    if isinstance(getattr(pipe, "controlnet", None), MultiControlNetModel):
        image = [image]  # one condition per wrapped net
    # sample in eval mode, then give the trainable parts back their training state
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    try:
        out = pipe(prompt=prompts, image=image, num_inference_steps=cfg.steps,
                   guidance_scale=cfg.guidance_scale, generator=generators,
                   controlnet_conditioning_scale=cfg.conditioning_scale,
                   height=conditions.shape[-2], width=conditions.shape[-1], output_type="pt")
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return out.images.float().clamp(0, 1)

