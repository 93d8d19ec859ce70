"""Build the tiny world's pretrained base from nothing: tokenizer, CLIP, VAE, text-to-image UNet.

    python -m cnexp.tinyworld.build --out assets/tinyworld   # ~30 min on 2 CPU cores

The result is a plain `StableDiffusionPipeline` directory (plus `clip/`, the CLIP-score model),
so the code that loads Stable Diffusion 1.5 loads it unchanged. The UNet never sees a spatial
condition: it knows colours and shapes from text but places them at random, so placement in a
controlled sample can only come from the ControlNet. Deterministic for a given seed and torch.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from transformers import CLIPImageProcessor, CLIPProcessor

from cnexp.tinyworld import models
from cnexp.tinyworld.shapes import scene_at
from cnexp.tinyworld.tokenizer import MAX_LENGTH, build_tiny_tokenizer

BUILD_SEED = 1234  # scenes for the base come from their own seed, disjoint from the data splits


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _scenes_as_tensors(n: int) -> tuple[torch.Tensor, list[str]]:
    scenes = [scene_at(BUILD_SEED, i) for i in range(n)]
    images = np.stack([np.asarray(s.target()) for s in scenes])  # (N, 64, 64, 3) uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [s.caption() for s in scenes]


def _to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0  # [-1, 1]


def _cosine_lr(opt, step: int, total: int, base_lr: float, warmup: int = 100) -> None:
    scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in opt.param_groups:
        group["lr"] = base_lr * max(scale, 0.02)


def train_clip(clip, tokenizer, images, captions, steps: int, batch: int = 256, lr: float = 1e-3):
    ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        pixels = (images[idx].float() / 255 - mean) / std
        out = clip(input_ids=ids[idx], pixel_values=pixels)
        # Identical captions in a batch are true positives, not negatives.
        same = (ids[idx][:, None, :] == ids[idx][None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = (torch.sum(-target * F.log_softmax(out.logits_per_text, 1), 1).mean()
                + torch.sum(-target * F.log_softmax(out.logits_per_image, 1), 1).mean()) / 2
        _cosine_lr(opt, step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            _log(f"clip step {step} loss {loss.item():.3f}")
    return clip.eval()


def train_vae(vae, images, steps: int, batch: int = 32, lr: float = 1e-3, kl_weight: float = 1e-7):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = _to_unit(images[torch.randint(0, len(images), (batch,), generator=gen)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + kl_weight * posterior.kl().mean()
        _cosine_lr(opt, step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            _log(f"vae step {step} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():  # SD convention: latents * scaling_factor have unit variance
        z = torch.cat([vae.encode(_to_unit(images[i:i + 256])).latent_dist.mean
                       for i in range(0, min(len(images), 2048), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    _log(f"vae scaling_factor {vae.config.scaling_factor:.4f}")
    return vae


@torch.no_grad()
def _encode_all(vae, text_encoder, tokenizer, images, captions):
    latents, embeds = [], []
    for i in range(0, len(images), 256):
        dist = vae.encode(_to_unit(images[i:i + 256])).latent_dist
        latents.append(torch.cat([dist.mean, dist.std], 1))
        ids = tokenizer(captions[i:i + 256], padding="max_length", max_length=MAX_LENGTH,
                        truncation=True, return_tensors="pt").input_ids
        embeds.append(text_encoder(ids)[0])
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt")
    return torch.cat(latents), torch.cat(embeds), text_encoder(empty.input_ids)[0]


def train_unet(unet, scheduler, latent_stats, embeds, empty_embed, scaling: float, steps: int,
               batch: int = 64, lr: float = 5e-4, caption_dropout: float = 0.1):
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(2)
    ema = None
    for step in range(steps):
        idx = torch.randint(0, len(latent_stats), (batch,), generator=gen)
        mean, std = latent_stats[idx].chunk(2, dim=1)
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
        drop = torch.rand(batch, generator=gen) < caption_dropout  # so guidance works later
        text = torch.where(drop[:, None, None], empty_embed, embeds[idx])
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(scheduler.add_noise(latents, noise, t), t, text).sample
        loss = F.mse_loss(pred, noise)
        _cosine_lr(opt, step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 200 == 0 or step == steps - 1:
            _log(f"unet step {step} loss(ema) {ema:.4f}")
    return unet.eval()


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build(out: Path, n_images: int, clip_steps: int, vae_steps: int, unet_steps: int) -> Path:
    torch.manual_seed(0)
    start = time.time()
    images, captions = _scenes_as_tensors(n_images)
    tokenizer = build_tiny_tokenizer()
    _log(f"{n_images} scenes, vocabulary {len(tokenizer)}")

    clip = train_clip(models.tiny_clip(len(tokenizer), tokenizer.bos_token_id,
                                       tokenizer.eos_token_id, MAX_LENGTH),
                      tokenizer, images, captions, clip_steps)
    vae = train_vae(models.tiny_vae(), images, vae_steps)
    text_encoder = _text_encoder_from_clip(clip)
    latent_stats, embeds, empty = _encode_all(vae, text_encoder, tokenizer, images, captions)
    scheduler = models.sd_noise_scheduler()
    unet = train_unet(models.tiny_unet(), scheduler, latent_stats, embeds, empty,
                      vae.config.scaling_factor, unet_steps)

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)), tokenizer=tokenizer)
    clip.save_pretrained(out / "clip")
    processor.save_pretrained(out / "clip")
    (out / "build_info.json").write_text(json.dumps({
        "n_images": n_images, "clip_steps": clip_steps, "vae_steps": vae_steps,
        "unet_steps": unet_steps, "seconds": round(time.time() - start),
        "torch": torch.__version__}, indent=1))
    _log(f"saved to {out} in {time.time() - start:.0f}s")
    return out


def _text_encoder_from_clip(clip):
    """The CLIP text tower as a standalone CLIPTextModel (the base's text encoder)."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())
    return encoder.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/tinyworld"))
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--clip-steps", type=int, default=1000)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--unet-steps", type=int, default=3000)
    args = parser.parse_args()
    build(args.out, args.images, args.clip_steps, args.vae_steps, args.unet_steps)


if __name__ == "__main__":
    main()
