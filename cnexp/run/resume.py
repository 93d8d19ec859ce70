"""How a run starts: fresh, resumed, or warm-started from another run's weights. Every case
(`decide_start` decides all but the first three):

- no ckpt_path, empty directory: fresh.
- no ckpt_path, the directory holds a run: refused before anything runs (RunDirGuard,
  cnexp/run/dir.py): resume it, or start in a new directory.
- ckpt_path=auto on a finished run (a requeued job that had ended): nothing to do
  (`finished_already`): exit 0, the record untouched.
- a requeued SLURM job, or any job of the SLURM launcher, without ckpt_path: as ckpt_path=auto
  (`wanted_resume`).
- ckpt_path=auto and no checkpoint yet: fresh.
- ckpt_path=last or auto: the newest intact checkpoint of checkpoints/ (`resume_path`); a broken
  newest one is skipped, saying so; all of them broken: refused, naming each.
- ckpt_path=<file>: that file, from any directory.
- a changed knob: a checkpoint whose run had other knobs is refused in one line naming each
  knob (the identity it carries, cnexp/run/identity.py).
- a checkpoint with a record of another shape, a newer schema, or no Lightning version:
  refused in one line naming the versions.
- warm_start=true with ckpt_path=<file>: a new run from the file's trained weights at step 0,
  a fresh optimizer and record; metrics.json's warm_start names the file.
- warm_start=true where the directory holds its own checkpoints: resume those (a requeued warm
  start continues).

A resume continues step, optimizer, data order and record; what it may change is
RESUME_MAY_CHANGE (cnexp/run/identity.py).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from cnexp.errors import CnexpError
from cnexp.run.context import slurm_launcher
from cnexp.run.identity import (WARM_HINT, RunIdentityError, check_resumable, knob_changes,
                                saved_identity)
from cnexp.run.record import CHECKPOINT_DIR, LAST_CHECKPOINT, finished_run

log = logging.getLogger("cnexp")


class ResumeError(CnexpError):
    """ckpt_path=last where the run directory never saved a checkpoint."""


def finished_already(cfg: DictConfig, out_dir: Path) -> bool:
    """A start that must do nothing: ckpt_path=auto (asked, or a requeue's) on a finished run."""
    return wanted_resume(cfg.ckpt_path) == "auto" and finished_run(out_dir)


def wanted_resume(ckpt_path: Optional[str]) -> Optional[str]:
    """ckpt_path as given, except that a job SLURM requeued (SLURM_RESTART_COUNT > 0) without
    one continues its run (`auto`) rather than being refused for starting over it, and so does
    every job of the SLURM launcher (cnexp/run/context.py: a time limit never loses a run)."""
    if ckpt_path is None and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        log.info("requeued SLURM job: ckpt_path=auto")
        return "auto"
    if ckpt_path is None and slurm_launcher() is not None:
        return "auto"
    return ckpt_path


def resume_path(ckpt_path: Optional[str], run_dir: Path) -> Optional[str]:
    """The checkpoint a run resumes from: `last` (must exist), `auto` (if it exists), a path.
    `last` and `auto` take the newest intact checkpoint of the run's checkpoints/, saying so when
    that is not last.ckpt (cnexp/run/checkpoints.py)."""
    if ckpt_path not in ("last", "auto"):
        return ckpt_path
    from cnexp.run.checkpoints import resume_checkpoint  # torch: not at the Hydra callback's import

    last = Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT
    found = resume_checkpoint(last.parent)
    if found is not None:
        return str(found)
    if ckpt_path == "auto":
        return None
    raise ResumeError(
        f"ckpt_path=last: there is no checkpoint to resume in {last.parent} (this run directory "
        "never saved one). Point hydra.run.dir at the run to resume, use ckpt_path=auto to "
        "resume only when a checkpoint exists, or leave ckpt_path out to start fresh")


@dataclass
class Start:
    """How this run starts: resume from `resume`, or warm-start from `weights` (`warm` is the
    origin metrics.json records), or fresh (all None)."""
    resume: Optional[str] = None
    warm: Optional[dict] = None
    weights: Optional[dict] = None


def read_checkpoint(path: str) -> dict:
    """The checkpoint's pickle, its tensors memory-mapped (no gigabytes read)."""
    from cnexp.run.checkpoint_io import CheckpointError
    from cnexp.run.checkpoints import load_mapped

    try:
        checkpoint = load_mapped(path)
    except FileNotFoundError:
        raise CheckpointError(f"ckpt_path '{path}' does not exist: use a .ckpt file from a run's "
                              "checkpoints/ directory, or ckpt_path=last") from None
    except Exception as err:  # noqa: BLE001 - whatever torch.load says, the file is unusable
        first = (str(err).splitlines() or [""])[0].strip() or type(err).__name__
        raise CheckpointError(f"ckpt_path '{path}' is not a readable checkpoint ({first})"
                              ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"ckpt_path '{path}' is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def decide_start(cfg: DictConfig, out_dir: Path, identity: dict) -> Start:
    """Resume, warm start or fresh start, per the table above; RunIdentityError or
    CheckpointError (one line each) for a checkpoint this run may not take."""
    warm = bool(cfg.get("warm_start", False))
    if warm and cfg.ckpt_path in (None, "last", "auto"):
        raise RunIdentityError(
            f"warm_start=true starts from another run's weights: give that checkpoint as "
            f"ckpt_path=<file> (got ckpt_path={cfg.ckpt_path}), or leave warm_start out")
    wanted = wanted_resume(cfg.ckpt_path)
    if warm and resume_path("auto", out_dir) is not None:
        log.info("warm_start: %s already holds this run's checkpoints; resuming them", out_dir)
        wanted, warm = "last", False
    path = resume_path(wanted, out_dir)
    if path is None:
        return Start()
    checkpoint = read_checkpoint(path)
    saved = saved_identity(path, checkpoint, warm)
    changes = knob_changes(saved["knobs"], identity["knobs"]) if saved else {}
    if warm:
        return Start(weights=checkpoint["state_dict"], warm={
            "from": str(Path(path).resolve()), "step": checkpoint.get("global_step"),
            "config_hash": saved and saved.get("config_hash"),
            "changed": {k: [old, new] for k, (old, new) in changes.items()}})
    check_resumable(path, checkpoint, saved)
    if changes:
        listed = ", ".join(f"{k}={new} (the checkpoint has {old})"
                           for k, (old, new) in changes.items())
        raise RunIdentityError(
            f"ckpt_path '{path}' was written by a run with other knobs: {listed}. A resume must "
            f"compute what the run started computing: drop those overrides, or {WARM_HINT}")
    return Start(resume=path)


def load_warm_weights(module, start: Start) -> None:
    """The warm start's trained weights into `module`, refused where the architecture differs."""
    from cnexp.run.checkpoint_io import check_state_dict, saved_shapes

    check_state_dict(start.warm["from"], start.weights, saved_shapes(module))
    module.load_state_dict(start.weights, strict=False)  # the frozen base is not in it
    log.info("warm start from %s (step %s): its weights, a fresh optimizer and record",
             start.warm["from"], start.warm["step"])
