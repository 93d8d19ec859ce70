"""Base damage at step 0: how far the controlled model's noise prediction is from the base's
before any training. Zero connectors make it exactly 0; any other init makes it positive. It is
the quantity the paper's zero-convolution argument is about, so every run logs it.
"""
from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from cnexp.precision import frozen_autocast

METRIC = "eval/base_damage_step0"
log = logging.getLogger("cnexp")


@torch.no_grad()
def base_damage(module, batch: dict, max_samples: int = 8, seed: int = 0) -> float:
    """MSE between controlled and base predictions on a fixed batch: fixed latents, noise and
    timesteps spread over the schedule, the batch's own captions (none dropped)."""
    n = min(max_samples, len(batch["caption"]))
    device = module.device
    generator = torch.Generator(device).manual_seed(seed)
    images = batch["image"][:n].to(device)
    condition = batch["condition"][:n].to(device)
    latents = module.encode_images(images, generator)  # (n, C, h, w)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    t = module.family.spread_timesteps(module.base, n, device)
    noisy = module.family.noised(module.base, latents, noise, t)
    text = module.encode_prompts(list(batch["caption"][:n]))
    with frozen_autocast(module):  # a half-precision base meets the fp32 branch
        controlled = module.controlled_prediction(noisy, t, text, condition)
        base = module.family.predict(module.base, noisy, t, text)
    return torch.mean((controlled.float() - base.float()) ** 2).item()


class BaseDamageCallback(L.Callback):
    """Logs `eval/base_damage_step0` when training starts from step 0 (a resumed run, which
    starts later, logged it already)."""

    def __init__(self, batch: dict, max_samples: int = 8):
        self.batch = batch
        self.max_samples = max_samples
        self.value: float | None = None

    def state_dict(self) -> dict:  # a resumed run reports the value its step 0 measured
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state.get("value")

    def on_train_start(self, trainer, module) -> None:
        if trainer.global_step != 0:
            return
        self.value = base_damage(module, self.batch, self.max_samples)
        trainer.callback_metrics[METRIC] = torch.tensor(self.value)
        self.log_value(trainer)

    @rank_zero_only
    def log_value(self, trainer) -> None:
        log.info("base damage at step 0 (MSE of the noise prediction vs the base's): %.6g",
                 self.value)
        for logger in trainer.loggers:
            logger.log_metrics({METRIC: self.value}, step=0)
