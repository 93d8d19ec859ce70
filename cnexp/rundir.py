"""One run per run directory, and what `ckpt_path` resumes from.

`RunDirGuard` (a Hydra callback, conf/hydra/default.yaml) runs before the job writes anything into
its directory (Hydra has only saved `.hydra/`): it takes an exclusive lock on `<run dir>/run.lock`
for the life of the process and refuses a fresh run in a directory that already holds one, so a second process can never mix
its files with the first's. The kernel drops the lock when its process dies however it dies; the
file keeps the holder's pid and host, so the next run can say whose lock it takes over.
A resume must train what the run trained. Hydra rewrites `.hydra/` at every start, so a fresh run
keeps a copy as `.hydra_at_start/`; a resume with other knobs than those is refused, naming
them, and a refused start puts the run's `.hydra/` back (compare reads its labels there).
"""
from __future__ import annotations

import atexit
import fcntl
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
from cnexp.fileio import atomic_write
from cnexp.overrides import flatten, knob_diff
from cnexp.record import METRICS_FILE
from cnexp.sweep import is_rank_zero

log = logging.getLogger("cnexp")

LOCK_FILE = "run.lock"
HYDRA_AT_START = ".hydra_at_start"
LAST = Path("checkpoints") / "last.ckpt"
RESUME_HINT = "ckpt_path=last (or ckpt_path=auto: resume if there is a checkpoint)"
# what a resume may change: how long it trains and what it shows, not what a step computes
RESUME_MAY_CHANGE = ("trainer.max_steps", "trainer.enable_progress_bar", "data.num_workers")


class RunDirError(CnexpError):
    pass


class RunDirLock:
    """An flock on <dir>/run.lock held until release() or the process ends."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            f.close()
            raise RunDirError(
                f"run directory {self.path.parent} is in use by another run ({holder}); wait for "
                "it to end, or give this run its own directory (python run.py hydra.run.dir=...)"
            ) from None
        previous = _holder(f)
        if previous != "unknown process":  # written by a process that never released it
            log.warning("taking over the lock of a run that is gone (%s) in %s", previous,
                        self.path.parent)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "command": " ".join(sys.argv)}))
        f.flush()
        self._file = f
        atexit.register(self.release)
        return self

    def release(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()  # a clean exit leaves no holder to report
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def _holder(f) -> str:
    f.seek(0)
    try:
        info = json.loads(f.read() or "null")
    except ValueError:
        info = None
    if not isinstance(info, dict):
        return "unknown process"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}: "
            f"{info.get('command', '')}".rstrip(": "))


def holds_a_run(run_dir: Path) -> Optional[str]:
    """What in `run_dir` shows an earlier run (its record or checkpoints), or None."""
    for name in (METRICS_FILE, str(LAST)):
        if (run_dir / name).exists():
            return name
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    return str(ckpts[0].relative_to(run_dir)) if ckpts else None


def wanted_resume(ckpt_path: Optional[str]) -> Optional[str]:
    """ckpt_path as given, except that a job SLURM requeued (SLURM_RESTART_COUNT > 0) without
    one continues its run (`auto`) rather than being refused for starting over it."""
    if ckpt_path is None and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        log.info("requeued SLURM job: ckpt_path=auto")
        return "auto"
    return ckpt_path


def resume_path(ckpt_path: Optional[str], run_dir: Path) -> Optional[str]:
    """The checkpoint a run resumes from: `last` (must exist), `auto` (if it exists), a path."""
    if ckpt_path not in ("last", "auto"):
        return ckpt_path
    last = Path(run_dir) / LAST
    if last.exists():
        return str(last)
    if ckpt_path == "auto":
        return None
    raise RunDirError(
        f"ckpt_path=last: there is no checkpoint to resume in {last.parent} (this run directory "
        "never saved one). Point hydra.run.dir at the run to resume, use ckpt_path=auto to "
        "resume only when a checkpoint exists, or leave ckpt_path out to start fresh")


def changed_knobs(run_dir: Path, config: DictConfig) -> dict[str, tuple[Any, Any]]:
    """knob -> (the run's value, this resume's) for every knob a resume may not change; knobs
    the run's config does not have (added to cnexp since) keep their defaults and pass."""
    saved = Path(run_dir) / HYDRA_AT_START / "config.yaml"
    if not saved.exists():
        return {}
    before = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    now = _task_config(config)
    flat_before, flat_now = flatten(before), flatten(now)
    keys = [k for k in knob_diff(now, before) if k in flat_before and k not in RESUME_MAY_CHANGE]
    keys += [k for k in ("ablation", "seed") if before.get(k) != now.get(k)]
    return {k: (flat_before.get(k), flat_now.get(k)) for k in keys}


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


def _task_config(config: DictConfig) -> dict:
    task = OmegaConf.to_container(config, resolve=False)
    task.pop("hydra", None)
    return task


class RunDirGuard(Callback):
    """Lock the job's directory before Hydra writes into it; refuse to start a fresh run over
    an earlier one. Exits with code 2 and one message, like run.py for every user error."""

    def __init__(self):
        self.locks: dict[str, RunDirLock] = {}

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
            restore_hydra_files(run_dir, config)
            print(err, file=sys.stderr)
            sys.exit(2)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        lock = self.locks.pop(str(config.hydra.runtime.output_dir), None)
        if lock is not None:
            lock.release()
