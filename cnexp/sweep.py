"""The job side of a sweep: each job's outcome on disk, CPU threads shared among parallel jobs,
W&B names and tags, and a summary of failed jobs when a multirun ends.

A job directory ends with `status.json` (cnexp.record.STATUSES: running, ok, failed, preempted,
interrupted) and, for a failed job, `error.txt` (the traceback). `cnexp.analysis.compare` reads both.
An attempt that goes on after a failure (a resume) moves that error.txt to
`history/error-<time it was written>.txt`, so error.txt only ever sits beside status failed;
compare and evaluate read neither history/ nor its files.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnexp.overrides import job_stem, knob_diff, knobs_suffix, swept_keys
from cnexp.record import ERROR_FILE, STATUS_FILE, STATUSES, finished_run, read_status
from cnexp.fileio import write_small

log = logging.getLogger("cnexp")

WANDB_TAG_MAX = 64  # W&B rejects longer tags
HISTORY_DIR = "history"  # earlier attempts' error.txt (archive_error)


def _hydra() -> Optional[DictConfig]:
    return HydraConfig.get() if HydraConfig.initialized() else None


def in_multirun() -> bool:
    hydra = _hydra()
    return hydra is not None and hydra.mode == RunMode.MULTIRUN


def is_rank_zero() -> bool:
    """False in the other processes of a DDP job (Lightning's or SLURM's rank variables)."""
    return all(int(os.environ.get(var, 0)) == 0 for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def write_status(out_dir: Path, status: str, **fields: Any) -> None:
    assert status in STATUSES, status
    if not is_rank_zero():
        return
    if status != "failed":  # a new attempt: an earlier one's traceback is history, not its state
        archive_error(Path(out_dir))
    record = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "epoch": round(time.time(), 1), "host": socket.gethostname(), "pid": os.getpid(),
              **fields}
    # a reader never sees half a file; on a full disk it is rewritten in its own blocks
    why = write_small(Path(out_dir) / STATUS_FILE, json.dumps(record, indent=1) + "\n")
    if why:  # bookkeeping must not turn a finished run into a failed one
        log.warning("could not write %s: %s", Path(out_dir) / STATUS_FILE, why)


def archive_error(out_dir: Path) -> Optional[Path]:
    """Move an earlier attempt's error.txt to history/error-<time it was written>.txt; returns
    where it went (None: there was none, or it could not be moved, which is said)."""
    error = out_dir / ERROR_FILE
    try:
        written = time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(error.stat().st_mtime))
    except FileNotFoundError:
        return None
    target = out_dir / HISTORY_DIR / f"error-{written}.txt"
    count = 1
    while target.exists():  # two failures in one second
        count += 1
        target = target.with_name(f"error-{written}-{count}.txt")
    try:
        target.parent.mkdir(exist_ok=True)
        os.replace(error, target)
    except OSError as err:  # e.g. a full disk: the new status still gets written
        log.warning("could not move %s to %s: %s", error, target, err)
        return None
    return target


def keep_finished_status(out_dir: Path) -> Optional[str]:
    """status.json's text when `out_dir` holds a finished run (status ok, readable metrics.json),
    for `restore_status` to put back when this start is refused before it changed anything."""
    if not is_rank_zero() or not finished_run(out_dir):
        return None
    try:
        return (Path(out_dir) / STATUS_FILE).read_text()
    except OSError:
        return None


def restore_status(out_dir: Path, text: str) -> None:
    """Put a finished run's status.json back byte for byte (see keep_finished_status)."""
    why = write_small(Path(out_dir) / STATUS_FILE, text)
    if why:
        log.warning("could not restore %s: %s", Path(out_dir) / STATUS_FILE, why)


def machine_info() -> dict[str, Any]:
    """What a job ran on, for the budget line of a report."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpus": cores, "torch_threads": torch.get_num_threads(), "gpu": gpu}


def record_failure(out_dir: Path, err: BaseException, keep: Optional[str] = None) -> None:
    """error.txt (traceback) + status.json; closes a W&B run the job left open so the next job
    of the same process does not log into it. keep: a finished run's status.json text
    (keep_finished_status) that a start refused before it changed anything puts back instead:
    that run stays finished, and the log has the refusal."""
    if keep is not None:
        restore_status(out_dir, keep)
    elif is_rank_zero():
        why = write_small(out_dir / ERROR_FILE, "".join(traceback.format_exception(err)))
        if why:  # e.g. the disk is full: the log (stderr) still has the error
            log.warning("could not write %s: %s", out_dir / ERROR_FILE, why)
        write_status(out_dir, "failed", error_type=type(err).__name__,
                     error=str(err) or type(err).__name__)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1)


def split_threads() -> Optional[int]:
    """Give each of a parallel launcher's jobs cores // n_jobs torch threads (joblib: n_jobs)."""
    hydra = _hydra()
    n_jobs = OmegaConf.select(hydra, "launcher.n_jobs") if hydra is not None else None
    if not in_multirun() or not n_jobs:
        return None
    cores = machine_info()["cpus"]
    if n_jobs < 0:  # joblib: -1 = one job per core, -2 = all but one, ...
        n_jobs = max(1, cores + 1 + n_jobs)
    import torch

    threads = max(1, cores // n_jobs)
    torch.set_num_threads(threads)
    log.info("parallel sweep: %d jobs on %d cores -> %d torch thread(s) per job",
             n_jobs, cores, threads)
    return threads


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


class SweepSummary(Callback):
    """At the end of a multirun: say which jobs failed (and where), exit non-zero if any did."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        job_dirs = sorted((p.parent for p in sweep_dir.glob(f"*/{STATUS_FILE}")),
                          key=lambda d: (len(d.name.split("_")[0]), d.name))  # 2_ before 10_
        statuses = {d: read_status(d, strict=False) for d in job_dirs}
        failed = {d: s for d, s in statuses.items() if s and s.get("status") == "failed"}
        stopped = {d: s for d, s in statuses.items()
                   if s and s.get("status") in ("preempted", "interrupted")}
        ok = sum(1 for s in statuses.values() if s and s.get("status") == "ok")
        log.info("sweep finished: %d ok, %d failed, %d stopped of %d jobs in %s", ok,
                 len(failed), len(stopped), len(statuses), sweep_dir)
        for run_dir, status in failed.items():
            log.error("  failed: %s: %s (%s)", run_dir.name, status.get("error", "?"),
                      run_dir / ERROR_FILE)
        for run_dir, status in stopped.items():
            log.warning("  %s at step %s: %s (resume: %s)", status["status"], status.get("step"),
                        run_dir.name, status.get("resume"))
        log.info("compare the runs: python -m cnexp.analysis.compare %s", sweep_dir)
        if failed or stopped:
            sys.exit(1)
