"""Time a run's training step and its sampler's denoising step on this machine, from random
data at the run's shapes, without data, caches or a Trainer (cnexp/launch/plan.py's --time-steps)."""
from __future__ import annotations

import time

import torch
from omegaconf import DictConfig


def time_steps(cfg: DictConfig, n: int, world: int = 1) -> tuple[float, float]:
    """(seconds per training step, seconds per image per sampling step) on this machine, from
    `n` steps of random data at the run's shapes (the batch of one of `world` devices) after one
    warm-up (trainer.compile's compile time falls in it). The encoders run each step (no cache),
    so the step time is an upper bound for a cached run."""
    from cnexp.device import resolve_device
    from cnexp.precision import resolve_frozen_dtype
    from cnexp.train import build_model

    device = resolve_device(cfg.trainer)
    where = torch.device("cuda" if device.on_gpu else "cpu")
    module = build_model(cfg, resolve_frozen_dtype(cfg.trainer)).module.to(where)  # as a run
    module.train()
    optimizer = module.configure_optimizers()
    b, r = max(1, cfg.data.batch_size // world), cfg.data.resolution
    gen = torch.Generator().manual_seed(0)
    batch = {"image": (torch.rand(b, 3, r, r, generator=gen) * 2 - 1).to(where),
             "condition": torch.rand(b, 3, r, r, generator=gen).to(where),
             "caption": ["a photo"] * b}
    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(device.precision)
    autocast = torch.autocast(where.type, dtype=half, enabled=half is not None)

    def sync():
        if where.type == "cuda":
            torch.cuda.synchronize()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = module.diffusion_loss(batch, torch.Generator(where).manual_seed(0))
        loss.backward()
        optimizer.step()

    step()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    per_step = (time.perf_counter() - start) / n
    with torch.no_grad(), autocast:  # one denoising step of the controlled UNet, per image
        latents = module.encode_images(batch["image"], torch.Generator(where).manual_seed(0))
        text = module.encode_prompts(batch["caption"])
        t = torch.full((b,), 500, device=where, dtype=torch.long)
        module.controlled_prediction(latents, t, text, batch["condition"])
        sync()
        start = time.perf_counter()
        for _ in range(n):
            module.controlled_prediction(latents, t, text, batch["condition"])
        sync()
    return per_step, (time.perf_counter() - start) / n / b
