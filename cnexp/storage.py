"""A full disk (or a quota, or an I/O error) ends a run with one message naming the file and the
free space, removes what it half wrote, and still records why.

The errors differ by writer: Python's writes raise `OSError` (ENOSPC, EDQUOT, EIO), but
`torch.save` raises its own `RuntimeError` ("[enforce fail at inline_container.cc] ... unexpected
pos ..." with the OSError as its context, or "PytorchStreamWriter failed writing file ...").
`storage_failure` finds either in an exception and what it was raised from; `storage_errors`
(around a write) and `as_storage_error` (run.py, for every other writer: PIL, safetensors,
OmegaConf) turn it into one `StorageError`. `StorageError` is also an `OSError`, so code that
already tolerates a failed write of its own (a cache it may skip) still does.

The failure must still reach status.json and error.txt on a disk with no room left:
`write_small` writes them atomically when it can and otherwise over the file's own blocks, and
`SpaceReserve` holds a few blocks in the run directory while the run lives and gives them up
before the failure is recorded.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from cnexp.errors import CnexpError

# what each errno means to a user; others are not storage failures (a missing directory is not)
STORAGE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                  errno.EIO: "input/output error", errno.EFBIG: "file too large",
                  errno.EROFS: "read-only file system"}
# torch.save's own words for a write that failed (torch/csrc/.../inline_container.cc)
TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "file write failed", "unexpected pos")
FIX = ("Free space there, or give the run a disk with room (python run.py hydra.run.dir=...; "
       "caches: paths.cache=...); a run with a checkpoint resumes with ckpt_path=last")
RESERVE_FILE = ".cnexp-reserve"
RESERVE_BYTES = 256 * 1024  # error.txt (a traceback) and status.json fit many times over


class StorageError(CnexpError, OSError):
    """A write the storage refused: the message names the path, what failed and the free space."""

    def __init__(self, message: str, errno_: Optional[int] = None):
        super().__init__(message)
        self.errno = errno_  # str() stays the message (OSError formats only errno + strerror)


def exception_chain(err: Optional[BaseException]) -> Iterator[BaseException]:
    """`err`, then what it was raised from or during, and so on, each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def storage_failure(err: BaseException) -> Optional[BaseException]:
    """The storage failure in `err` or in what it was raised from or during, else None. An OSError
    with a storage errno is preferred to torch's RuntimeError around it (it says why)."""
    found = None
    for err in exception_chain(err):
        if isinstance(err, StorageError):
            return err
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return err
        if found is None and isinstance(err, RuntimeError) and \
                any(words in str(err) for words in TORCH_WRITE_FAILED):
            found = err
    return found


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def free_space(path: str | Path) -> str:
    """'<free> free of <total> on the file system of <dir>' for where `path` is (or would be)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
    except OSError as err:
        return f"free space unknown ({err.strerror or err})"
    return f"{_size(usage.free)} free of {_size(usage.total)} on the file system of {where}"


def what_failed(cause: BaseException) -> str:
    """'disk full (No space left on device)', 'write failed (<torch's first line>)', ..."""
    what = STORAGE_ERRNOS.get(getattr(cause, "errno", None), "write failed")
    detail = getattr(cause, "strerror", None) or (str(cause).splitlines() or [""])[0].strip() \
        or type(cause).__name__
    return f"{what} ({detail})"


def storage_error(path: str | Path, cause: BaseException) -> StorageError:
    if isinstance(cause, StorageError):
        return cause
    return StorageError(f"could not write {path}: {what_failed(cause)}; {free_space(path)}. "
                        f"{FIX}", getattr(cause, "errno", None))


@contextlib.contextmanager
def storage_errors(path: str | Path, partial: str | Path | None = None) -> Iterator[None]:
    """A storage failure inside the block becomes one StorageError naming `path`; `partial`
    (what the block was writing) is removed, so a half-written file does not keep the space."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        cause = storage_failure(err)
        if cause is None:
            raise
        if partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        raise storage_error(path, cause) from None


def as_storage_error(err: BaseException, where: str | Path) -> BaseException:
    """`err` itself, or, when a full disk (etc.) caused it anywhere, one StorageError naming the
    file (or `where`, when the writer did not say) with `err` as its cause (error.txt shows it)."""
    if isinstance(err, CnexpError):
        return err
    cause = storage_failure(err)
    if cause is None:
        return err
    new = storage_error(getattr(cause, "filename", None) or where, cause)
    new.__cause__ = err
    return new


class SpaceReserve:
    """A few blocks held in the run directory while the run lives (`hold`), given up (`release`)
    when a write fails, so that the failure can still be written down on a full disk."""

    def __init__(self, directory: str | Path, size: int = RESERVE_BYTES):
        self.path = Path(directory) / RESERVE_FILE
        self.size = size
        self.held = False  # only the process that holds it gives it up (DDP: rank zero)

    def hold(self) -> "SpaceReserve":
        self.held = True
        try:
            with open(self.path, "wb") as f:
                f.write(os.urandom(self.size))  # random: a compressing file system keeps it all
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # already full: the record falls back to stderr
            self.release()
        return self

    def release(self) -> None:
        if not self.held:  # another process's (a DDP rank that is not zero)
            return
        self.held = False
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
