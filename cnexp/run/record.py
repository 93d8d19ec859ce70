"""The record a run writes (metrics.json, status.json), as one typed schema for writer and readers.

Training writes `RunMetrics` through `write_metrics`; compare, runs and plots read it through
`read_metrics`, which accepts exactly this shape (or the unversioned first layout, version 1) and
raises `RecordError` naming the file and the field otherwise, so no reader guesses.

Version history: 1 (no `version` key) = the fields below up to `sudden_convergence`;
2 adds `version`, `losses` (train loss at every log step), `resumed_at` (the steps a run was
resumed from) and `eval_seconds`/`fit_seconds` summed over every segment of a resumed run;
3 adds `final_images` (each evaluation image's fidelity scores at the last full evaluation);
4 adds `data_check` (the data check's counts: samples per split, duplicates and how they were
handled, samples left out or refused; cnexp/data/check.py);
5 adds `warm_start` (null, or the checkpoint a warm start took its weights from: `from`, `step`,
`config_hash`, `changed` = knob -> [the checkpoint's, this run's]; cnexp/run/identity.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from cnexp.errors import CnexpError
from cnexp.fileio import atomic_write_json, write_small
from cnexp.run.context import is_rank_zero

RECORD_VERSION = 5
METRICS_FILE = "metrics.json"
STATUS_FILE = "status.json"
ERROR_FILE = "error.txt"  # a failed run's traceback
HISTORY_DIR = "history"  # earlier attempts' error.txt (archive_error)
CONFIG_FILE = "config.yaml"  # the config as the run ended (.hydra/config.yaml: as it was asked)
WANDB_ID_FILE = "wandb_run_id"  # one W&B run per run directory, continued on resume
CSV_FILE = "csv/metrics.csv"  # the run log as a table (RunLog)
CHECKPOINT_DIR = "checkpoints"
HYDRA_AT_START = ".hydra_at_start"  # the run's .hydra/ as it first started (knobs a resume keeps)
LOCK_FILE = "run.lock"  # held while a process runs in the directory (cnexp/run/dir.py)
LAST_CHECKPOINT = "last.ckpt"  # a link to the newest checkpoint in CHECKPOINT_DIR
# status.json's `status`: running, then one of the others; what each exit code means: run.py
STATUSES = ("running", "ok", "failed", "preempted", "interrupted")


log = logging.getLogger("cnexp")


class RecordError(CnexpError):
    """A metrics.json or status.json that is not what a run writes."""


@dataclass
class RunMetrics:
    """metrics.json. history rows: {"step": int, "eval/<metric>": float, ...}."""
    ablation: str
    seed: int
    steps: int
    history: list[dict[str, float]]
    step0: dict[str, float] = field(default_factory=dict)  # history[0] (the true step 0)
    final: dict[str, float] = field(default_factory=dict)  # history[-1]
    sudden_convergence: dict[str, dict] = field(default_factory=dict)
    base_damage_step0: Optional[float] = None
    controlnet_class: str = ""
    final_loss: Optional[float] = None
    fit_seconds: float = 0.0
    eval_seconds: float = 0.0
    eval_share: float = 0.0
    wall_seconds: Optional[float] = None
    losses: list[dict[str, float]] = field(default_factory=list)  # {"step", "train/loss"}
    resumed_at: list[int] = field(default_factory=list)
    # "eval/<setting>/<metric>" -> one score per evaluation image, in the set's order
    final_images: dict[str, list[float]] = field(default_factory=dict)
    data_check: dict[str, Any] = field(default_factory=dict)  # what the data check counted
    warm_start: Optional[dict[str, Any]] = None  # a new run from another's weights: where from
    version: int = RECORD_VERSION

    def to_json(self) -> dict:
        return asdict(self)


def write_metrics(run_dir: Path, metrics: RunMetrics) -> Path:
    path = Path(run_dir) / METRICS_FILE
    atomic_write_json(path, _finite(metrics.to_json()))
    return path


def _finite(obj: Any) -> Any:
    """NaN/inf as null: JSON has no such numbers, and other readers choke on Python's NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as err:
        raise RecordError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        return json.loads(text)
    except ValueError as err:
        raise RecordError(f"{path}: not valid JSON ({err}); the run was probably killed while "
                          "writing it, or the file was edited") from None


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _check_rows(path: Path, name: str, rows: Any) -> None:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RecordError(f"{path}: field '{name}' must be a list of objects, got "
                          f"{type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row.get("step"), int):
            raise RecordError(f"{path}: {name}[{i}] has no integer 'step'")
        bad = [k for k, v in row.items() if not _is_number(v)]
        if bad:
            raise RecordError(f"{path}: {name}[{i}] field '{bad[0]}' is not a number")


def read_metrics(path: str | Path) -> RunMetrics:
    """metrics.json as a RunMetrics, or RecordError saying what is wrong with it."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise RecordError(f"{path}: must be a JSON object, got {type(data).__name__}")
    version = data.get("version", 1)
    if version not in range(1, RECORD_VERSION + 1):
        raise RecordError(f"{path}: record version {version!r} is not one this cnexp reads "
                          f"(1 to {RECORD_VERSION}); update cnexp")
    known = {f.name for f in fields(RunMetrics)}
    missing = [k for k in ("ablation", "seed", "steps", "history") if k not in data]
    if missing:
        raise RecordError(f"{path}: field '{missing[0]}' is missing")
    for name, kind in (("ablation", str), ("seed", int), ("steps", int)):
        if not isinstance(data[name], kind) or isinstance(data[name], bool):
            raise RecordError(f"{path}: field '{name}' must be {kind.__name__}, got "
                              f"{type(data[name]).__name__}")
    _check_rows(path, "history", data["history"])
    _check_rows(path, "losses", data.get("losses", []))
    for name in ("step0", "final"):
        value = data.get(name, {})
        if not isinstance(value, dict) or not all(_is_number(v) for v in value.values()):
            raise RecordError(f"{path}: field '{name}' must be an object of numbers")
    images = data.get("final_images", {})
    if not isinstance(images, dict) or not all(
            isinstance(v, list) and all(_is_number(x) for x in v) for v in images.values()):
        raise RecordError(f"{path}: field 'final_images' must be an object of lists of numbers")
    if not isinstance(data.get("data_check", {}), dict):
        raise RecordError(f"{path}: field 'data_check' must be an object")
    if not isinstance(data.get("warm_start") or {}, dict):  # null: not a warm start
        raise RecordError(f"{path}: field 'warm_start' must be an object or null")
    if not isinstance(data.get("sudden_convergence", {}), dict):
        raise RecordError(f"{path}: field 'sudden_convergence' must be an object")
    for name in ("base_damage_step0", "final_loss", "fit_seconds", "eval_seconds",
                 "eval_share", "wall_seconds"):
        if not _is_number(data.get(name)):
            raise RecordError(f"{path}: field '{name}' must be a number")
    return RunMetrics(**{k: v for k, v in data.items() if k in known})


def read_status(run_dir: str | Path, strict: bool = True) -> Optional[dict]:
    """status.json of a run directory; None if there is none (the job never started).
    RecordError if it is not one a run writes; with strict=False, None then too (a sweep's
    summary must not fail over one job's file; compare reports such a job as broken)."""
    path = Path(run_dir) / STATUS_FILE
    if not path.exists():
        return None
    try:
        data = _load_json(path)
        if not isinstance(data, dict) or data.get("status") not in STATUSES:
            got = data.get("status") if isinstance(data, dict) else data
            raise RecordError(f"{path}: 'status' must be one of {', '.join(STATUSES)}, "
                              f"got {got!r}")
    except RecordError:
        if strict:
            raise
        return None
    return data


def finished_run(run_dir: str | Path) -> bool:
    """True when run_dir holds a finished run: status ok and a readable metrics.json."""
    try:
        status = read_status(run_dir) or {}
        return status.get("status") == "ok" and bool(read_metrics(Path(run_dir) / METRICS_FILE))
    except RecordError:
        return False


# ---- status.json and error.txt: a job's outcome -------------------------------------------
def write_status(out_dir: Path, status: str, **fields: Any) -> None:
    assert status in STATUSES, status
    if not is_rank_zero():
        return
    if status != "failed":  # a new attempt: an earlier one's traceback is history, not its state
        archive_error(Path(out_dir))
    record = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "epoch": round(time.time(), 1), "host": socket.gethostname(), "pid": os.getpid(),
              **fields}
    # a reader never sees half a file; on a full disk it is rewritten in its own blocks
    why = write_small(Path(out_dir) / STATUS_FILE, json.dumps(record, indent=1) + "\n")
    if why:  # bookkeeping must not turn a finished run into a failed one
        log.warning("could not write %s: %s", Path(out_dir) / STATUS_FILE, why)


def archive_error(out_dir: Path) -> Optional[Path]:
    """Move an earlier attempt's error.txt to history/error-<time it was written>.txt; returns
    where it went (None: there was none, or it could not be moved, which is said)."""
    error = out_dir / ERROR_FILE
    try:
        written = time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(error.stat().st_mtime))
    except FileNotFoundError:
        return None
    target = out_dir / HISTORY_DIR / f"error-{written}.txt"
    count = 1
    while target.exists():  # two failures in one second
        count += 1
        target = target.with_name(f"error-{written}-{count}.txt")
    try:
        target.parent.mkdir(exist_ok=True)
        os.replace(error, target)
    except OSError as err:  # e.g. a full disk: the new status still gets written
        log.warning("could not move %s to %s: %s", error, target, err)
        return None
    return target


