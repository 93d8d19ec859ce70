"""Architectures of the tiny world's base: SD's component types, shrunk for a 2-core CPU.

64 px images -> AutoencoderKL with 4x downsampling -> 16x16x4 latents. The UNet attends only at
8x8 and 4x4 (<= 64 tokens), because self-attention above 16x16 tokens dominates CPU time.
"""
from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

TEXT_DIM = 64


def tiny_clip(vocab_size: int, bos_id: int, eos_id: int, max_length: int) -> CLIPModel:
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
                          num_hidden_layers=3, num_attention_heads=4,
                          max_position_embeddings=max_length, projection_dim=TEXT_DIM,
                          bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    vision = CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=TEXT_DIM,
                              intermediate_size=4 * TEXT_DIM, num_hidden_layers=3,
                              num_attention_heads=4, projection_dim=TEXT_DIM)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=TEXT_DIM)
    return CLIPModel(config)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
        mid_block_add_attention=False,
    )


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=TEXT_DIM, attention_head_dim=8,
    )


def sd_noise_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training schedule (scaled-linear betas, epsilon prediction)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon",
                         clip_sample=False, steps_offset=1)
