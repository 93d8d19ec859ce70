"""A full disk is one clear message (issue 25, finding 2): every write of a run turns what torch
and Python raise into one message naming the file and the free space, removes its partial file,
and still records the failure in status.json and error.txt.

`torch.save` on a full disk raises its own RuntimeError ("[enforce fail at inline_container.cc]
... unexpected pos ...", the OSError as its context), not an OSError: `full_disk_save` writes part
of the file and raises exactly that. Where root may mount a small tmpfs, a disk that really fills
checks the same, torch's exception included (skipped otherwise).
"""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_toy import ToyModule

from cnexp.errors import CnexpError
from cnexp.run.checkpoint_io import CheckpointError, SafeCheckpointIO

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def full_disk_save(f) -> None:
    """What torch.save does into a file object when the disk fills: part of the file, then its
    RuntimeError raised while handling the write's OSError (as on a real tmpfs, torch 2.14)."""
    f.write(b"PK\x03\x04" + bytes(4092))
    try:
        raise OSError(errno.ENOSPC, NO_SPACE)
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def fill_disk_from_step(monkeypatch, step: int) -> None:
    """torch.save of a checkpoint of `step` or later meets a full disk."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step", 0) >= step and hasattr(f, "write"):
            return full_disk_save(f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _fit(checkpoints) -> None:
    L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
              plugins=[SafeCheckpointIO()], callbacks=[checkpoints]).fit(ToyModule())


def test_a_checkpoint_the_disk_cannot_hold_is_one_message_and_the_previous_stays(
        tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    fill_disk_from_step(monkeypatch, 2)
    with pytest.raises(CheckpointError, match=(
            r"could not save checkpoint .*step=2\.ckpt: disk full \(No space left on device\); "
            r"the previous checkpoint\(s\) are intact: .*last\.ckpt; .* free of .* on the file "
            r"system of .*checkpoints\. Free space")) as err:
        _fit(ModelCheckpoint(ckpt_dir, save_last=True, every_n_train_steps=1))
    assert err.value.__suppress_context__  # one message: no chained torch traceback
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    for path in ckpt_dir.iterdir():  # no partial file left; the last good step, whole
        assert torch.load(path, weights_only=False)["global_step"] == 1


def test_with_last_ckpt_linked_a_failed_save_leaves_it_whole(tmp_path, monkeypatch):
    from cnexp.run.checkpoints import RunCheckpoints

    ckpt_dir = tmp_path / "checkpoints"
    fill_disk_from_step(monkeypatch, 3)
    with pytest.raises(CheckpointError, match=r"step-000003\.ckpt: disk full"):
        _fit(RunCheckpoints(ckpt_dir, every=1))
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step-000002.ckpt"]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 2


def test_atomic_write_on_a_full_disk_names_the_file_and_the_free_space(tmp_path, monkeypatch):
    from cnexp.fileio import atomic_write

    def no_room(fd):
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(os, "fsync", no_room)
    target = tmp_path / "csv" / "metrics.csv"
    with pytest.raises(CnexpError, match=rf"could not write {target}: disk full \({NO_SPACE}\); "
                                         r".* free of .* on the file system of .*csv\. Free"):
        atomic_write(target, "step\n1\n")
    assert list((tmp_path / "csv").iterdir()) == []  # its temporary file is gone
    with pytest.raises(OSError):  # still an OSError for code that may skip a cache write
        atomic_write(target, "step\n1\n")


# ---- a disk that really fills (root: a small tmpfs) ------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk; skipped without root or where mount is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_on_a_real_full_disk_checkpoints_fail_cleanly_and_the_record_is_still_written(
        small_disk):
    from cnexp.fileio import atomic_write, write_small
    from cnexp.storage import SpaceReserve

    big = {"w": torch.zeros(1 << 20)}  # 4 MiB
    with open(small_disk / "raw", "wb") as f, pytest.raises(RuntimeError, match="unexpected pos"
                                                             ) as raised:
        torch.save(big, f)  # what full_disk_save imitates
    assert raised.value.__context__.errno == errno.ENOSPC
    (small_disk / "raw").unlink()
    with pytest.raises(CheckpointError, match=r"big\.ckpt: disk full \(No space left on device\); "
                       r"no earlier checkpoint exists; .* free of 1\.0 MiB on the file system of"):
        SafeCheckpointIO().save_checkpoint(big, small_disk / "big.ckpt")
    assert list(small_disk.iterdir()) == []  # the 1 MiB it wrote is given back

    status = small_disk / "status.json"
    atomic_write(status, json.dumps({"status": "running", "pid": 1}))
    reserve = SpaceReserve(small_disk, size=64 * 1024).hold()
    _fill(small_disk)
    with pytest.raises(CnexpError, match=r"could not write .*metrics\.json: disk full"):
        atomic_write(small_disk / "metrics.json", "{}")
    # status.json: over its own blocks; error.txt: in the reserve's room, given up first
    assert write_small(status, json.dumps({"status": "failed", "error": "disk full"})) is None
    assert json.loads(status.read_text())["status"] == "failed"
    reserve.release()
    assert write_small(small_disk / "error.txt", "could not write ...: disk full\n") is None
    assert sorted(p.name for p in small_disk.iterdir()) == ["error.txt", "filler", "status.json"]


# ---- python run.py on a disk that fills: one message, status and error.txt ---------------------
SMALL = ["data.train_size=8", "data.val_size=4", "data.test_size=4", "data.batch_size=4",
         "eval.enabled=false", "logger.mode=disabled", "trainer.enable_progress_bar=false",
         "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=1"]
LAUNCHER = """import runpy, sys
sys.path.insert(0, {tests!r})
import pytest, test_full_disk
test_full_disk.fill_disk_from_step(pytest.MonkeyPatch(), 2)
sys.argv = [{run_py!r}, *sys.argv[1:]]
runpy.run_path({run_py!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _run_py(command, run_dir: Path, data: Path, tmp: Path):
    return subprocess.run([*command, f"hydra.run.dir={run_dir}", f"data.root={data}",
                           f"paths.cache={tmp / 'cache'}", *SMALL], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "WANDB_MODE": "disabled"})


def _assert_one_message_and_a_record(done, run_dir: Path):
    said = done.stdout + done.stderr
    assert done.returncode == 2, said[-3000:]
    assert "Traceback" not in said and "Logging error" not in said, said[-3000:]
    message = [line for line in said.splitlines() if "could not" in line]
    assert len(message) == 1, said[-3000:]
    assert "disk full (No space left on device)" in message[0] and " free of " in message[0]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "disk full" in status["error"]
    assert status["error"] in (run_dir / "error.txt").read_text()
    left = [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name == ".cnexp-reserve"]
    assert left == []  # no partial checkpoint, no reserve
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_run_py_on_a_disk_that_fills_says_it_once_and_records_it(tmp_path, data_root):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=str(ROOT / "tests"), run_py=str(ROOT / "run.py")))
    run_dir = tmp_path / "run"
    done = _run_py([sys.executable, str(launcher)], run_dir, data_root, tmp_path)
    _assert_one_message_and_a_record(done, run_dir)


