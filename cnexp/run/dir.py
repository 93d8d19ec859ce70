"""One run per run directory, and what `ckpt_path` resumes from.

`RunDirGuard` (a Hydra callback, conf/hydra/default.yaml) runs before the job writes anything into
its directory (Hydra has only saved `.hydra/`): it takes an exclusive lock on `<run dir>/run.lock`
for the life of the process and refuses a fresh run in a directory that already holds one, so a second process can never mix
its files with the first's. The kernel drops the lock when its process dies however it dies; the
file keeps the holder's pid and host, so the next run can say whose lock it takes over.
A resume must train what the run trained. Hydra rewrites `.hydra/` at every start, so a fresh run
keeps a copy as `.hydra_at_start/`; a resume with other knobs than those is refused, naming
them (and so is one whose checkpoint's own knobs differ, from any path: cnexp/run/identity.py).
A refused start leaves the holder's directory byte for byte as it was, times included:
what Hydra writes before any callback runs is snapshot earlier and put back
(cnexp/run/snapshot.py).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cnexp.errors import CnexpError
from cnexp.fileio import LockUnsupported, atomic_write, file_lock
from cnexp.fileio import acquire as acquire_lock
from cnexp.run.context import is_rank_zero
from cnexp.run.identity import config_knobs, knob_changes, run_knobs
from cnexp.run.record import (CHECKPOINT_DIR, CONFIG_FILE, HYDRA_AT_START, LAST_CHECKPOINT,
                              LOCK_FILE, METRICS_FILE)
from cnexp.run.resume import wanted_resume
from cnexp.run.snapshot import RunDirSnapshot

log = logging.getLogger("cnexp")

RESUME_HINT = "ckpt_path=last (or ckpt_path=auto: resume if there is a checkpoint)"
RUN_DIR_FIX = ("give the run a directory on a local or lock-capable disk: python run.py "
               "hydra.run.dir=/path (a multirun: hydra.sweep.dir=/path)")


class RunDirError(CnexpError):
    pass


class RunDirLock:
    """filelock's flock on <dir>/run.lock (cnexp.fileio.file_lock, the lock the caches use),
    held until release() or the process ends; the file names its holder."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._lock = None

    def acquire(self) -> "RunDirLock":
        lock = file_lock(self.path)
        try:
            acquire_lock(lock, timeout=0, fix=RUN_DIR_FIX)
        except TimeoutError:
            raise RunDirError(
                f"run directory {self.path.parent} is in use by another run "
                f"({_holder(self.path)}); wait for it to end, or give this run its own directory "
                "(python run.py hydra.run.dir=...)") from None
        except LockUnsupported as err:
            raise RunDirError(str(err)) from None
        previous = _holder(self.path)
        if previous != "unknown process":  # written by a process that never released it
            log.warning("taking over the lock of a run that is gone (%s) in %s", previous,
                        self.path.parent)
        self.path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                         "command": " ".join(sys.argv)}))
        self._lock = lock
        atexit.register(self.release)
        return self

    def __getstate__(self) -> dict:
        # submitit pickles Hydra's callbacks (and so this lock) to requeue a job: a lock is
        # held by a process, never carried to another, so the copy holds nothing
        return {**self.__dict__, "_lock": None}

    def release(self) -> None:
        if self._lock is None:
            return
        self.path.write_text("")  # a clean exit leaves no holder to report
        self._lock.release()
        self._lock = None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        return "unknown process"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}: "
            f"{info.get('command', '')}".rstrip(": "))


def holds_a_run(run_dir: Path) -> Optional[str]:
    """What in `run_dir` shows an earlier run (its record or checkpoints), or None."""
    for name in (METRICS_FILE, f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT}"):
        if (run_dir / name).exists():
            return name
    ckpts = sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt"))
    return str(ckpts[0].relative_to(run_dir)) if ckpts else None


