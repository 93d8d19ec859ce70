"""What a start writes into a run directory before it can be refused, saved beforehand and put back
byte for byte with its times, so that a refused start leaves the holder's directory as it was.

Hydra writes `.hydra/{config,hydra,overrides}.yaml` (opened "w", in place) and opens the job's
log (`<job name>.log`, append) in the job's directory before any callback runs
(hydra/core/utils.py `run_job`); RunDirGuard then takes `run.lock`. So RunDirGuard snapshots the
directory in `on_run_start` / `on_multirun_start`, before `run_job`, and puts back what changed
when it refuses the start. Only what the start itself touches is put back: while a live run holds
the directory, its own writes (its log, its status) are left alone. A job started by another
process than the one Hydra's run began in (a cluster launcher) has no snapshot: RunDirGuard then
puts back `.hydra/` from `.hydra_at_start/`, bytes only.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cnexp.run.record import CONFIG_FILE

SMALL = 1 << 20  # files kept whole; a longer one (a long log) is only ever appended to: cut back


@dataclass(frozen=True)
class _Saved:
    data: Optional[bytes]  # None: too long to keep; its length is restored by truncation
    size: int
    atime_ns: int
    mtime_ns: int


def _save(path: Path) -> Optional[_Saved]:
    try:
        st = path.stat()
        data = path.read_bytes() if st.st_size <= SMALL else None
    except OSError:
        return None
    return _Saved(data, st.st_size, st.st_atime_ns, st.st_mtime_ns)


class RunDirSnapshot:
    """The files and directories of `run_dir` that a start may write before it is refused."""

    def __init__(self, run_dir: Path, hydra_subdir: Optional[str], log_name: Optional[str],
                 lock_name: str):
        self.run_dir = Path(run_dir)
        self.hydra_dir = self.run_dir / hydra_subdir if hydra_subdir else None
        hydra_files = ([self.hydra_dir / n for n in (CONFIG_FILE, "hydra.yaml", "overrides.yaml")]
                       if self.hydra_dir else [])
        self.own = hydra_files  # Hydra rewrites these whether or not the holder is alive
        self.held = [self.run_dir / lock_name] + ([self.run_dir / log_name] if log_name else [])
        self.files = {p: _save(p) for p in [*self.own, *self.held]}
        self.dirs = {d: _save_dir(d) for d in (self.run_dir, self.hydra_dir) if d is not None}

    def restore(self, held_lock: bool) -> None:
        """Put back what changed. `held_lock`: this process took the directory's lock, so the
        holder is gone and its lock file, log and directory times are also put back."""
        _detach_file_logs(self.run_dir)
        paths = self.own + (self.held if held_lock else [])
        for path in paths:
            _restore_file(path, self.files[path])
        if self.hydra_dir is not None and self.dirs.get(self.hydra_dir) is None:
            _remove_if_empty(self.hydra_dir)  # .hydra/ was created by this start
        if held_lock:
            for directory, times in self.dirs.items():
                if times is not None and directory.is_dir():
                    os.utime(directory, ns=times)


def _save_dir(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_atime_ns, st.st_mtime_ns) if path.is_dir() else None


def _restore_file(path: Path, saved: Optional[_Saved]) -> None:
    if saved is None:  # created by this start
        path.unlink(missing_ok=True)
        return
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    if st is not None and (st.st_size, st.st_mtime_ns) == (saved.size, saved.mtime_ns):
        return  # untouched
    if saved.data is not None:
        with open(path, "wb") as f:  # in place: the directory's own time stays as it was
            f.write(saved.data)
    elif st is not None and st.st_size > saved.size:
        os.truncate(path, saved.size)  # a long log this start appended to
    else:
        return  # neither ours to restore nor restorable: leave it
    os.utime(path, ns=(saved.atime_ns, saved.mtime_ns))


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def _detach_file_logs(run_dir: Path) -> None:
    """Close the log handlers Hydra opened in run_dir, so that nothing more is appended there."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and \
                Path(handler.baseFilename).parent == run_dir:
            root.removeHandler(handler)
            handler.close()
