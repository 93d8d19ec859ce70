"""The bare loop: cnexp's training step with nothing around it, the limit a cnexp run is held to
(`python -m cnexp.bench --family`, families.py).

    python -m cnexp.bench.child cnexp/bench/bare.py base=tiny_sdxl data.root=... trainer.max_steps=N

It takes run.py's overrides, builds the same base, branch and control network with cnexp's own
objects (cnexp.families, cnexp.control), and trains them with a plain PyTorch loop: no Lightning,
no callbacks, no logger, no data loader. Every training image's VAE moments, every distinct
caption's text embedding and every condition image are computed once before the first step and
held in memory (a cnexp run reads them from its encoder cache and decodes the condition PNGs in
its loader), so the step is the family's draw + noise + controlled prediction + loss, backward,
gradient clipping and AdamW, as cnexp's ControlNetModule.diffusion_loss draws them (the same
generator per step, the same order). The loss is read back to the host every
trainer.log_every_n_steps steps, as cnexp records it, and printed at the end (BARE_LOSS).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

LOSS_MARK = "BARE_LOSS"
ENCODE_BATCH = 64  # images or captions per frozen-encoder call while preloading


def compose_run(overrides: list[str]) -> DictConfig:
    """The config `python run.py <overrides>` would train with."""
    from cnexp.config import register_configs
    from cnexp.launch.plan import compose

    register_configs()
    cfg, refusals = compose(overrides)
    if refusals:
        sys.exit("\n".join(refusals))
    return cfg


@dataclass
class Parts:
    """What the loop trains: the frozen base, its family, the branch and its network."""
    base: object
    family: object
    branch: object
    control: torch.nn.Module
    device: torch.device


def build_parts(cfg: DictConfig) -> Parts:
    """The base, branch and control network as cnexp.train.build_model makes them (without
    the LightningModule)."""
    from cnexp.base import load_base
    from cnexp.control import build_controlnet
    from cnexp.device import resolve_device
    from cnexp.families.family import get_family
    from cnexp.precision import resolve_frozen_dtype, store_frozen
    from cnexp.train import apply_speed_options

    base = load_base(cfg.base)
    family = get_family(base.family)
    branch = family.branch(cfg.control.branch)
    denoiser = family.denoiser(base)
    control = build_controlnet(denoiser, cfg.control, branch)
    apply_speed_options(cfg.trainer, base, control)
    store_frozen((*family.frozen(base), control), resolve_frozen_dtype(cfg.trainer),
                 copies=branch.copied_from_base(control, denoiser))
    branch.bind(control, base.unet)
    device = torch.device("cuda" if resolve_device(cfg.trainer).on_gpu else "cpu")
    for model in (*family.frozen(base), control):
        model.to(device)
    return Parts(base, family, branch, control.train(), device)


@torch.no_grad()
def preload(cfg: DictConfig, parts: Parts) -> dict:
    """Every training sample's VAE moments (N, 2C, h, w), condition (N, 3, H, W), the row of
    its caption in `text` (U, T', D): each distinct caption encoded once; `empty`: "" (1, T', D).
    Where cnexp caches the conditions' latents (cache.conditions on SD3, Flux), their moments
    and the black image's control input too, so the loop's step does what cnexp's does."""
    from cnexp.data.dataset import TriplesDataset
    from cnexp.data.layout import open_sources

    source = open_sources(cfg.data, cfg.data.cache_dir)["train"]
    dataset = TriplesDataset(source, cfg.data.resolution, train=False)
    items = [dataset[i] for i in range(min(len(dataset), cfg.data.train_size))]
    family, base, device = parts.family, parts.base, parts.device
    images = torch.stack([item["image"] for item in items])  # (N, 3, H, W) in [-1, 1]
    moments = torch.cat([family.latent_moments(base, chunk.to(device)).float()
                         for chunk in images.split(ENCODE_BATCH)])
    captions = sorted({item["caption"] for item in items})
    row = {caption: i for i, caption in enumerate(captions)}
    text = torch.cat([family.encode_text(base, captions[i:i + ENCODE_BATCH], device)
                      for i in range(0, len(captions), ENCODE_BATCH)])
    conditions = torch.stack([item["condition"] for item in items]).to(device)
    data = {"moments": moments, "text": text,
            "rows": torch.tensor([row[item["caption"]] for item in items], device=device),
            "conditions": conditions, "empty": family.encode_text(base, [""], device)}
    if family.control_reads_latents and cfg.cache.conditions:
        data["condition_moments"] = torch.cat([family.latent_moments(base, chunk * 2 - 1)
                                               for chunk in conditions.split(ENCODE_BATCH)])
        data["black"] = family.control_input(base, torch.zeros_like(conditions[:1]))
    return data


