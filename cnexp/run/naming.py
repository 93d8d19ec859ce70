"""What a job is called: its directory in a multirun, its W&B group, name and tags (the knobs
that differ from baseline). The resolvers below are registered on import."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from cnexp.overrides import job_stem, knob_diff, knobs_suffix, swept_keys
from cnexp.run.context import _hydra, in_multirun

log = logging.getLogger("cnexp")

WANDB_TAG_MAX = 64  # W&B rejects longer tags


def _is_ablation_override(override: str) -> bool:
    return override.lstrip("+~").split("=", 1)[0] == "ablation"


def baseline_diff(cfg: DictConfig) -> dict[str, Any]:
    """This job's knobs that differ from baseline with the same other overrides (and seed).

    Composes the baseline through the running Hydra app; outside one (tests, notebooks) or if
    composing fails, returns {} rather than stopping a training run over a tag."""
    hydra = _hydra()
    if hydra is None:
        return {}
    try:
        from hydra import compose

        overrides = [o for o in hydra.overrides.task if not _is_ablation_override(o)]
        baseline = compose(config_name=hydra.job.config_name, overrides=overrides)
        return knob_diff(OmegaConf.to_container(cfg, resolve=False),
                         OmegaConf.to_container(baseline, resolve=False))
    except Exception as err:  # noqa: BLE001 - tags are cosmetic; training must go on
        log.debug("could not compose the baseline for W&B tags: %s", err)
        return {}


def sweep_name() -> Optional[str]:
    """A multirun's name for W&B grouping: its sweep directory below multirun/ (date_time)."""
    if not in_multirun():
        return None
    parts = Path(str(_hydra().sweep.dir)).parts
    return "_".join(parts[-2:]) if len(parts) >= 2 else parts[-1]


def job_name(ablation: str, seed: int) -> str:
    """The job's directory (after its number) and W&B name; in a single run <ablation>-s<seed>
    (its directory is timestamped, its knobs are W&B tags)."""
    name = job_stem(ablation, seed)
    if not in_multirun():
        return name
    hydra = _hydra()
    return name + knobs_suffix(list(hydra.overrides.task), swept_keys(str(hydra.sweep.dir)))


# conf/hydra/default.yaml's job directory. Registered on import: a launcher's worker process
# imports this module (it unpickles SweepSummary) before it resolves the job's directory.
OmegaConf.register_new_resolver("cnexp_job_name", job_name, replace=True)
# conf/hydra/launcher/slurm.yaml's tasks_per_node: one rank per GPU, one task on a CPU node
OmegaConf.register_new_resolver("cnexp_tasks_per_node", lambda gpus: max(1, int(gpus or 0)),
                                replace=True)


def wandb_identity(cfg: DictConfig, job_type: str = "train") -> dict[str, Any]:
    """W&B init arguments: group = logger.group, else the sweep, else the ablation;
    name = job_name (<ablation>-s<seed>[_swept knobs]); one tag per knob that differs from
    baseline."""
    tags = [f"ablation:{cfg.ablation}", f"seed:{cfg.seed}"]
    tags += [f"{key}={value}" for key, value in baseline_diff(cfg).items()]
    return {"group": cfg.logger.group or sweep_name() or cfg.ablation,
            "name": cfg.logger.name or job_name(cfg.ablation, cfg.seed),
            "tags": [tag[:WANDB_TAG_MAX] for tag in tags], "job_type": job_type}
