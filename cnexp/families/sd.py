"""The Stable Diffusion UNet family: SD 1.5 / 2.1 and the tiny world (the same component types
and loading code). A UNet2DConditionModel denoises VAE latents under one CLIP text encoder's
hidden states, trained with DDPM noise and an epsilon or v target (the scheduler's
prediction_type), sampled through diffusers' StableDiffusion* pipelines."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from cnexp.base import BaseBundle
from cnexp.config import BaseConfig
from cnexp.families.family import BaseFamily, register
from cnexp.families.loading import freeze, load_parts


@register
class StableDiffusionFamily(BaseFamily):
    name = "sd"

    def load(self, cfg: BaseConfig) -> BaseBundle:
        parts = load_parts(cfg, self, {"unet": UNet2DConditionModel, "vae": AutoencoderKL,
                                       "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer,
                                       "scheduler": DDPMScheduler})
        base = BaseBundle(parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["unet"],
                          parts["scheduler"], parts["source"], self.name)
        return freeze(self, base)

    def frozen(self, base: BaseBundle) -> tuple:
        return base.unet, base.vae, base.text_encoder

    def denoiser(self, base: BaseBundle) -> UNet2DConditionModel:
        return base.unet

    def encode_text(self, base: BaseBundle, prompts: list[str], device) -> torch.Tensor:
        ids = base.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=base.tokenizer.model_max_length,
                             return_tensors="pt").input_ids.to(device)  # (B, T)
        return base.text_encoder(ids)[0]  # (B, T, D): the last hidden states

    def latent_moments(self, base: BaseBundle, images: torch.Tensor) -> torch.Tensor:
        # the VAE may be stored in half precision (trainer.frozen_dtype), its input follows
        dist = base.vae.encode(images.to(base.vae.dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1)  # (B, 2C, h, w)

    def scale_latents(self, base: BaseBundle, latents: torch.Tensor) -> torch.Tensor:
        return latents * base.vae.config.scaling_factor

    def timesteps(self, base: BaseBundle, draw, n: int, generator) -> torch.Tensor:
        steps = base.noise_scheduler.config.num_train_timesteps  # uniform over DDPM's steps
        return draw(torch.randint, (n,), generator, args=(0, steps))

    def spread_timesteps(self, base: BaseBundle, n: int, device) -> torch.Tensor:
        steps = base.noise_scheduler.config.num_train_timesteps
        return torch.linspace(0, steps - 1, n, device=device).long()

    def noised(self, base, latents, noise, t) -> torch.Tensor:
        return base.noise_scheduler.add_noise(latents, noise, t)

    def target(self, base, latents, noise, t) -> torch.Tensor:
        kind = base.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return base.noise_scheduler.get_velocity(latents, noise, t)
        raise ValueError(f"unsupported prediction_type {kind!r} in the base's scheduler config")

    def predict(self, base, noisy, t, text) -> torch.Tensor:
        return base.unet(noisy, t, encoder_hidden_states=text).sample

    def pipeline_parts(self, base: BaseBundle, scheduler) -> dict:
        return dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                    scheduler=scheduler, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)

    def export_unlocked(self, base: BaseBundle, directory: Path) -> None:
        base.unet.save_pretrained(directory / "unet")  # the decoder trained: the whole UNet
