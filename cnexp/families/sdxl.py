"""Stable Diffusion XL: SD's UNet objective (DDPM noise, epsilon or v target) with two CLIP text
encoders and the UNet's added conditioning.

The text conditioning is the two encoders' penultimate hidden states side by side (B, 77, 2048)
plus text_encoder_2's pooled projection (B, 1280) and `time_ids` (original size, crop top-left,
target size). The data is resized to the training resolution, so the original and target
sizes are that resolution and the crop is (0, 0), as diffusers' SDXL pipelines assume at
sampling. The encoder cache holds the hidden states and the pooled vector in one tensor
(family.pack_text): prompt dropout blanks both encoders and the pooled vector together.

ControlNetModel.from_unet copies SDXL's UNet encoder with its added embedding, so the residual
branches (copy, scratch, lite, lora_copy; connector=cross_norm) run here unchanged; ControlNet-XS
and T2I-Adapter are refused (see `branch`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler,
                       StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from cnexp.base import BaseBundle
from cnexp.config import BaseConfig
from cnexp.errors import ConfigError
from cnexp.families.family import pack_text, register, unpack_text
from cnexp.families.loading import freeze, load_parts
from cnexp.families.sd import StableDiffusionFamily

# the branches diffusers' SDXL ControlNet pipeline samples; xs and t2i_adapter have SDXL
# pipelines in diffusers (StableDiffusionXLControlNetXSPipeline, StableDiffusionXLAdapterPipeline)
# that cnexp does not wire yet: refused rather than sampled through SD 1.5's pipelines
BRANCHES = ("copy", "scratch", "lite", "lora_copy")
NOT_YET = {"xs": "cnexp samples ControlNet-XS through SD 1.5's XS pipeline only (diffusers' "
                 "StableDiffusionXLControlNetXSPipeline is not wired yet)",
           "t2i_adapter": "cnexp samples the adapter through SD 1.5's adapter pipeline only "
                          "(diffusers' StableDiffusionXLAdapterPipeline is not wired yet)"}


@register
class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "sdxl"

    def load(self, cfg: BaseConfig) -> BaseBundle:
        parts = load_parts(cfg, self, {
            "unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer,
            "tokenizer_2": CLIPTokenizer, "scheduler": DDPMScheduler})
        base = BaseBundle(parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["unet"],
                          parts["scheduler"], parts["source"], self.name,
                          extra={"text_encoder_2": parts["text_encoder_2"],
                                 "tokenizer_2": parts["tokenizer_2"]})
        return freeze(self, base)

    def frozen(self, base: BaseBundle) -> tuple:
        return base.unet, base.vae, base.text_encoder, base.extra["text_encoder_2"]

    def branch(self, name: str):
        if name in NOT_YET:
            raise ConfigError(f"control.branch={name} does not run on base.family=sdxl: "
                              f"{NOT_YET[name]}; use one of {', '.join(BRANCHES)}")
        return super().branch(name)

    def encode_text(self, base: BaseBundle, prompts: list[str], device) -> torch.Tensor:
        states, pooled = [], None
        for tokenizer, encoder in ((base.tokenizer, base.text_encoder),
                                   (base.extra["tokenizer_2"], base.extra["text_encoder_2"])):
            ids = tokenizer(prompts, padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids.to(device)  # (B, T)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (B, T, D_i): the penultimate layer, as SDXL
            pooled = out[0]  # the last encoder's: text_encoder_2's projection (B, P)
        return pack_text(torch.cat(states, dim=-1), pooled)  # (B, T + rows, D_1 + D_2)

    def pooled_dim(self, base: BaseBundle) -> int:
        return base.extra["text_encoder_2"].config.projection_dim

    def conditioning(self, base: BaseBundle, text: torch.Tensor, noisy: torch.Tensor) -> dict:
        states, pooled = unpack_text(text, self.pooled_dim(base))
        height, width = (side * base.latent_scale for side in noisy.shape[-2:])
        # (original h, w, crop top, left, target h, w): resized data, uncropped
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=noisy.device,
                                dtype=states.dtype).expand(noisy.shape[0], 6)
        return {"encoder_hidden_states": states,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def predict(self, base, noisy, t, text) -> torch.Tensor:
        return base.unet(noisy, t, **self.conditioning(base, text, noisy)).sample

    def pipeline_parts(self, base: BaseBundle, scheduler) -> dict:
        return dict(pipeline_class=StableDiffusionXLControlNetPipeline, vae=base.vae,
                    text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                    text_encoder_2=base.extra["text_encoder_2"],
                    tokenizer_2=base.extra["tokenizer_2"], scheduler=scheduler,
                    add_watermarker=False)

    def build_tiny(self, directory: Path) -> None:
        """diffusers' tiny SDXL test pipeline's shapes, at the tiny world's 64 px: a VAE that
        downsamples 4x (16x16 latents: attention at 8x8 only), two 32-wide CLIP encoders."""
        from cnexp.tinyworld.tokenizer import build_tiny_tokenizer

        torch.manual_seed(0)
        tokenizer = build_tiny_tokenizer()
        text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                    num_hidden_layers=5, num_attention_heads=4, projection_dim=32,
                    max_position_embeddings=tokenizer.model_max_length,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.eos_token_id, hidden_act="gelu")
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
            norm_num_groups=32)
        vae = AutoencoderKL(block_out_channels=(32, 32, 64), in_channels=3, out_channels=3,
                            down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4,
                            sample_size=64, norm_num_groups=32)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                           beta_schedule="scaled_linear",
                                           timestep_spacing="leading")
        StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer,
            text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
        ).save_pretrained(directory)
