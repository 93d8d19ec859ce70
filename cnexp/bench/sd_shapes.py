"""Random Stable Diffusion-shaped bundles: SD 1.5 / 2.1 architectures without their weights.

The numbers below are those of the published configs (stable-diffusion-v1-5 and
stabilityai/stable-diffusion-2-1: unet/, vae/, text_encoder/, scheduler/ config.json). At width
1.0 the parameter counts are the published ones (SD 1.5: UNet 859.5M, VAE 83.7M, text encoder
123.1M); `width` < 1 shrinks every channel count (rounded up to what the group norms and
attention heads divide) and keeps every depth, the resolution and the 77-token context, so a CPU
can run the same code paths. The tokenizer is the tiny world's (its ids fit the 49408-entry
embedding); the weights are random (seeded), so losses are only comparable between trainers.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
GROUPS = 32  # norm_num_groups of the UNet and the VAE

_UNET_15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=GROUPS, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=GROUPS, act_fn="silu",
    scaling_factor=0.18215)
_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", clip_sample=False,
                  steps_offset=1)
SHAPES = {
    "15": {"unet": _UNET_15, "vae": {**_VAE, "sample_size": 512},
           "text": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12,
                        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
           "scheduler": {**_SCHEDULER, "prediction_type": "epsilon"}, "resolution": 512},
    "21": {"unet": {**_UNET_15, "sample_size": 96, "attention_head_dim": (5, 10, 20, 20),
                    "cross_attention_dim": 1024, "use_linear_projection": True,
                    "upcast_attention": True},
           "vae": {**_VAE, "sample_size": 768},
           "text": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                        num_hidden_layers=23, num_attention_heads=16,
                        max_position_embeddings=77, hidden_act="gelu", projection_dim=512),
           "scheduler": {**_SCHEDULER, "prediction_type": "v_prediction"}, "resolution": 768},
}


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def scaled_configs(version: str, width: float = 1.0) -> dict:
    """The published configs of SD `version` ("15" | "21"), channels times `width`."""
    shape = SHAPES[version]
    unet, vae, text = dict(shape["unet"]), dict(shape["vae"]), dict(shape["text"])
    heads = unet["attention_head_dim"]  # diffusers' name; per block, these are head counts
    per_block = heads if isinstance(heads, tuple) else (heads,) * 4
    unet["block_out_channels"] = tuple(
        _round_up(c * width, math.lcm(GROUPS, h)) for c, h in zip(unet["block_out_channels"],
                                                                   per_block))
    vae["block_out_channels"] = tuple(_round_up(c * width, GROUPS)
                                      for c in vae["block_out_channels"])
    text["hidden_size"] = _round_up(text["hidden_size"] * width, text["num_attention_heads"])
    text["intermediate_size"] = 4 * text["hidden_size"]
    text["projection_dim"] = _round_up(text["projection_dim"] * width, 8)
    unet["cross_attention_dim"] = text["hidden_size"]
    return {"unet": unet, "vae": vae, "text": text, "scheduler": dict(shape["scheduler"])}


def tokenizer(max_length: int = 77) -> CLIPTokenizer:
    tok = CLIPTokenizer.from_pretrained(ROOT / "assets" / "tinyworld", subfolder="tokenizer")
    tok.model_max_length = max_length  # SD's context: 77 tokens
    return tok


def build_bundle(out: Path, version: str = "15", width: float = 1.0, seed: int = 0) -> Path:
    """Write a random SD-shaped diffusers bundle (model_index.json + parts) that
    cnexp.base.load_base and diffusers' train_controlnet.py both load."""
    cfg = scaled_configs(version, width)
    tok = tokenizer()
    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(**cfg["text"], bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**cfg["vae"]), text_encoder=CLIPTextModel(text_cfg), tokenizer=tok,
        unet=UNet2DConditionModel(**cfg["unet"]), scheduler=DDPMScheduler(**cfg["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return Path(out)


def write_triples(root: Path, sizes: dict[str, int], resolution: int) -> Path:
    """fill50k-layout splits (root/{train,val,test}) of tiny-world scenes drawn at `resolution`."""
    from cnexp.tinyworld.shapes import SPLIT_SEEDS, write_fill50k

    for split, n in sizes.items():
        split_root = write_fill50k(Path(root) / split, n, seed=SPLIT_SEEDS[split])
        for kind, resample in (("source", Image.NEAREST), ("target", Image.BICUBIC)):
            for path in (split_root / kind).glob("*.png"):
                with Image.open(path) as img:
                    img.resize((resolution, resolution), resample).save(path)
    return Path(root)


def parameter_counts(bundle: Path) -> dict[str, float]:
    """Millions of parameters per part, read on the meta device (nothing allocated)."""
    counts = {}
    with torch.device("meta"):
        for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            model = cls.from_config(cls.load_config(bundle, subfolder=name))
            counts[name] = sum(p.numel() for p in model.parameters()) / 1e6
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(bundle, subfolder="text_encoder"))
        counts["text_encoder"] = sum(p.numel() for p in text.parameters()) / 1e6
    return counts
