"""Stable Diffusion 3 / 3.5: an MMDiT (SD3Transformer2DModel) trained as a rectified flow on VAE
latents, under three text encoders; sampled through diffusers' StableDiffusion3ControlNetPipeline.

Text: as diffusers' SD3 pipelines build it. Two CLIPTextModelWithProjection encoders' penultimate
hidden states side by side (B, 77, 768 + 1280), zero-padded to T5's width and followed by T5's
states (B, T5_TOKENS, 4096) along the tokens; the pooled vector is the two CLIP projections side
by side (B, 2048). Without T5 in the bundle (diffusers allows text_encoder_3=None) its states are
zeros, as the pipeline makes them. The encoder cache holds states and pooled vector in one tensor
(family.pack_text): prompt dropout blanks all three encoders and the pooled vector together.

Objective: diffusers' train_controlnet_sd3.py with its defaults. Timesteps come from the bundle's
FlowMatchEulerDiscreteScheduler grid (its `shift` applied), indexed by u = sigmoid(N(0, 1))
(weighting_scheme=logit_normal, logit_mean 0, logit_std 1: TIMESTEP_LOGIT_MEAN / _STD; that
scheme weights the loss uniformly); x_s = (1 - s) x + s noise with s = t / 1000. The script
preconditions the output by default (precondition_outputs=1, as in EDM): the velocity v the
transformer predicts becomes the clean-latent estimate x_s - s v, trained against x, i.e. the
velocity loss ||v - (noise - x)||^2 weighted by s^2 (PRECONDITION_OUTPUTS; `loss_prediction`).

The control branches are SD3ControlNetModel (cnexp/families/sd3_control.py); what the control
network reads is the condition's VAE latents, (mean - shift) * scale, as the SD3 ControlNet
pipeline prepares its control image (the pipeline samples the posterior: a trained VAE's, and
the tiny bundle's, is nearly a point, so that is the mean).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from cnexp.base import BaseBundle
from cnexp.config import BaseConfig
from cnexp.errors import ConfigError
from cnexp.families.family import BaseFamily, pack_text, register, unpack_text
from cnexp.families.loading import freeze, load_parts
from cnexp.families.sd3_control import NO_T5_TOKENS, T5_TOKENS, check_knobs, sd3_branch

TIMESTEP_LOGIT_MEAN, TIMESTEP_LOGIT_STD = 0.0, 1.0  # the script's logit_normal defaults
PRECONDITION_OUTPUTS = True  # the script's default (precondition_outputs=1)


class IndexedTokenizer:
    """Loads a bundle's tokenizer as the class its model_index.json names (what diffusers'
    from_pretrained loads): T5TokenizerFast in SD3's bundles, CLIPTokenizer in the tiny one."""

    @staticmethod
    def from_pretrained(source: str, subfolder: str, **kwargs):
        from diffusers import DiffusionPipeline

        if Path(source).is_dir():
            index = json.loads((Path(source) / "model_index.json").read_text())
        else:
            index = DiffusionPipeline.load_config(source, **kwargs)
        _, name = index[subfolder]  # (library, class)
        return getattr(transformers, name).from_pretrained(source, subfolder=subfolder, **kwargs)