def keep_finished_status(out_dir: Path) -> Optional[str]:
    """status.json's text when `out_dir` holds a finished run (status ok, readable metrics.json),
    for `restore_status` to put back when this start is refused before it changed anything."""
    if not is_rank_zero() or not finished_run(out_dir):
        return None
    try:
        return (Path(out_dir) / STATUS_FILE).read_text()
    except OSError:
        return None


def restore_status(out_dir: Path, text: str) -> None:
    """Put a finished run's status.json back byte for byte (see keep_finished_status)."""
    why = write_small(Path(out_dir) / STATUS_FILE, text)
    if why:
        log.warning("could not restore %s: %s", Path(out_dir) / STATUS_FILE, why)


def record_failure(out_dir: Path, err: BaseException, keep: Optional[str] = None) -> None:
    """error.txt (traceback) + status.json; closes a W&B run the job left open so the next job
    of the same process does not log into it. keep: a finished run's status.json text
    (keep_finished_status) that a start refused before it changed anything puts back instead:
    that run stays finished, and the log has the refusal."""
    if keep is not None:
        restore_status(out_dir, keep)
    elif is_rank_zero():
        why = write_small(out_dir / ERROR_FILE, "".join(traceback.format_exception(err)))
        if why:  # e.g. the disk is full: the log (stderr) still has the error
            log.warning("could not write %s: %s", out_dir / ERROR_FILE, why)
        write_status(out_dir, "failed", error_type=type(err).__name__,
                     error=str(err) or type(err).__name__)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1)
