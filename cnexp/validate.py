"""Checks of a composed config that its types cannot express, each naming the override that
fixes it: the ranges declared beside the fields (cnexp/knobs.py), then combinations of knobs."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cnexp.config import TrainConfig
from cnexp.errors import ConfigError




def validate(cfg: DictConfig) -> None:
    for key, value, allowed in ranged_fields(cfg, TrainConfig):
        if value is not None and not allowed.ok(value):
            fail(key, f"is {value}; {allowed.reason(value)}")
    combinations = [
        (cfg.trainer.max_steps > 0 or cfg.trainer.fast_dev_run, "trainer.max_steps",
         f"is {cfg.trainer.max_steps}; must be > 0"),
        (not (cfg.data.crop == "random" and cfg.cache.latents), "cache.latents",
         "is true with data.crop=random: cached latents would not match the random crops; "
         "set cache.latents=false or data.crop=center"),
    ]
    for ok, key, why in combinations:
        if not ok:
            fail(key, why)
    output_dir = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False)
    if output_dir is not None:
        check_writable(output_dir, "paths.output_dir")
    from cnexp.control.branch import get_branch  # heavy (diffusers): only when a run starts
    from cnexp.precision import resolve_frozen_dtype

    get_branch(cfg.control.branch).check(cfg.control)
    resolve_frozen_dtype(cfg.trainer)  # an unknown dtype, or half without mixed precision


def ranged_fields(cfg: Any, schema: type, prefix: str = ""):
    """(key, value, Range) for every field of `schema` that declares a range, at any depth."""
    for f in dataclasses.fields(schema):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(f.default_factory):  # a section: TrainConfig.optim, ...
            yield from ranged_fields(value, f.default_factory, f"{prefix}{f.name}.")
        elif "range" in f.metadata:
            yield f"{prefix}{f.name}", value, f.metadata["range"]


def fail(key: str, why: str) -> None:
    raise ConfigError(f"{key} {why} (override it: python run.py {key}=...)")


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
