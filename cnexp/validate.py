"""Checks of a composed config that its types cannot express, each naming the override that
fixes it: keys the schema lacks (cnexp/schema.py), the ranges declared beside the fields
(cnexp/knobs.py), then combinations of knobs. The run (cnexp/train.py) and `cnexp.plan` call the
same functions here, so the plan refuses, warns about and records what the run would: `validate`,
`config_warnings`, and `fit_to_splits` once the data's split sizes are known."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cnexp.config import TrainConfig
from cnexp.errors import ConfigError
from cnexp.schema import unknown_knobs

log = logging.getLogger("cnexp")


def validate(cfg: DictConfig, warn: bool = True) -> None:
    """Raise a ConfigError for the first thing that cannot run; `warn`: log what runs but not as
    asked (`config_warnings`; cnexp.plan prints them itself)."""
    unknown = unknown_knobs(cfg)  # a +-added key would otherwise be carried along unread
    if unknown:
        raise ConfigError("\n".join(unknown))
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
    from cnexp.families.family import get_family  # heavy (diffusers): only when a run starts
    from cnexp.precision import resolve_frozen_dtype

    family = get_family(OmegaConf.select(cfg, "base.family"))
    family.check(cfg.control)
    if cfg.data.crop == "random" and cfg.cache.conditions and family.control_reads_latents:
        fail("cache.conditions", f"is true with data.crop=random: base.family={family.name} "
             "caches the conditions' latents, which would not match the random crops; set "
             "cache.conditions=false or data.crop=center")
    family.branch(cfg.control.branch).check(cfg.control)
    resolve_frozen_dtype(cfg.trainer)  # an unknown dtype, or half without mixed precision
    from cnexp.run.context import is_rank_zero

    for warning in config_warnings(cfg) if warn and is_rank_zero() else []:
        log.warning("%s", warning)


def config_warnings(cfg: DictConfig) -> list[str]:
    """What runs, but slower or otherwise than one would expect: more CPU training processes
    than this machine has cores (they share them; results are the same, only slower)."""
    from cnexp.data.workers import available_cpus  # SLURM's share, else the CPU affinity
    from cnexp.device import resolve_device

    device, cores = resolve_device(cfg.trainer), available_cpus()
    processes = device.devices if isinstance(device.devices, int) else 1
    tasks = os.environ.get("SLURM_NTASKS", "1")  # SLURM's ranks: each task has its own CPUs
    if device.on_gpu or processes <= cores or (tasks.isdigit() and int(tasks) > 1):
        return []
    return [f"trainer.devices={processes} starts {processes} CPU training processes on this "
            f"machine's {cores} core(s): they share the cores, so each step takes longer than "
            f"with trainer.devices={cores} (the results are the same); set trainer.devices={cores} "
            "or fewer (trainer=ddp_cpu: 2), or train on GPUs (trainer=gpu)"]


# data.<knob> -> the split it draws from, how to give that split more samples, what a run does
SPLIT_OF = {"batch_size": ("train", "data.train_size for the tiny world", "batch is {}"),
            "eval_size": ("val", "data.val_fraction, or data.val_size for the tiny world",
                          "evaluation set has {} image(s)")}
SPLIT_NAMES = {"train": "training", "val": "validation"}


def fit_to_splits(data_cfg: Any, sizes: dict[str, int]) -> list[str]:
    """Lower data.batch_size and data.eval_size to the samples of their split (`sizes`: split ->
    count) where they ask for more, in `data_cfg` itself, so that config.yaml records what ran;
    a warning for each. A small data set still trains and evaluates (tests/test_silent_data.py);
    the data module's setup (the run) and cnexp.plan both fit with this function."""
    warnings = []
    for knob, (split, more, does) in SPLIT_OF.items():
        asked, available = getattr(data_cfg, knob), sizes[split]
        if asked <= available:
            continue
        setattr(data_cfg, knob, available)
        warnings.append(f"data.{knob}={asked} but the {SPLIT_NAMES[split]} split holds "
                        f"{available}: set data.{knob}={available}, or give the split more "
                        f"samples ({more}). This run's {does.format(available)} (config.yaml "
                        f"records data.{knob}={available})")
    return warnings


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
