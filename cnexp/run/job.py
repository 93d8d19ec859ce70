"""One job, from Hydra's composed config to its recorded outcome: what run.py's entry point runs.

Every job records its outcome in its directory (status.json, and error.txt if it failed); in a
multirun a failing job does not stop the others (cnexp/launch/sweep.py sums them up). A start
refused before it changed anything (a resume of a finished run whose checkpoints are unreadable)
leaves that run's status.json as it was: the run is still finished. Exit codes: 0 finished,
1 crashed (traceback), 2 a user error (one message), 143 pre-empted and 130 interrupted
(last.ckpt saved: `ckpt_path=last` resumes; cnexp/run/signals.py).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from cnexp.errors import CnexpError
from cnexp.run.context import in_multirun, is_rank_zero, machine_info, split_threads
from cnexp.run.record import (ERROR_FILE, keep_finished_status, record_failure, restore_status,
                              write_status)
from cnexp.run.resume import finished_already
from cnexp.run.signals import RunStopped, StopSignals
from cnexp.storage import SpaceReserve, StorageError, as_storage_error

log = logging.getLogger("cnexp")


def run_job(cfg: DictConfig, out_dir: Path, train: Callable | None = None) -> None:
    """Train the job `cfg` describes in `out_dir` and record how it ended (sys.exit with the
    codes above where it did not finish). `train`: cnexp.train.train unless given (tests)."""
    signals = StopSignals().install()
    split_threads()
    started = time.time()
    reserve = SpaceReserve(out_dir)  # room for status.json and error.txt on a disk that fills
    finished = None  # status.json of a finished run this start resumes
    try:
        if train is None:
            from cnexp.train import train  # heavy imports after Hydra parsed the command line
        if finished_already(cfg, out_dir):  # requeued, done
            log.info("%s already finished (ckpt_path=auto): nothing to do", out_dir)
            return
        finished = keep_finished_status(out_dir)  # put back if this start is refused
        write_status(out_dir, "running")
        if is_rank_zero():
            reserve.hold()
        train(cfg, signals)
    except RunStopped as stop:
        stopped(out_dir, stop, signals, finished)
    except Exception as err:  # recorded in the job's directory, then reported
        reserve.release()  # its blocks let the record below be written on a full disk
        if failed(out_dir, err, finished if signals.phase == "setup" else None):
            raise
        return  # a multirun's failed job: recorded, the others go on
    finally:
        reserve.release()
        if signals.phase != "stopping":  # a stopping process keeps ignoring late signals
            signals.restore()
    write_status(out_dir, "ok", seconds=round(time.time() - started, 1), **machine_info())


def stopped(out_dir: Path, stop: RunStopped, signals: StopSignals, finished: str | None) -> None:
    """Pre-empted or interrupted: its last.ckpt is saved; say how to resume, exit its code.
    `finished`: a finished run's status.json, put back when the stop saved nothing new (its
    record on disk is still the finished run's)."""
    resume = f"python run.py hydra.run.dir={out_dir} ckpt_path=last"
    if finished is not None and stop.checkpoint is None:  # nothing ran: the run is finished
        restore_status(out_dir, finished)
    else:
        write_status(out_dir, stop.reason, signal=stop.signal_name, step=stop.step,
                     checkpoint=str(stop.checkpoint) if stop.checkpoint else None,
                     resume=resume, exit_code=stop.exit_code)
    log.warning("%s; resume: %s", stop, resume)
    signals.chain()  # a cluster's own handler (submitit's requeue) runs after the save
    sys.exit(stop.exit_code)


def failed(out_dir: Path, err: Exception, finished: str | None) -> bool:
    """Record the failure; a user error is one message (exit 2); True for a crash, which the
    caller re-raises (its traceback). `finished`: a finished run's status.json, put back when no
    step ran (a refused start). In a multirun the other jobs go on: logged, False."""
    # a full disk (quota, I/O error) anywhere: one message naming the file and the room left
    err = as_storage_error(err, out_dir)
    if isinstance(err, StorageError):  # the run's log file is on that disk too: no
        logging.raiseExceptions = False  # "--- Logging error ---" traceback per line
    record_failure(out_dir, err, keep=finished)
    user_error = isinstance(err, CnexpError)  # a user-fixable problem: the message suffices
    if in_multirun() and is_rank_zero():  # the other jobs go on; the sweep summary lists it
        log.error("job failed: %s (details: %s)", err, out_dir / ERROR_FILE,
                  exc_info=not user_error)
        return False
    if user_error:
        log.error("%s", err)
        sys.exit(2)
    return True