def draw_on(device: torch.device):
    """ControlNetModule.draw for one process: `sampler(*args, shape, generator=...)`."""
    def draw(sampler, shape, generator, **kwargs):
        return sampler(*kwargs.pop("args", ()), tuple(shape), generator=generator, device=device,
                       **kwargs)
    return draw


def step_loss(cfg: DictConfig, parts: Parts, data: dict, rows: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """The diffusion loss on the samples `rows` (B,), drawn as cnexp draws it."""
    family, base, draw = parts.family, parts.base, draw_on(parts.device)
    mean, std = data["moments"][rows].chunk(2, dim=1)  # (B, C, h, w) each
    latents = family.scale_latents(base, mean + std * draw(torch.randn, mean.shape, generator))
    keep = draw(torch.rand, (len(rows),), generator) >= cfg.optim.prompt_dropout  # (B,)
    text = torch.where(keep.view(-1, 1, 1), data["text"][data["rows"][rows]], data["empty"])
    noise = draw(torch.randn, latents.shape, generator)
    t = family.timesteps(base, draw, len(rows), generator)  # (B,)
    noisy = family.noised(base, latents, noise, t)
    pred = parts.branch.predict(family.denoiser(base), parts.control, noisy, t,
                                family.conditioning(base, text, noisy),
                                control_of(cfg, parts, data, rows, generator), 1.0)
    pred = family.loss_prediction(base, pred, noisy, t)  # as the target reads it (SD3)
    return F.mse_loss(pred.float(), family.target(base, latents, noise, t).float())


def control_of(cfg: DictConfig, parts: Parts, data: dict, rows: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """What the control network reads for the samples `rows`, condition dropout drawn as cnexp
    draws it (ControlNetModule.training_control)."""
    family, base, draw = parts.family, parts.base, draw_on(parts.device)
    dropout = cfg.optim.condition_dropout
    kept = draw(torch.rand, (len(rows),), generator) >= dropout if dropout else None
    if "condition_moments" not in data:
        condition = data["conditions"][rows]
        if kept is not None:
            condition = condition * kept.to(condition.dtype).view(-1, 1, 1, 1)
        return family.control_input(base, condition)
    control = family.control_from_moments(base, data["condition_moments"][rows])
    if kept is None:
        return control
    return torch.where(kept.view(-1, *[1] * (control.dim() - 1)), control,
                       data["black"].to(control.dtype))


def optimizer_for(cfg: DictConfig, parts: Parts) -> torch.optim.Optimizer:
    """AdamW over what trains, as ControlNetModule.configure_optimizers sets it."""
    lr = cfg.optim.lr * cfg.optim.lr_factor
    groups = [{"params": [p for p in parts.control.parameters() if p.requires_grad], "lr": lr}]
    decoder = [p for p in parts.base.unet.parameters() if p.requires_grad]
    if decoder:  # control.sd_locked=false
        rate = cfg.optim.decoder_lr if cfg.optim.decoder_lr is not None else lr * 0.2
        groups.append({"params": decoder, "lr": rate})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.optim.weight_decay,
                             betas=tuple(cfg.optim.betas), fused=cfg.optim.fused or None)


def batch_order(n: int, batch: int, seed: int):
    """The batches of sample positions a cnexp run trains on, epoch after epoch (its loader's
    sampler: shuffled by (seed, epoch), the last partial batch dropped)."""
    from cnexp.data.resumable import ResumableShuffleSampler

    sampler = ResumableShuffleSampler(n, min(batch, n), seed)
    while True:
        order = list(sampler)
        yield from (order[i:i + sampler.batch_size]
                    for i in range(0, len(order), sampler.batch_size))


def train(cfg: DictConfig, parts: Parts, data: dict, steps: int) -> list[float]:
    """`steps` optimizer steps over shuffled epochs of full batches; the losses read back every
    trainer.log_every_n_steps steps."""
    optimizer = optimizer_for(cfg, parts)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    batches, logged = batch_order(len(data["moments"]), cfg.data.batch_size, cfg.seed), []
    for step in range(steps):
        rows = torch.tensor(next(batches), device=parts.device)  # (B,)
        generator = torch.Generator(parts.device).manual_seed(cfg.seed * 1_000_003 + step)
        loss = step_loss(cfg, parts, data, rows, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.trainer.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
        if (step + 1) % cfg.trainer.log_every_n_steps == 0 or step + 1 == steps:
            logged.append(round(loss.item(), 6))
    return logged


def main(argv: list[str] | None = None) -> None:
    cfg = compose_run(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg.seed)
    parts = build_parts(cfg)
    data = preload(cfg, parts)
    losses = train(cfg, parts, data, cfg.trainer.max_steps)
    print(f"{LOSS_MARK} {json.dumps(losses)}", flush=True)


if __name__ == "__main__":
    main()
