"""cnexp entry point: `python run.py [+ablation=NAME] [key=value ...]` (see conf/train.yaml).

Every job records its outcome in its directory (status.json, and error.txt if it failed); in a
multirun a failing job does not stop the others (cnexp/sweep.py). A start refused before it
changed anything (a resume of a finished run whose checkpoints are unreadable) leaves that run's
status.json as it was: the run is still finished. Exit codes: 0 finished,
1 crashed (traceback), 2 a user error (one message), 143 pre-empted and 130 interrupted
(last.ckpt saved: `ckpt_path=last` resumes; cnexp/signals.py).
"""
import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cnexp.config import register_configs
from cnexp.errors import CnexpError
from cnexp.record import finished_run
from cnexp.rundir import wanted_resume
from cnexp.schema import check_command_line
from cnexp.signals import RunStopped, StopSignals
from cnexp.storage import SpaceReserve, StorageError, as_storage_error
from cnexp.sweep import (in_multirun, is_rank_zero, keep_finished_status, machine_info,
                         record_failure, split_threads, write_status)

register_configs()
log = logging.getLogger("cnexp")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    signals = StopSignals().install()
    split_threads()
    started = time.time()
    reserve = SpaceReserve(out_dir)  # room for status.json and error.txt on a disk that fills
    finished = None  # status.json of a finished run this start resumes
    try:
        from cnexp.train import train  # heavy imports after Hydra has parsed the command line

        if wanted_resume(cfg.ckpt_path) == "auto" and finished_run(out_dir):  # requeued, done
            log.info("%s already finished (ckpt_path=auto): nothing to do", out_dir)
            return
        finished = keep_finished_status(out_dir)  # put back if this start is refused
        write_status(out_dir, "running")
        if is_rank_zero():
            reserve.hold()
        train(cfg, signals)
    except RunStopped as stop:
        resume = f"python run.py hydra.run.dir={out_dir} ckpt_path=last"
        write_status(out_dir, stop.reason, signal=stop.signal_name, step=stop.step,
                     checkpoint=str(stop.checkpoint) if stop.checkpoint else None,
                     resume=resume, exit_code=stop.exit_code)
        log.warning("%s; resume: %s", stop, resume)
        signals.chain()  # a cluster's own handler (submitit's requeue) runs after the save
        sys.exit(stop.exit_code)
    except Exception as err:  # recorded in the job's directory, then reported
        reserve.release()  # its blocks let the record below be written on a full disk
        # a full disk (quota, I/O error) anywhere: one message naming the file and the room left
        err = as_storage_error(err, out_dir)
        if isinstance(err, StorageError):  # the run's log file is on that disk too: no
            logging.raiseExceptions = False  # "--- Logging error ---" traceback per line
        # in "setup" no step ran and no record was written: a finished run is still finished
        record_failure(out_dir, err, keep=finished if signals.phase == "setup" else None)
        user_error = isinstance(err, CnexpError)  # a user-fixable problem: the message suffices
        if in_multirun():  # the other jobs go on; the sweep summary lists this one
            log.error("job failed: %s (details: %s)", err, out_dir / "error.txt",
                      exc_info=not user_error)
            return
        if user_error:
            log.error("%s", err)
            sys.exit(2)
        raise
    finally:
        reserve.release()
        if signals.phase != "stopping":  # a stopping process keeps ignoring late signals
            signals.restore()
    write_status(out_dir, "ok", seconds=round(time.time() - started, 1), **machine_info())


if __name__ == "__main__":
    check_command_line(sys.argv[1:])  # an unknown key: its nearest knob, before Hydra's "use +"
    main()
