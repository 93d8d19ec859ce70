"""Files that several processes may write at once: atomic replacement and cross-process locks.

Every file a run or a shared cache writes goes through `atomic_write`: a uniquely named temporary
file beside the target, flushed and renamed over it, so a reader never sees half a file and two
writers never trip over each other's temporary file. `exclusive(path)` serialises the first fill
of a shared cache (data generation, FID reference statistics) between concurrent first runs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

log = logging.getLogger("cnexp")


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


@contextlib.contextmanager
def exclusive(path: str | Path, what: str = "") -> Iterator[None]:
    """Hold `<path>.lock` across processes (and threads); logs when it has to wait."""
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log.info("waiting for another process to finish %s (%s)", what or path, lock_path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
