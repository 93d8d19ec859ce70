"""The job this process runs: its rank, whether it is one job of a multirun, the CPU threads
it may use, the machine it ran on, and what the SLURM launcher decides for it.

Under the SLURM launcher (hydra/launcher=slurm) the job's resources drive the run, so the two
cannot disagree (docs/slurm.md, "The SLURM preset"):
- `hydra.launcher.gpus_per_node` > 0: trainer.accelerator=gpu and trainer.devices=gpus_per_node,
  one rank per GPU (tasks_per_node follows gpus_per_node); 0: a CPU job.
- `hydra.launcher.nodes` is trainer.num_nodes.
- every job runs as ckpt_path=auto: requeued after its time limit (or pre-empted), it resumes
  from its last.ckpt; started again in the same sweep directory, a finished job is left alone.
A setting that contradicts what the job holds (trainer=cpu on GPUs, trainer=gpu without one,
trainer.devices other than the GPUs, tasks other than ranks) stops the job before anything
heavy, with one message naming both settings.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnexp.errors import CnexpError

log = logging.getLogger("cnexp")


def _hydra() -> Optional[DictConfig]:
    return HydraConfig.get() if HydraConfig.initialized() else None


def in_multirun() -> bool:
    hydra = _hydra()
    return hydra is not None and hydra.mode == RunMode.MULTIRUN


def is_rank_zero() -> bool:
    """False in the other processes of a DDP job (Lightning's or SLURM's rank variables)."""
    return all(int(os.environ.get(var, 0)) == 0 for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def machine_info() -> dict[str, Any]:
    """What a job ran on, for the budget line of a report."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpus": cores, "torch_threads": torch.get_num_threads(), "gpu": gpu}


def set_threads(n: int) -> None:
    """torch.set_num_threads(n) only where it changes the count: on this project's CPU build
    (torch 2.14.1) any call, even with the count already in force, leaves attention
    (scaled_dot_product_attention) running at about one thread's speed (docs/performance.md)."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def split_threads() -> Optional[int]:
    """Give each of a parallel launcher's jobs cores // n_jobs torch threads (joblib: n_jobs)."""
    hydra = _hydra()
    n_jobs = OmegaConf.select(hydra, "launcher.n_jobs") if hydra is not None else None
    if not in_multirun() or not n_jobs:
        return None
    cores = machine_info()["cpus"]
    if n_jobs < 0:  # joblib: -1 = one job per core, -2 = all but one, ...
        n_jobs = max(1, cores + 1 + n_jobs)
    threads = max(1, cores // n_jobs)
    set_threads(threads)
    log.info("parallel sweep: %d jobs on %d cores -> %d torch thread(s) per job",
             n_jobs, cores, threads)
    return threads


GPU_NAMES = ("gpu", "cuda")


class SlurmSettingsError(CnexpError):
    pass


def slurm_launcher() -> Optional[DictConfig]:
    """hydra.launcher when this job was launched by submitit's SLURM launcher, else None."""
    if not in_multirun():
        return None
    launcher = OmegaConf.select(_hydra(), "launcher")
    target = str(OmegaConf.select(launcher, "_target_", default="")) if launcher else ""
    return launcher if target.endswith("SlurmLauncher") else None


def _given(keys: tuple[str, ...]) -> dict[str, str]:
    """The job's command-line overrides of `keys` (group or knob) -> the value given."""
    given = {}
    for override in _hydra().overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if key in keys:
            given[key] = value
    return given


def apply_slurm_resources(cfg: DictConfig) -> None:
    """Set cfg.trainer's device, devices and nodes from the SLURM job's resources (in place);
    nothing outside the SLURM launcher."""
    launcher = slurm_launcher()
    if launcher is None:
        return
    gpus, tasks = int(launcher.gpus_per_node or 0), int(launcher.tasks_per_node or 1)
    nodes = int(launcher.nodes or 1)
    trainer = cfg.trainer
    given = _given(("trainer", "trainer.accelerator", "trainer.devices", "trainer.num_nodes"))
    said = ", ".join(f"{k}={v}" for k, v in given.items()) or "the trainer preset"
    accelerator = str(trainer.accelerator)
    if gpus > 0:
        if accelerator not in ("auto", *GPU_NAMES):
            if "trainer" in given or "trainer.accelerator" in given:
                raise SlurmSettingsError(
                    f"the SLURM job holds {gpus} GPU(s) per node (hydra.launcher.gpus_per_node="
                    f"{gpus}) but {said} trains on the {accelerator}: leave the trainer out (the "
                    "GPUs choose it), or ask for a CPU job with hydra.launcher.gpus_per_node=0")
        devices = trainer.devices
        if "trainer.devices" in given and str(devices) != str(gpus):
            raise SlurmSettingsError(
                f"trainer.devices={devices} but the SLURM job holds {gpus} GPU(s) per node "
                f"(hydra.launcher.gpus_per_node={gpus}): leave trainer.devices out (it follows "
                "the GPUs) or set hydra.launcher.gpus_per_node to the GPUs you want")
        trainer.accelerator, trainer.devices = "gpu", gpus
    else:
        if accelerator in GPU_NAMES:
            raise SlurmSettingsError(
                f"{said} trains on a GPU but the SLURM job holds none (hydra.launcher."
                "gpus_per_node=0): set hydra.launcher.gpus_per_node=N, or trainer=cpu")
        if accelerator == "auto":
            trainer.accelerator = "cpu"  # unallocated GPUs on the node are not this job's
    if isinstance(trainer.devices, int) and trainer.devices != tasks:
        raise SlurmSettingsError(
            f"trainer.devices={trainer.devices} but hydra.launcher.tasks_per_node={tasks}: SLURM "
            "starts one process per task and Lightning runs one rank per process, so they must "
            f"be equal: set hydra.launcher.tasks_per_node={trainer.devices} (with GPUs, leave it "
            "out: it follows gpus_per_node)")
    if "trainer.num_nodes" in given and int(trainer.num_nodes) != nodes:
        raise SlurmSettingsError(
            f"trainer.num_nodes={trainer.num_nodes} but hydra.launcher.nodes={nodes}: leave "
            "trainer.num_nodes out (it follows the launcher's nodes)")
    trainer.num_nodes = nodes
