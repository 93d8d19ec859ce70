"""cnexp/run/job.py, in this process with a stand-in train: how a job's end is recorded when a
start is stopped before any step, and which process gives up the disk reserve."""
import os
import signal

import pytest
from omegaconf import OmegaConf

from cnexp.run.job import run_job
from cnexp.run.record import (STATUS_FILE, RunMetrics, finished_run, read_status, write_metrics,
                              write_status)
from cnexp.run.signals import RunStopped
from cnexp.storage import RESERVE_FILE, SpaceReserve

@pytest.fixture
def finished_dir(tmp_path):
    write_status(tmp_path, "ok", seconds=12.0)
    write_metrics(tmp_path, RunMetrics(ablation="baseline", seed=0, steps=4, history=[]))
    return tmp_path


def test_a_stop_before_any_step_leaves_a_finished_run_finished(finished_dir):
    assert finished_run(finished_dir)
    before = (finished_dir / STATUS_FILE).read_bytes()

    def stopped_while_loading(cfg, signals):  # SIGTERM during setup: nothing saved
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as exit_info:
        run_job(OmegaConf.create({"ckpt_path": "last"}), finished_dir, stopped_while_loading)
    assert exit_info.value.code == 143
    assert (finished_dir / STATUS_FILE).read_bytes() == before  # still ok, byte for byte


def test_a_stop_during_training_is_recorded(tmp_path):
    def stopped_after_a_save(cfg, signals):
        raise RunStopped("preempted", "SIGTERM", step=3, checkpoint=tmp_path / "last.ckpt")

    with pytest.raises(SystemExit):
        run_job(OmegaConf.create({"ckpt_path": None}), tmp_path, stopped_after_a_save)
    assert read_status(tmp_path)["status"] == "preempted"


def test_only_the_process_holding_the_reserve_gives_it_up(tmp_path):
    held = SpaceReserve(tmp_path, size=4096).hold()  # rank zero
    other = SpaceReserve(tmp_path, size=4096)  # another DDP rank: the same path, never held
    other.release()
    assert (tmp_path / RESERVE_FILE).exists()
    held.release()
    assert not (tmp_path / RESERVE_FILE).exists()