def changed_knobs(run_dir: Path, config: DictConfig) -> dict[str, tuple[Any, Any]]:
    """knob -> (the run's value, this resume's) for every knob a resume may not change; knobs
    the run's config does not have (added to cnexp since) keep their defaults and pass."""
    # the comparison a checkpoint's identity gets (cnexp/run/identity.py), against the config
    # the run kept when it started
    saved = Path(run_dir) / HYDRA_AT_START / CONFIG_FILE
    if not saved.exists():
        return {}
    before = run_knobs(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    return knob_changes(before, config_knobs(config))


def _hydra_dir(run_dir: Path, config: DictConfig) -> Optional[Path]:
    subdir = OmegaConf.select(config, "hydra.output_subdir")
    return Path(run_dir) / subdir if subdir else None


def keep_hydra_files(run_dir: Path, config: DictConfig) -> None:
    """Copy the fresh run's .hydra/*.yaml to .hydra_at_start/ (what it started with)."""
    source = _hydra_dir(run_dir, config)
    if source is None or not source.is_dir():
        return
    for path in source.glob("*.yaml"):
        atomic_write(Path(run_dir) / HYDRA_AT_START / path.name, path.read_bytes())


def restore_hydra_files(run_dir: Path, config: DictConfig) -> None:
    """Undo what Hydra wrote into .hydra/ for a start that was refused."""
    target = _hydra_dir(run_dir, config)
    if target is None:
        return
    for path in (Path(run_dir) / HYDRA_AT_START).glob("*.yaml"):
        atomic_write(target / path.name, path.read_bytes())


class RunDirGuard(Callback):
    """Lock the job's directory before Hydra writes into it; refuse to start a fresh run over
    an earlier one. Exits with code 2 and one message, like run.py for every user error."""

    def __init__(self):
        self.locks: dict[str, RunDirLock] = {}
        self.snapshots: dict[str, RunDirSnapshot] = {}  # taken before Hydra writes .hydra/

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._snapshot(OmegaConf.select(config, "hydra.run.dir"), config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.sweep.dir"))))
        if sweep_dir.is_dir():  # a sweep started again in its directory: its jobs may be refused
            for lock in sweep_dir.rglob(LOCK_FILE):
                self._snapshot(lock.parent, config)

    def _snapshot(self, run_dir: Any, config: DictConfig) -> None:
        run_dir = os.path.abspath(str(run_dir))  # as Hydra's run_job makes runtime.output_dir
        if is_rank_zero() and Path(run_dir).is_dir():
            job = OmegaConf.select(config, "hydra.job.name")
            self.snapshots[run_dir] = RunDirSnapshot(
                Path(run_dir), OmegaConf.select(config, "hydra.output_subdir"),
                f"{job}.log" if job else None, LOCK_FILE)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_rank_zero():  # DDP's other processes run in rank zero's directory
            return
        run_dir = Path(str(config.hydra.runtime.output_dir))
        try:
            self.locks[str(run_dir)] = RunDirLock(run_dir).acquire()
            earlier = holds_a_run(run_dir)
            if earlier and wanted_resume(OmegaConf.select(config, "ckpt_path")) is None:
                raise RunDirError(
                    f"run directory {run_dir} already holds a run ({earlier}): resume it with "
                    f"{RESUME_HINT}, or start this run in a new directory (leave hydra.run.dir "
                    "out, or python run.py hydra.run.dir=...)")
            if not earlier:
                keep_hydra_files(run_dir, config)
            changed = changed_knobs(run_dir, config) if earlier else {}
            if changed:
                listed = ", ".join(f"{k}={new} (the run has {old})"
                                   for k, (old, new) in changed.items())
                raise RunDirError(
                    f"resuming {run_dir} with other knobs than it trained with: {listed}. A "
                    "resumed run must compute what it started computing: drop those overrides, "
                    "or start a new run with them (leave hydra.run.dir out)")
        except RunDirError as err:
            lock = self.locks.pop(str(run_dir), None)
            if lock is not None:
                lock.release()
            snapshot = self.snapshots.get(str(run_dir))
            if snapshot is not None:
                snapshot.restore(held_lock=lock is not None)
            else:  # a job another process launched: only the bytes .hydra_at_start/ kept
                restore_hydra_files(run_dir, config)
            print(err, file=sys.stderr)
            sys.exit(2)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        lock = self.locks.pop(str(config.hydra.runtime.output_dir), None)
        if lock is not None:
            lock.release()
