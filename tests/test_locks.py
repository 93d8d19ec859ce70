"""One lock implementation (filelock's flock, cnexp.fileio.file_lock) for run directories and
shared caches, and one message naming the path and the fix on a filesystem without flock."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from cnexp.fileio import LockUnsupported, exclusive, file_lock
from cnexp.run.dir import RunDirError, RunDirLock
from cnexp.run.record import LOCK_FILE


def hold_in_another_process(run_dir) -> subprocess.CompletedProcess:
    code = ("import sys; from cnexp.run.dir import RunDirLock, RunDirError\n"
            f"try: RunDirLock({str(run_dir)!r}).acquire()\n"
            "except RunDirError as err: print(err); sys.exit(2)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_run_dir_lock_names_its_holder_and_is_free_after_release(tmp_path):
    lock = RunDirLock(tmp_path).acquire()
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()
    refused = hold_in_another_process(tmp_path)
    assert refused.returncode == 2
    assert f"{tmp_path} is in use by another run (pid {os.getpid()}" in refused.stdout
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean exit leaves no holder
    assert hold_in_another_process(tmp_path).returncode == 0


def test_the_run_directory_and_the_caches_share_one_lock(tmp_path):
    cache_side = file_lock(tmp_path / LOCK_FILE)  # what exclusive() takes for a cache
    cache_side.acquire(timeout=0)
    try:
        with pytest.raises(RunDirError, match="in use by another run"):
            RunDirLock(tmp_path).acquire()
    finally:
        cache_side.release()
    RunDirLock(tmp_path).acquire().release()


def test_a_gone_holder_is_named_when_its_lock_is_taken_over(tmp_path, caplog):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "since": "then"}))
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        RunDirLock(tmp_path).acquire().release()
    assert "taking over the lock of a run that is gone (pid 999999 on gone" in caplog.text


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_filesystem_without_flock_is_one_message_naming_path_and_fix(tmp_path, monkeypatch,
                                                                        code):
    def no_flock(fd, operation):  # what Lustre without -o flock / NFS without lockd answer
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(RunDirError) as run_dir:
        RunDirLock(tmp_path / "run").acquire()
    said = str(run_dir.value)
    assert str(tmp_path / "run" / LOCK_FILE) in said and "does not support file locks" in said
    assert "hydra.run.dir=" in said
    with pytest.raises(LockUnsupported) as cache:
        with exclusive(tmp_path / "cache" / "fid", "the FID reference statistics"):
            pass
    said = str(cache.value)
    assert str(tmp_path / "cache" / "fid.lock") in said and "CNEXP_CACHE=" in said
    # no soft-lock marker left behind that would block the next job
    assert not any(p.name.endswith(".lock") and p.stat().st_size
                   for p in tmp_path.rglob("*") if p.is_file())


def test_a_held_run_lock_pickles_for_a_requeue_and_the_copy_holds_nothing(tmp_path):
    """submitit pickles Hydra's callbacks, and so the run-dir guard's lock, to requeue a job."""
    import cloudpickle

    lock = RunDirLock(tmp_path).acquire()
    copy = cloudpickle.loads(cloudpickle.dumps(lock))
    assert copy.path == lock.path and copy._lock is None
    copy.release()  # holds nothing: a no-op, the original still holds the directory
    with pytest.raises(RunDirError, match="in use"):
        RunDirLock(tmp_path).acquire()
    lock.release()
