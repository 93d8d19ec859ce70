"""Generation for evaluation: a stock diffusers pipeline over the module's own components.

Which pipeline, and which arguments carry the condition and the control scale, is the branch's
to say (`Branch.pipeline`, `Branch.sampling_inputs`): diffusers' ControlNet pipeline for the
branches that return residuals, its ControlNet-XS pipeline for the fused XS model, its T2I-Adapter
pipeline for the adapter.
"""
from __future__ import annotations

import torch
from diffusers import (DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       UniPCMultistepScheduler)

from cnexp.config import SamplingConfig

# sampling.scheduler -> diffusers' scheduler (the choices: cnexp/knobs.py Scheduler)
SAMPLERS = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler,
            "dpmsolver": DPMSolverMultistepScheduler}


def make_scheduler(module, cfg: SamplingConfig):
    """A new sampling.scheduler over the base's noise schedule, as its family samples."""
    return module.family.sampling_scheduler(module.base, cfg.scheduler)


def make_pipeline(module, cfg: SamplingConfig, progress: bool = True) -> DiffusionPipeline:
    """A pipeline that shares (does not copy) the module's frozen base and its control branch."""
    parts = module.family.pipeline_parts(module.base, make_scheduler(module, cfg))
    pipe = module.branch.pipeline(module.unet, module.controlnet, **parts)
    pipe.set_progress_bar_config(disable=not progress, desc="sampling", leave=False)
    pipe.cnexp_branch = module.branch  # generate() asks it how the pipeline takes the condition
    return pipe


@torch.no_grad()
def generate(pipe: DiffusionPipeline, conditions: torch.Tensor, prompts: list[str],
             cfg: SamplingConfig, first_index: int = 0) -> torch.Tensor:
    """(B, 3, H, W) conditions in [0, 1] -> (B, 3, H, W) images in [0, 1].

    Image i starts from noise seeded `cfg.seed + first_index + i`, so the same evaluation
    sample gets the same initial noise in every run, whatever the batch size.
    """
    device = pipe.device
    generators = [torch.Generator(device).manual_seed(cfg.seed + first_index + i)
                  for i in range(len(prompts))]
    control_inputs = pipe.cnexp_branch.sampling_inputs(pipe, conditions.to(device),
                                                       cfg.conditioning_scale)
    # sample in eval mode, then give every submodule back its own training state (a wrapper the
    # pipeline holds, MultiControlNetModel, may be older than the branch's current state)
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    modes = {sub: sub.training for model in models for sub in model.modules()}
    for model in models:
        model.eval()
    try:
        out = pipe(prompt=prompts, num_inference_steps=cfg.steps,
                   guidance_scale=cfg.guidance_scale, generator=generators, **control_inputs,
                   height=conditions.shape[-2], width=conditions.shape[-1], output_type="pt")
    finally:
        for sub, mode in modes.items():
            sub.training = mode
    images = out.images
    if not torch.is_tensor(images):  # a pipeline without "pt" output (T2I-Adapter's): numpy NHWC
        images = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    return images.float().clamp(0, 1)

