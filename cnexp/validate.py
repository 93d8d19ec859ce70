"""Range checks the type system cannot express; each names the override that fixes it."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

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
         f"is {cfg.data.resolution}; use a positive multiple of 8 (the VAE's downsampling), "
         f"e.g. {max(8, cfg.data.resolution // 8 * 8)}"),
        (cfg.data.batch_size > 0, "data.batch_size", f"is {cfg.data.batch_size}; must be > 0"),
        (cfg.trainer.max_steps > 0 or cfg.trainer.fast_dev_run, "trainer.max_steps",
         f"is {cfg.trainer.max_steps}; must be > 0"),
        (not (cfg.data.crop == "random" and cfg.cache.latents), "cache.latents",
         "is true with data.crop=random: cached latents would not match the random crops; "
         "set cache.latents=false or data.crop=center"),
        (cfg.sampling.steps > 0, "sampling.steps", f"is {cfg.sampling.steps}; must be > 0"),
        (cfg.cache.store in ("disk", "memory"), "cache.store",
         f"is {cfg.cache.store!r}; use disk (memory-mapped shards, reused) or memory"),
        (cfg.cache.fill_batch > 0, "cache.fill_batch",
         f"is {cfg.cache.fill_batch}; images per encoder call while filling, must be > 0"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{key} {why} (override it: python run.py {key}=...)")
    output_dir = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False)
    if output_dir is not None:
        check_writable(output_dir, "paths.output_dir")
    from cnexp.control import check_control  # the control knobs' choices and combinations
    from cnexp.precision import resolve_frozen_dtype

    check_control(cfg.control)
    resolve_frozen_dtype(cfg.trainer)  # an unknown dtype, or half without mixed precision


def check_writable(path: str | Path, key: str) -> None:
    """`path` is, or can be made, a writable directory; decided without creating anything."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists():  # the nearest existing ancestor decides (exists() is False
        probe = probe.parent   # below a file too)
    if not probe.is_dir():
        why = f"{probe} is a file, not a directory"
    elif not os.access(probe, os.W_OK | os.X_OK):
        why = f"{probe} is not writable"
    else:
        return
    raise ConfigError(f"{key}='{path}' cannot be created: {why}; choose a writable directory "
                      f"(python run.py {key}=/path/to/dir)")


class OutputDirCheck(Callback):
    """Hydra creates the run (sweep) directory before run.py's main starts, failing with a
    traceback: check it first and exit like run.py does for every user error (code 2)."""

    def _check(self, config: DictConfig, key: str) -> None:
        path = OmegaConf.select(config, key, throw_on_resolution_failure=False)
        try:
            if path is not None:
                check_writable(str(path), key)
        except ConfigError as err:
            print(err, file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