@register
class StableDiffusion3Family(BaseFamily):
    name = "sd3"
    control_reads_latents = True

    def load(self, cfg: BaseConfig) -> BaseBundle:
        parts = load_parts(cfg, self, {
            "transformer": SD3Transformer2DModel, "vae": AutoencoderKL,
            "text_encoder": CLIPTextModelWithProjection,
            "text_encoder_2": CLIPTextModelWithProjection, "text_encoder_3": T5EncoderModel,
            "tokenizer": IndexedTokenizer, "tokenizer_2": IndexedTokenizer,
            "tokenizer_3": IndexedTokenizer, "scheduler": FlowMatchEulerDiscreteScheduler},
            optional=("text_encoder_3", "tokenizer_3"))
        extra = {name: parts[name] for name in
                 ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")}
        base = BaseBundle(parts["vae"], parts["text_encoder"], parts["tokenizer"],
                          parts["transformer"], parts["scheduler"], parts["source"], self.name,
                          extra=extra)
        return freeze(self, base)

    def frozen(self, base: BaseBundle) -> tuple:
        encoders = [base.text_encoder, base.extra["text_encoder_2"], base.extra["text_encoder_3"]]
        return (base.unet, base.vae, *[e for e in encoders if e is not None])

    def denoiser(self, base: BaseBundle) -> SD3Transformer2DModel:
        return base.unet

    def encoders(self, base: BaseBundle) -> dict:
        return {name: part for name, part in super().encoders(base).items() if part is not None}

    # ---- the control branches ------------------------------------------------------------
    def branch(self, name: str):
        return sd3_branch(name)

    def check(self, control) -> None:
        check_knobs(control)

    # ---- prompts and images ---------------------------------------------------------------
    def encode_text(self, base: BaseBundle, prompts: list[str], device) -> torch.Tensor:
        states, pooled = [], []
        length = base.tokenizer.model_max_length  # the pipeline pads both CLIPs to the first's
        for tokenizer, encoder in ((base.tokenizer, base.text_encoder),
                                   (base.extra["tokenizer_2"], base.extra["text_encoder_2"])):
            ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                            return_tensors="pt").input_ids.to(device)  # (B, 77)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (B, 77, D_i): penultimate, as SD3
            pooled.append(out.text_embeds)  # (B, P_i): the projection
        clip = torch.cat(states, dim=-1)  # (B, 77, D_1 + D_2)
        t5 = self.t5_states(base, prompts, device, clip.dtype)  # (B, T5_TOKENS, D_t5)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, D_t5)
        return pack_text(torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1))

    def t5_states(self, base: BaseBundle, prompts: list[str], device, dtype) -> torch.Tensor:
        """(B, T5_TOKENS, D): T5's last hidden states; without T5 in the bundle, NO_T5_TOKENS
        rows of zeros (the pipeline's own stand-in, at the length sampling asks for)."""
        encoder, tokenizer = base.extra["text_encoder_3"], base.extra["tokenizer_3"]
        if encoder is None:
            width = base.unet.config.joint_attention_dim
            return torch.zeros(len(prompts), NO_T5_TOKENS, width, device=device, dtype=dtype)
        ids = tokenizer(prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        return encoder(ids)[0].to(dtype)

    def pooled_dim(self, base: BaseBundle) -> int:
        """The pooled vector's width: the two CLIP projections side by side."""
        return (base.text_encoder.config.projection_dim
                + base.extra["text_encoder_2"].config.projection_dim)

    def latent_moments(self, base: BaseBundle, images: torch.Tensor) -> torch.Tensor:
        dist = base.vae.encode(images.to(base.vae.dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1)  # (B, 2C, h, w)

    def scale_latents(self, base: BaseBundle, latents: torch.Tensor) -> torch.Tensor:
        config = base.vae.config
        return (latents - (config.get("shift_factor") or 0.0)) * config.scaling_factor

    # ---- the training objective ----------------------------------------------------------
    def training_grid(self, base: BaseBundle, device) -> torch.Tensor:
        """The scheduler's training timesteps, 1000 down to ~1, shift applied (a fresh copy:
        set_timesteps on the bundle's scheduler would have replaced its own)."""
        config = base.noise_scheduler.config
        return FlowMatchEulerDiscreteScheduler.from_config(config).timesteps.to(device)

    def timesteps(self, base: BaseBundle, draw, n: int, generator) -> torch.Tensor:
        z = draw(torch.randn, (n,), generator)  # (n,): logit-normal u = sigmoid(z)
        grid = self.training_grid(base, z.device)
        u = torch.sigmoid(z * TIMESTEP_LOGIT_STD + TIMESTEP_LOGIT_MEAN)
        return grid[(u * len(grid)).long().clamp_max(len(grid) - 1)]

    def spread_timesteps(self, base: BaseBundle, n: int, device) -> torch.Tensor:
        grid = self.training_grid(base, device)
        return grid[torch.linspace(0, len(grid) - 1, n, device=device).long()]

    def sigma(self, base: BaseBundle, t: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, 1, 1, 1) noise levels s = t / num_train_timesteps."""
        return (t.float() / base.noise_scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)

    def noised(self, base, latents, noise, t) -> torch.Tensor:
        s = self.sigma(base, t)
        return (1 - s) * latents + s * noise

    def target(self, base, latents, noise, t) -> torch.Tensor:
        return latents if PRECONDITION_OUTPUTS else noise - latents

    def loss_prediction(self, base, pred, noisy, t) -> torch.Tensor:
        """The predicted velocity -> the clean-latent estimate x_s - s v (preconditioned)."""
        return noisy - self.sigma(base, t) * pred if PRECONDITION_OUTPUTS else pred

    def conditioning(self, base: BaseBundle, text: torch.Tensor, noisy: torch.Tensor) -> dict:
        states, pooled = unpack_text(text, self.pooled_dim(base))
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    @torch.no_grad()
    def control_input(self, base: BaseBundle, condition: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, h, w): its VAE latents (the posterior mean), shifted
        and scaled as the denoiser's latents. A dropped condition (zeros: black) reads as the
        latents of a black image, what the pipeline makes of a black control image."""
        return self.control_from_moments(base, self.latent_moments(base, condition * 2 - 1))

    def control_from_moments(self, base: BaseBundle, moments: torch.Tensor) -> torch.Tensor:
        mean = moments.chunk(2, dim=1)[0]  # (B, C, h, w)
        return self.scale_latents(base, mean).float()

    def predict(self, base, noisy, t, text) -> torch.Tensor:
        return base.unet(hidden_states=noisy, timestep=t, return_dict=False,
                         **self.conditioning(base, text, noisy))[0]

    # ---- sampling and export ----------------------------------------------------------------
    def sampling_scheduler(self, base: BaseBundle, name: str):
        """The base's own FlowMatchEulerDiscreteScheduler (a fresh one): sampling.scheduler
        names DDPM-family samplers, which do not apply to a flow; it is ignored here."""
        return FlowMatchEulerDiscreteScheduler.from_config(base.noise_scheduler.config)

    def pipeline_parts(self, base: BaseBundle, scheduler) -> dict:
        return dict(pipeline_class=StableDiffusion3ControlNetPipeline, vae=base.vae,
                    text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                    scheduler=scheduler, **base.extra)

    def export_unlocked(self, base: BaseBundle, directory: Path) -> None:
        raise ConfigError("control.sd_locked=false does not apply to base.family=sd3 (the "
                          "transformer has no UNet decoder); set control.sd_locked=true")

    def build_tiny(self, directory: Path) -> None:
        """diffusers' tiny SD3 test pipeline's shapes, at the tiny world's 64 px: a VAE that
        downsamples 4x (16x16 latents, 4 channels, SD3's shift and scaling factors), a 4-block
        transformer over 2x2 patches (64 image tokens), two 32-wide CLIPs and a 64-wide T5.
        Every tokenizer slot, T5's too, holds the tiny world's CLIP tokenizer: a random
        bundle's vocabulary does not matter, and no T5 tokenizer is available offline. The
        VAE's log-variance is set to -20 (a near-point posterior, as a trained VAE's)."""
        from cnexp.tinyworld.tokenizer import build_tiny_tokenizer

        torch.manual_seed(0)
        tokenizer = build_tiny_tokenizer()
        clip = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=5,
            num_attention_heads=4, projection_dim=32, hidden_act="gelu",
            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        t5 = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=64, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", pad_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32)
        vae = AutoencoderKL(block_out_channels=(32, 32, 64), in_channels=3, out_channels=3,
                            down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4,
                            sample_size=64, norm_num_groups=32, shift_factor=0.0609,
                            scaling_factor=1.5035, use_quant_conv=False,
                            use_post_quant_conv=False)
        with torch.no_grad():  # conv_out gives (mean, logvar) on channels
            vae.encoder.conv_out.weight[4:].zero_()
            vae.encoder.conv_out.bias[4:].fill_(-20.0)
        StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae, text_encoder=CLIPTextModelWithProjection(clip), tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=tokenizer,
            text_encoder_3=T5EncoderModel(t5), tokenizer_3=tokenizer,
        ).save_pretrained(directory)
