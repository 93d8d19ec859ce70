"""Build the tiny world's transformer base: SD3's shape (an MMDiT over 2x2 latent patches, a
rectified flow) trained on the tiny world's scenes, for `base=tiny_dit`.

    python -m cnexp.tinyworld.dit --out assets/tinydit   # ~23 min on 2 CPU cores

It reuses the UNet base's trained parts (assets/tinyworld, `make tinyworld`) and trains only the
transformer:
- vae: assets/tinyworld/vae as is (64 px -> 16x16x4 latents), its scaling factor kept and
  shift_factor set to 0 (SD3's pipelines read both: latents = (z - shift) * scale).
- text_encoder, text_encoder_2: the tiny CLIP's text tower and text projection as
  CLIPTextModelWithProjection, the same weights in both slots (there is one trained CLIP);
  tokenizer, tokenizer_2: the tiny world's. No T5: the SD3 family (and diffusers' pipeline)
  puts zeros in its place.
- scheduler: FlowMatchEulerDiscreteScheduler, shift 1.0 (none). SD3 samples 3.0 at 1024 px
  (128x128 latents): a large image keeps its layout visible under more noise, so the schedule
  moves towards high noise; the SD3 paper's rule sqrt(pixels / 256^2) is below 1 at 64 px.
- transformer: SD3Transformer2DModel, 4 joint blocks 64 wide (4 heads of 16), 0.6M parameters,
  trained 15000 steps of batch 32 at lr 1e-3 (cosine, 100 warmup) with the SD3 family's own
  objective (cnexp.families.sd3: its text encoding, timesteps, noising, target and
  preconditioned prediction), as the ControlNet later trains against it; captions dropped to ""
  with probability 0.1 so classifier-free guidance works. It never sees a spatial condition: it
  places shapes at random. Each step attends over 64 image tokens and 32 CLIP tokens (no
  rows where T5 would be: the family puts none for a bundle without T5): 0.09 s a step on 2
  cores, 1371 s in all (AMD EPYC with AVX-512, torch 2.14.1, 2026-12-07). At equal CPU
  time a 96-wide model and a 6-block one reached a higher validation loss in short runs.
- Deterministic for a seed, a torch build and --threads.
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer

from cnexp.base import BaseBundle
from cnexp.errors import CnexpError
from cnexp.families.family import get_family
from cnexp.tinyworld.build import _cosine_lr, _log, _scenes_as_tensors, _to_unit

WORLD = Path(__file__).resolve().parents[2] / "assets" / "tinyworld"  # its VAE, CLIP, tokenizer
SHIFT = 1.0
CAPTION_DROPOUT = 0.1


def tiny_transformer(width: int, layers: int, heads: int, text_dim: int) -> SD3Transformer2DModel:
    """SD3's MMDiT on 16x16x4 latents: 2x2 patches (64 image tokens), `layers` joint blocks of
    `width` (= heads x head dim) channels; text states and pooled vector `text_dim` wide."""
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=width // heads, num_attention_heads=heads,
        joint_attention_dim=text_dim, caption_projection_dim=width,
        pooled_projection_dim=text_dim, pos_embed_max_size=32)  # up to 256 px: 32x32 patches


def text_tower(clip: CLIPModel) -> CLIPTextModelWithProjection:
    """The CLIP's text tower and text projection as SD3's text encoder class."""
    encoder = CLIPTextModelWithProjection(clip.config.text_config)
    state = {f"text_model.{k}": v for k, v in clip.text_model.state_dict().items()}
    state["text_projection.weight"] = clip.text_projection.weight
    encoder.load_state_dict(state)
    return encoder.eval()


def world_parts(world: Path) -> tuple[AutoencoderKL, CLIPTextModelWithProjection, CLIPTokenizer]:
    """The UNet base's VAE (shift_factor 0, SD3's pipelines need a number), its CLIP text tower
    with projection, and its tokenizer."""
    missing = [p for p in ("vae", "clip", "tokenizer") if not (world / p).is_dir()]
    if missing:
        raise CnexpError(f"--world {world}: no {', '.join(missing)} there; build the UNet "
                         "base first (make tinyworld) or point --world at it")
    vae = AutoencoderKL.from_pretrained(world / "vae").eval()
    vae.register_to_config(shift_factor=0.0)
    encoder = text_tower(CLIPModel.from_pretrained(world / "clip"))
    return vae, encoder, CLIPTokenizer.from_pretrained(world / "tokenizer")


def bundle(vae, encoder, tokenizer, transformer, scheduler) -> BaseBundle:
    """The parts as the SD3 family reads a loaded base (one encoder in both CLIP slots)."""
    extra = {"text_encoder_2": encoder, "tokenizer_2": tokenizer, "text_encoder_3": None,
             "tokenizer_3": None}
    return BaseBundle(vae, encoder, tokenizer, transformer, scheduler, "", "sd3", extra=extra)


@torch.no_grad()
def latent_moments(family, base: BaseBundle, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, 64, 64) uint8 -> (N, 8, 16, 16): the VAE posterior's mean and std, as the family
    encodes a training image."""
    return torch.cat([family.latent_moments(base, _to_unit(images[i:i + 256]))
                      for i in range(0, len(images), 256)])


def draw(sampler, shape, generator, **kwargs):
    """The family's draw(sampler, shape, generator) on one process."""
    return sampler(*kwargs.pop("args", ()), shape, generator=generator, **kwargs)


