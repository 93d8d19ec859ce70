"""The published bases that `python -m cnexp.plan` sizes without their weights, as data: each
bundle's components (model_index.json: library and class) with the values of each component's
config.json on the hub, what diffusers' peer scripts (examples/controlnet/train_controlnet_
{sdxl,sd3,flux}.py) feed and train, and the GPUs a plan can be made for.

cnexp/launch/geometry.py builds each component from these values on the meta device (no memory,
no download) and counts its parameters exactly: SDXL's UNet 2,567,463,684; SD3.5 Large's
transformer 8,056,627,520 and Medium's 2,243,171,520 (+ a 384x384x1536 position-embedding
buffer: its "2.5B"); FLUX.1-dev's transformer 11,901,408,320; the T5-XXL encoder 4,762,310,656
(tests/test_plan_memory.py). Keys a config.json holds but a class ignores (_class_name,
_diffusers_version, architectures, token ids) are left out.
"""
from __future__ import annotations

MiB = 2 ** 20

# ---- text encoders and VAEs shared by several bundles -------------------------------------
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,  # ViT-L/14
          "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
          "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,  # bigG/14
          "num_hidden_layers": 32, "max_position_embeddings": 77, "vocab_size": 49408,
          "projection_dim": 1280, "hidden_act": "gelu"}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,  # v1.1
          "num_decoder_layers": 24, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
          "dense_act_fn": "gelu_new", "is_gated_act": True, "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
          "tie_word_embeddings": False}
VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32, "sample_size": 1024,
       "force_upcast": True}
VAE_SDXL = {**VAE, "latent_channels": 4, "scaling_factor": 0.13025}
VAE_SD3 = {**VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
           "use_quant_conv": False, "use_post_quant_conv": False}
VAE_FLUX = {**VAE_SD3, "scaling_factor": 0.3611, "shift_factor": 0.1159}

# ---- denoisers --------------------------------------------------------------------------------
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "addition_embed_type_num_heads": 64,
    "projection_class_embeddings_input_dim": 2816, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0}
SD3_COMMON = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
              "attention_head_dim": 64, "joint_attention_dim": 4096,
              "pooled_projection_dim": 2048}
SD3_MEDIUM = {**SD3_COMMON, "num_layers": 24, "num_attention_heads": 24,
              "caption_projection_dim": 1536, "pos_embed_max_size": 192}
SD35_MEDIUM = {**SD3_MEDIUM, "pos_embed_max_size": 384, "qk_norm": "rms_norm",  # MMDiT-X
               "dual_attention_layers": list(range(13))}
SD35_LARGE = {**SD3_COMMON, "num_layers": 38, "num_attention_heads": 38,
              "caption_projection_dim": 2432, "pos_embed_max_size": 192, "qk_norm": "rms_norm"}
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}


def _sd3(transformer: dict) -> dict:
    return {"transformer": ("diffusers", "SD3Transformer2DModel", transformer),
            "vae": ("diffusers", "AutoencoderKL", VAE_SD3),
            "text_encoder": ("transformers", "CLIPTextModelWithProjection", CLIP_L),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G),
            "text_encoder_3": ("transformers", "T5EncoderModel", T5_XXL)}


# hub id -> family, whether the hub gates it (an accepted licence and a token), its components
BUNDLES = {
    "stabilityai/stable-diffusion-xl-base-1.0": {"family": "sdxl", "gated": False, "parts": {
        "unet": ("diffusers", "UNet2DConditionModel", SDXL_UNET),
        "vae": ("diffusers", "AutoencoderKL", VAE_SDXL),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G)}},
    "stabilityai/stable-diffusion-3.5-medium": {"family": "sd3", "gated": True,
                                                "parts": _sd3(SD35_MEDIUM)},
    "stabilityai/stable-diffusion-3.5-large": {"family": "sd3", "gated": True,
                                               "parts": _sd3(SD35_LARGE)},
    "stabilityai/stable-diffusion-3-medium-diffusers": {"family": "sd3", "gated": True,
                                                        "parts": _sd3(SD3_MEDIUM)},
    "black-forest-labs/FLUX.1-dev": {"family": "flux", "gated": True, "parts": {
        "transformer": ("diffusers", "FluxTransformer2DModel", FLUX_DEV),
        "vae": ("diffusers", "AutoencoderKL", VAE_FLUX),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "text_encoder_2": ("transformers", "T5EncoderModel", T5_XXL)}},
}
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

# By family: the tokens each text encoder reads per prompt as cnexp's family encodes it (SD3:
# T5's 256, families/sd3_control.py T5_TOKENS, the SD3 pipelines' default, where the peer script
# trains on its --max_sequence_length 77; Flux: T5's 512, families/flux_control.py), which
# encoders make the denoiser's context (SD3: CLIP's 77 then T5's tokens; Flux: T5's, CLIP is
# pooled only), whether the control image reaches the branch as VAE latents (SD3, Flux; SD's
# ControlNet reads pixels), and the peer script's ControlNet, measured when the run's own
# branch does not build on the meta device: SD3ControlNetModel.from_transformer's 12 layers
# (--num_extra_conditioning_channels 0), train_controlnet_flux.py's --num_double_layers 4
# --num_single_layers 4. tests/test_plan_memory.py pins the token counts to the families'.
BY_FAMILY = {
    "sd": {"tokens": {"text_encoder": 77}, "context": ["text_encoder"],
           "latent_control": False, "controlnet": ("ControlNetModel", {})},
    "sdxl": {"tokens": {"text_encoder": 77, "text_encoder_2": 77}, "context": ["text_encoder"],
             "latent_control": False, "controlnet": ("ControlNetModel", {})},
    "sd3": {"tokens": {"text_encoder": 77, "text_encoder_2": 77, "text_encoder_3": 256},
            "context": ["text_encoder", "text_encoder_3"], "latent_control": True,
            "controlnet": ("SD3ControlNetModel", {"num_layers": 12,
                                                  "extra_conditioning_channels": 0})},
    "flux": {"tokens": {"text_encoder": 77, "text_encoder_2": 512}, "context": ["text_encoder_2"],
             "latent_control": True,
             "controlnet": ("FluxControlNetModel", {"num_layers": 4, "num_single_layers": 4})},
}

# The GPUs a plan is made for (--gpu NAME): the memory nvidia-smi reports, and dense bf16
# tensor-core TFLOP/s (no sparsity; fp32 accumulate) from the vendors' data sheets. H100 is the
# SXM part (PCIe: 756 TFLOP/s). Under trainer.precision=32-true matmuls run in TF32 at half.
GPUS = {
    "A100-40": ("NVIDIA A100 40GB", 40960 * MiB, 312.0),
    "A100-80": ("NVIDIA A100 80GB", 81920 * MiB, 312.0),
    "H100": ("NVIDIA H100 80GB SXM", 81559 * MiB, 989.0),
    "H200": ("NVIDIA H200 141GB", 143771 * MiB, 989.0),
    "L40S": ("NVIDIA L40S 48GB", 46068 * MiB, 362.0),
    "RTX4090": ("NVIDIA GeForce RTX 4090 24GB", 24564 * MiB, 165.0),
}
GPU_ALIASES = {"A100": "A100-80", "H100-80": "H100", "4090": "RTX4090", "RTX-4090": "RTX4090",
               "A100-40GB": "A100-40", "A100-80GB": "A100-80"}