@pytest.mark.slow
def test_run_py_on_a_real_full_disk_says_it_once_and_records_it(tmp_path, data_root):
    """The run directory on a 16 MiB tmpfs: one tiny-world checkpoint (9 MiB) fits, the next
    does not; the run log (run.log) and the CSV share that disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(run_dir)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        done = _run_py([sys.executable, "run.py"], run_dir, data_root, tmp_path)
        _assert_one_message_and_a_record(done, run_dir)
    finally:
        subprocess.run(["umount", str(run_dir)], check=False)


def test_a_second_ctrl_c_inside_torch_save_stops_the_run_not_a_disk_error(tmp_path, monkeypatch):
    """torch.save turns a signal handler's exception raised mid-write into its own write error
    (seen in a run: "unexpected pos"); the stop is what propagates, the previous file stays."""
    from cnexp.run.signals import RunStopped

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + bytes(100))
        try:
            raise RunStopped("interrupted", "a second SIGINT")
        except RunStopped:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7 vs 5")

    (tmp_path / "last.ckpt").write_bytes(b"previous")
    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(RunStopped, match="interrupted by a second SIGINT"):
        SafeCheckpointIO().save_checkpoint({"global_step": 4}, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert (tmp_path / "last.ckpt").read_bytes() == b"previous"
