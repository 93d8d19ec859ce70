"""Range checks the type system cannot express; each names the override that fixes it."""
from __future__ import annotations

from omegaconf import DictConfig

from cnexp.errors import CnexpError


class ConfigError(CnexpError):
    pass


def validate(cfg: DictConfig) -> None:
    checks = [
        (0.0 <= cfg.optim.prompt_dropout <= 1.0, "optim.prompt_dropout",
         f"is {cfg.optim.prompt_dropout}; it is a probability, use a value in [0, 1]"),
        (cfg.optim.lr > 0, "optim.lr", f"is {cfg.optim.lr}; the learning rate must be > 0"),
        (0.0 <= cfg.optim.condition_dropout <= 1.0, "optim.condition_dropout",
         f"is {cfg.optim.condition_dropout}; it is a probability, use a value in [0, 1]"),
        (cfg.optim.decoder_lr > 0, "optim.decoder_lr",
         f"is {cfg.optim.decoder_lr}; the learning rate must be > 0"),
        (cfg.data.resolution > 0 and cfg.data.resolution % 8 == 0, "data.resolution",
         f"is {cfg.data.resolution}; use a positive multiple of 8 (the VAE's downsampling)"),
        (cfg.data.batch_size > 0, "data.batch_size", f"is {cfg.data.batch_size}; must be > 0"),
        (cfg.trainer.max_steps > 0 or cfg.trainer.fast_dev_run, "trainer.max_steps",
         f"is {cfg.trainer.max_steps}; must be > 0"),
        (not (cfg.data.crop == "random" and cfg.cache.latents), "cache.latents",
         "is true with data.crop=random: cached latents would not match the random crops; "
         "set cache.latents=false or data.crop=center"),
        (cfg.sampling.steps > 0, "sampling.steps", f"is {cfg.sampling.steps}; must be > 0"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{key} {why} (override it: python run.py {key}=...)")
    from cnexp.control import check_control  # the control knobs' choices and combinations

    check_control(cfg.control)
