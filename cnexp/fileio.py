"""Files that several processes may write at once: atomic replacement and cross-process locks.

Every file a run or a shared cache writes goes through `atomic_write`: a uniquely named temporary
file beside the target, flushed and renamed over it, so a reader never sees half a file and two
writers never trip over each other's temporary file; a full disk is one `StorageError` naming
the file and the free space (cnexp/storage.py). `exclusive(path)` serialises the first fill
of a shared cache (data generation, FID reference statistics) between concurrent first runs.
`file_lock` is the one lock implementation (filelock's flock) for those caches and for the run
directory (cnexp/run/dir.py); on a filesystem without flock it raises `LockUnsupported`, naming the
path and where to put it instead, rather than a bare OSError or a marker a crash would leave.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from filelock import FileLock

from cnexp.errors import CnexpError
from cnexp.storage import storage_error, storage_errors, storage_failure

log = logging.getLogger("cnexp")


class AtomicFile:
    """The one atomic replacement: a uniquely named temporary file beside `path` (`handle`,
    binary) that `commit()` flushes, fsyncs and renames over `path`, or `abort()` removes. As a
    context manager it commits on success and aborts on any error (which it lets through);
    a writer that appends over many calls (cnexp/encode_store.py) calls them itself."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                        dir=self.path.parent)
        os.close(fd)
        self.handle = open(self.tmp, "wb")  # by name: handle.name says which file it is

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Remove the temporary file (a partial one would only hold the space)."""
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

    def __enter__(self):
        return self.handle

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    with storage_errors(path):
        target = AtomicFile(path)
    try:
        with target as f:
            f.write(payload)
    except BaseException as err:
        cause = storage_failure(err)
        if cause is None:
            raise
        raise storage_error(path, cause) from None  # a full disk: one message, path and room


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


# what flock answers on a filesystem mounted without locks (Lustre without -o flock: ENOSYS;
# NFS without a lock daemon: ENOLCK; some FUSE and object-store mounts: EOPNOTSUPP)
NO_FLOCK = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})
CACHE_FIX = ("point the caches at a local or lock-capable disk: export CNEXP_CACHE=/path "
             "(or paths.cache=/path)")


class LockUnsupported(CnexpError):
    pass


def file_lock(path: str | Path) -> FileLock:
    """An flock on `path` (created if missing), usable from any thread of its process. No soft
    fallback: a marker file outlives a killed job and would block its requeue, so a filesystem
    without flock is an error (acquire)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), thread_local=False, fallback_to_soft=False)


def acquire(lock: FileLock, timeout: float, fix: str = CACHE_FIX) -> None:
    """lock.acquire(timeout); a filesystem without flock becomes one LockUnsupported that names
    the lock file and `fix`. A lock held elsewhere still raises filelock.Timeout."""
    try:
        lock.acquire(timeout=timeout)
    except OSError as err:
        if err.errno not in NO_FLOCK:
            raise
        raise LockUnsupported(
            f"cannot lock {lock.lock_file}: its filesystem does not support file locks "
            f"(flock: {os.strerror(err.errno)}). cnexp locks run directories and shared caches "
            f"so that two jobs never write the same files; {fix}. (Or have the file system "
            "mounted with locks: Lustre -o flock, NFS with its lock daemon.)") from None


@contextlib.contextmanager
def exclusive(path: str | Path, what: str = "") -> Iterator[None]:
    """Hold `<path>.lock` across processes (and threads); logs when it has to wait."""
    lock_path = Path(f"{path}.lock")
    lock = file_lock(lock_path)
    try:
        acquire(lock, timeout=0)
    except TimeoutError:
        log.info("waiting for another process to finish %s (%s)", what or path, lock_path)
        acquire(lock, timeout=-1)
    try:
        yield
    finally:
        lock.release()


def write_small(path: str | Path, text: str) -> Optional[str]:
    """Write a small bookkeeping file (status.json, error.txt) that a full disk must not stop:
    atomically when there is room, else in place over the blocks the file already holds. Returns
    None when written, else why not (the caller says it on stderr)."""
    payload = text.encode()
    try:
        atomic_write(path, payload)
        return None
    except OSError as err:
        why = str(err)
    try:
        # in place only within what the file already has on disk: no new block to allocate
        if os.stat(path).st_blocks * 512 < len(payload):
            return why
        with open(path, "r+b") as f:
            f.write(payload)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError:
        return why
