"""FLUX.1: a FluxTransformer2DModel trained as a rectified flow, with embedded guidance.

What differs from the UNet families, each as diffusers' train_controlnet_flux.py and its Flux
pipelines do it:
  latents      VAE posterior sample -> (z - shift_factor) * scaling_factor, kept (B, C, h, w);
               the transformer reads 2x2 patches packed into tokens (flux_control.denoise)
  text         T5 (text_encoder_2) last hidden states (B, T, D) are the token sequence, CLIP's
               pooled output (B, P) the global vector: one tensor via pack_text, so prompt
               dropout blanks both together. T = 512 (the pipeline's max_sequence_length), or
               the tokenizer's own maximum if smaller
  timesteps    u = sigmoid(N(0, 1)) (the script's logit_normal density), index = floor(u *
               1000) into the training schedule; sigma = t / 1000 (the schedule's timesteps are
               its sigmas x 1000)
  objective    noised = (1 - sigma) x + sigma noise, target = noise - x (unweighted MSE); the
               transformer's timestep input is t / 1000
  guidance     FLUX.1-dev's transformer embeds a guidance value: 3.5 in training (the script's
               --guidance_scale default), sampling.guidance_scale at sampling (not classifier-
               free guidance: one pass per step)
  control      the condition [0, 1] -> 2x - 1 -> VAE posterior mean -> shifted, scaled, packed
               (FluxControlNetPipeline encodes its control image the same way, but samples the
               posterior instead of taking its mean)
  sampling     FluxControlNetPipeline with a FlowMatchEulerDiscreteScheduler from the bundle's
               scheduler config; sampling.scheduler (ddim|unipc|dpmsolver) does not apply
The branches (copy, scratch, lite) are flux_control.py's; the others are refused there.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline,
                       FluxPipeline, FluxTransformer2DModel)
from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config,
                          T5EncoderModel)

from cnexp.base import BaseBundle
from cnexp.config import BaseConfig
from cnexp.errors import ConfigError
from cnexp.families.family import BaseFamily, pack_text, register, unpack_text
from cnexp.families.flux_control import (FluxBranch, denoise, flux_branch, image_ids,
                                         pack_latents, t5_length)
from cnexp.families.loading import freeze, load_parts

TRAIN_GUIDANCE = 3.5  # train_controlnet_flux.py's --guidance_scale default
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0  # its --weighting_scheme=logit_normal density's defaults
# FLUX.1-dev's scheduler config: sampling shifts the sigmas by the image's token count
DEV_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096)


@register
class FluxFamily(BaseFamily):
    name = "flux"
    guidance_embedded = True
    control_reads_latents = True

    def load(self, cfg: BaseConfig) -> BaseBundle:
        parts = load_parts(cfg, self, {
            "transformer": FluxTransformer2DModel, "vae": AutoencoderKL,
            "text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel,
            "tokenizer": CLIPTokenizer, "tokenizer_2": AutoTokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler})
        base = BaseBundle(parts["vae"], parts["text_encoder"], parts["tokenizer"],
                          parts["transformer"], parts["scheduler"], parts["source"], self.name,
                          extra={"text_encoder_2": parts["text_encoder_2"],
                                 "tokenizer_2": parts["tokenizer_2"]})
        return freeze(self, base)

    def frozen(self, base: BaseBundle) -> tuple:
        return base.unet, base.vae, base.text_encoder, base.extra["text_encoder_2"]

    def denoiser(self, base: BaseBundle) -> FluxTransformer2DModel:
        return base.unet

    def branch(self, name: str) -> FluxBranch:
        return flux_branch(str(name))

    # ---- prompts and images ---------------------------------------------------------------
    def encode_text(self, base: BaseBundle, prompts: list[str], device) -> torch.Tensor:
        clip, t5 = base.tokenizer, base.extra["tokenizer_2"]
        ids = clip(prompts, padding="max_length", max_length=clip.model_max_length,
                   truncation=True, return_tensors="pt").input_ids.to(device)  # (B, 77)
        pooled = base.text_encoder(ids, output_hidden_states=False).pooler_output  # (B, P)
        ids = t5(prompts, padding="max_length", max_length=t5_length(t5), truncation=True,
                 return_tensors="pt").input_ids.to(device)  # (B, T)
        states = base.extra["text_encoder_2"](ids, output_hidden_states=False)[0]  # (B, T, D)
        return pack_text(states, pooled)  # (B, T + rows, D)

    def latent_moments(self, base: BaseBundle, images: torch.Tensor) -> torch.Tensor:
        dist = base.vae.encode(images.to(base.vae.dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1)  # (B, 2C, h, w)

    def scale_latents(self, base: BaseBundle, latents: torch.Tensor) -> torch.Tensor:
        config = base.vae.config
        return (latents - config.shift_factor) * config.scaling_factor

    @torch.no_grad()
    def control_input(self, base: BaseBundle, condition: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> packed control latents (B, h/2 * w/2, 4C)."""
        return self.control_from_moments(base, self.latent_moments(base, condition * 2 - 1))

    def control_from_moments(self, base: BaseBundle, moments: torch.Tensor) -> torch.Tensor:
        mean = moments.chunk(2, dim=1)[0]  # (B, C, h, w): the posterior mean
        return pack_latents(self.scale_latents(base, mean))

    # ---- the training objective ----------------------------------------------------------
    def schedule(self, base: BaseBundle) -> torch.Tensor:
        """The training schedule's timesteps (N,), from sigma 1 down (a fresh scheduler's: the
        base's own could have been set for sampling)."""
        return FlowMatchEulerDiscreteScheduler.from_config(base.noise_scheduler.config).timesteps

    def timesteps(self, base: BaseBundle, draw, n: int, generator) -> torch.Tensor:
        schedule = self.schedule(base)
        u = torch.sigmoid(LOGIT_MEAN + LOGIT_STD * draw(torch.randn, (n,), generator))  # (n,)
        index = (u * len(schedule)).long().clamp(max=len(schedule) - 1)
        return schedule.to(u.device)[index]

    def spread_timesteps(self, base: BaseBundle, n: int, device) -> torch.Tensor:
        schedule = self.schedule(base)
        return schedule[torch.linspace(0, len(schedule) - 1, n).long()].to(device)

    def sigmas(self, base: BaseBundle, t: torch.Tensor) -> torch.Tensor:
        return (t / base.noise_scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)

    def noised(self, base, latents, noise, t) -> torch.Tensor:
        sigma = self.sigmas(base, t)
        return (1 - sigma) * latents + sigma * noise

    def target(self, base, latents, noise, t) -> torch.Tensor:
        return noise - latents

    def conditioning(self, base: BaseBundle, text: torch.Tensor, noisy: torch.Tensor) -> dict:
        states, pooled = unpack_text(text, base.text_encoder.config.hidden_size)
        guidance = None
        if base.unet.config.guidance_embeds:  # FLUX.1-dev; schnell embeds none
            guidance = torch.full((noisy.shape[0],), TRAIN_GUIDANCE, device=noisy.device)
        return {"encoder_hidden_states": states, "pooled_projections": pooled,
                "txt_ids": torch.zeros(states.shape[1], 3, device=noisy.device),
                "img_ids": image_ids(*noisy.shape[-2:], noisy.device, noisy.dtype),
                "guidance": guidance}

    def predict(self, base, noisy, t, text) -> torch.Tensor:
        return denoise(base.unet, noisy, t, self.conditioning(base, text, noisy))

    # ---- sampling and export ----------------------------------------------------------------
    def sampling_scheduler(self, base: BaseBundle, name: str):
        return FlowMatchEulerDiscreteScheduler.from_config(base.noise_scheduler.config)

    def pipeline_parts(self, base: BaseBundle, scheduler) -> dict:
        return dict(pipeline_class=FluxControlNetPipeline, vae=base.vae,
                    text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                    text_encoder_2=base.extra["text_encoder_2"],
                    tokenizer_2=base.extra["tokenizer_2"], scheduler=scheduler)

    def export_unlocked(self, base: BaseBundle, directory: Path) -> None:
        raise ConfigError("control.sd_locked=false does not apply on base.family=flux")

    def build_tiny(self, directory: Path) -> None:
        """diffusers' tiny Flux test pipeline's shapes at the tiny world's 64 px: a VAE that
        downsamples 4x (16x16 latents, 4 channels -> 8x8 = 64 tokens of 16), one double and one
        single block of 2 heads x 16 (rope axes 4 + 4 + 8), guidance embedded as FLUX.1-dev,
        32-wide CLIP and T5 encoders. Both tokenizer slots hold the tiny world's CLIP tokenizer:
        there is no offline T5 tokenizer, and a random bundle's vocabulary carries no meaning."""
        from cnexp.tinyworld.tokenizer import build_tiny_tokenizer

        torch.manual_seed(0)
        tokenizer = build_tiny_tokenizer()
        clip = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                              num_hidden_layers=5, num_attention_heads=4, projection_dim=32,
                              max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.eos_token_id, hidden_act="gelu")
        t5 = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=5,
                      num_heads=4, relative_attention_num_buckets=8,
                      pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
        vae = AutoencoderKL(block_out_channels=(32, 32, 64), in_channels=3, out_channels=3,
                            down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4,
                            sample_size=64, norm_num_groups=32, use_quant_conv=False,
                            use_post_quant_conv=False, shift_factor=0.0609,
                            scaling_factor=1.5035)
        FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULE), vae=vae,
            text_encoder=CLIPTextModel(clip), tokenizer=tokenizer,
            text_encoder_2=T5EncoderModel(t5), tokenizer_2=tokenizer, transformer=transformer,
        ).save_pretrained(directory)
