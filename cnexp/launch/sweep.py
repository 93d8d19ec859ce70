"""The end of a sweep: a summary of the jobs that failed or stopped, and the exit code that says
so. Importing it registers the job-directory resolvers (a launcher's worker process unpickles
SweepSummary before it resolves the job's directory: cnexp/run/naming.py)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

import cnexp.run.naming  # noqa: F401 - registers cnexp_job_name and cnexp_tasks_per_node
from cnexp.run.record import ERROR_FILE, STATUS_FILE, read_status

log = logging.getLogger("cnexp")


class SweepSummary(Callback):
    """At the end of a multirun: say which jobs failed (and where), exit non-zero if any did."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        job_dirs = sorted((p.parent for p in sweep_dir.glob(f"*/{STATUS_FILE}")),
                          key=lambda d: (len(d.name.split("_")[0]), d.name))  # 2_ before 10_
        statuses = {d: read_status(d, strict=False) for d in job_dirs}
        failed = {d: s for d, s in statuses.items() if s and s.get("status") == "failed"}
        stopped = {d: s for d, s in statuses.items()
                   if s and s.get("status") in ("preempted", "interrupted")}
        ok = sum(1 for s in statuses.values() if s and s.get("status") == "ok")
        log.info("sweep finished: %d ok, %d failed, %d stopped of %d jobs in %s", ok,
                 len(failed), len(stopped), len(statuses), sweep_dir)
        for run_dir, status in failed.items():
            log.error("  failed: %s: %s (%s)", run_dir.name, status.get("error", "?"),
                      run_dir / ERROR_FILE)
        for run_dir, status in stopped.items():
            log.warning("  %s at step %s: %s (resume: %s)", status["status"], status.get("step"),
                        run_dir.name, status.get("resume"))
        log.info("compare the runs: python -m cnexp.analysis.compare %s", sweep_dir)
        if failed or stopped:
            sys.exit(1)