def train_step(family, base, moments, captions, empty, generator, batch: int) -> torch.Tensor:
    """One batch of the SD3 family's objective (module.diffusion_loss without a control)."""
    idx = torch.randint(0, len(moments), (batch,), generator=generator)
    mean, std = moments[idx].chunk(2, dim=1)  # (B, 4, 16, 16) each
    latents = family.scale_latents(base, mean + std * torch.randn(mean.shape, generator=generator))
    keep = torch.rand(batch, generator=generator) >= CAPTION_DROPOUT
    with torch.no_grad():
        text = family.encode_text(base, [captions[i] for i in idx.tolist()], "cpu")
    text = torch.where(keep.view(-1, 1, 1), text, empty)  # (B, T, D)
    noise = torch.randn(latents.shape, generator=generator)
    t = family.timesteps(base, draw, batch, generator)  # (B,)
    noisy = family.noised(base, latents, noise, t)
    pred = family.loss_prediction(base, family.predict(base, noisy, t, text), noisy, t)
    return F.mse_loss(pred, family.target(base, latents, noise, t))


def train_transformer(family, base: BaseBundle, moments, captions, steps: int, batch: int,
                      lr: float, seed: int, checkpoint=None) -> list[float]:
    """Train base.unet in place; the loss's running mean every 100 steps (and the last).
    `checkpoint(step)`, if given, is called after each step (it saves or not)."""
    transformer = base.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        empty = family.encode_text(base, [""], "cpu")  # (1, T, D): a dropped caption
    ema, losses = None, []
    for step in range(steps):
        loss = train_step(family, base, moments, captions, empty, generator, batch)
        _cosine_lr(opt, step, steps, lr, warmup=min(100, max(1, steps // 10)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            losses.append(round(ema, 5))
            _log(f"transformer step {step} loss(ema) {ema:.4f}")
        if checkpoint is not None:
            checkpoint(step + 1)
    transformer.eval().requires_grad_(False)
    return losses


def save(base: BaseBundle, out: Path) -> None:
    StableDiffusion3Pipeline(
        transformer=base.unet, scheduler=base.noise_scheduler, vae=base.vae,
        text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        text_encoder_2=base.extra["text_encoder_2"], tokenizer_2=base.extra["tokenizer_2"],
        text_encoder_3=None, tokenizer_3=None).save_pretrained(out)


def build(out: Path, world: Path = WORLD, n_images: int = 10000, steps: int = 15000,
          batch: int = 32, lr: float = 1e-3, width: int = 64, layers: int = 4, heads: int = 4,
          seed: int = 0, save_every: int = 0) -> Path:
    """Train and save the base to `out`; with save_every, also every that many steps to
    out/step-<N> (to read how the drawn kinds grow with training: base_check on each)."""
    start = time.time()
    vae, encoder, tokenizer = world_parts(world)
    torch.manual_seed(seed)  # the transformer's initial weights
    transformer = tiny_transformer(width, layers, heads, 2 * encoder.config.hidden_size)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    base, family = bundle(vae, encoder, tokenizer, transformer, scheduler), get_family("sd3")
    images, captions = _scenes_as_tensors(n_images)
    moments = latent_moments(family, base, images)
    params = sum(p.numel() for p in transformer.parameters())
    _log(f"{n_images} scenes; transformer {params / 1e6:.2f}M parameters, {steps} steps")
    def checkpoint(step: int) -> None:
        if save_every and step % save_every == 0 and step < steps:
            save(base, out / f"step-{step}")
    losses = train_transformer(family, base, moments, captions, steps, batch, lr, seed,
                               checkpoint)
    save(base, out)
    (out / "build_info.json").write_text(json.dumps({
        "world": shown(world), "n_images": n_images, "steps": steps, "batch": batch, "lr": lr,
        "width": width, "layers": layers, "heads": heads, "seed": seed, "shift": SHIFT,
        "caption_dropout": CAPTION_DROPOUT, "transformer_parameters": params,
        "seconds": round(time.time() - start), "losses_every_100_steps": losses,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": cpu_name()}, indent=1))
    _log(f"saved to {out} in {time.time() - start:.0f}s")
    return out


# The shipped recipe, one source: the command line's defaults are build()'s.
SHIPPED = {name: param.default for name, param in inspect.signature(build).parameters.items()
           if param.default is not param.empty}


def shown(path: Path) -> str:
    """A path as build_info.json records it: relative to the project where it is inside (no
    builder's home directory in a shipped file)."""
    root = WORLD.parents[1]
    path = Path(path).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def cpu_name() -> str:
    """The CPU's model name (for build_info.json: build times depend on it)."""
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in
             (info.read_text().splitlines() if info.exists() else [])
             if line.startswith("model name")]
    return f"{names[0]} x{len(names)}" if names else platform.processor() or platform.machine()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/tinydit"))
    parser.add_argument("--world", type=Path, default=SHIPPED["world"],
                        help="the UNet base to reuse")
    parser.add_argument("--images", dest="n_images", metavar="N", type=int,
                        default=SHIPPED["n_images"])
    for name in ("steps", "batch", "width", "layers", "heads", "seed"):
        parser.add_argument(f"--{name}", type=int, default=SHIPPED[name])
    parser.add_argument("--lr", type=float, default=SHIPPED["lr"])
    parser.add_argument("--save-every", type=int, default=SHIPPED["save_every"],
                        help="also save the base every N steps to <out>/step-N")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (the result depends on it in the last bits)")
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    try:
        build(**args)
    except CnexpError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
