"""How many data-loader processes `auto` means (data.num_workers, cache.fill_workers).

A CPU run keeps today's 0: its training process already uses every core, and the default run's
random draws (caption picks, crops) stay in the main process, so its numbers do not move. A GPU
run gets the CPUs its job was given (SLURM_CPUS_PER_TASK, else the process's CPU affinity),
shared among the processes training on this node, less one for each training process itself.
"""
from __future__ import annotations

import os

MAX_AUTO_WORKERS = 8  # per process: past this, workers only cost memory (docs/data.md)


def available_cpus() -> int:
    """CPUs this job may use: SLURM's grant per task where set, else this process's affinity."""
    granted = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if granted.isdigit() and int(granted) > 0:
        return int(granted)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(setting: int | str, gpu: bool, processes: int = 1) -> int:
    """data.num_workers / cache.fill_workers as a number: `auto` -> 0 on a CPU, else the CPUs
    of this job over `processes` (training processes sharing them), one left for each."""
    if str(setting) != "auto":
        return int(setting)
    if not gpu:
        return 0
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit()
    share = available_cpus() if per_task else available_cpus() // max(1, processes)
    return max(1, min(MAX_AUTO_WORKERS, share - 1))


def valid_setting(value) -> bool:
    return str(value) == "auto" or str(value).isdigit()


WHY = "must be auto (GPU: from the job's CPUs; CPU: 0) or a number of processes >= 0"
