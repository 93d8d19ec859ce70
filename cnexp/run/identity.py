"""A checkpoint carries its run: what defines the run, and how a checkpoint's copy of it is read.

Every checkpoint a run writes holds, under `cnexp`: the cnexp version, the checkpoint `schema`
(this entry and the record states it carries: RunLog's losses, the evaluation history), the
metrics.json `record_version`, and the run's knobs with their hash. cnexp/run/resume.py compares
them with a start's own knobs (its docstring: every case).

Not compared: what a resume may change (RESUME_MAY_CHANGE), where a run lives (paths., logger.,
hydra.), how it started (ckpt_path, warm_start), and knobs the checkpoint lacks (added to cnexp
since). Ablation and seed are compared.

Schemas: 1 = no `cnexp` entry (cnexp up to d7c2d69), migrated by `migrate_schema_1` from the
`.hydra_at_start/config.yaml` of the run directory that holds the checkpoint (refused without one,
unless warm_start); 2 = this layout. A newer schema, a record of another shape or a checkpoint
without Lightning's version is refused in one line naming the versions, never a traceback.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from cnexp.errors import CnexpError
from cnexp.overrides import NOT_KNOBS, flatten
from cnexp.run.record import CONFIG_FILE, HYDRA_AT_START, RECORD_VERSION

log = logging.getLogger("cnexp")

IDENTITY_KEY = "cnexp"
SCHEMA = 2  # 1: no IDENTITY_KEY (cnexp up to d7c2d69)
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"
START_KNOBS = ("warm_start",)  # how a run started, like ckpt_path: not what it computes
WARM_HINT = "start a new run from its weights with warm_start=true"
# what a resume may change: how long it trains and what it shows, not what a step computes
RESUME_MAY_CHANGE = ("trainer.max_steps", "trainer.enable_progress_bar", "data.num_workers",
                     "cache.fill_workers")


class RunIdentityError(CnexpError):
    pass


def cnexp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cnexp")
    except PackageNotFoundError:
        return "unknown"


# ---- what defines a run ---------------------------------------------------------------------
def run_knobs(config: dict) -> dict[str, Any]:
    """The flattened knobs of a task config (a plain dict) that a resume may not change."""
    skipped = (*RESUME_MAY_CHANGE, *START_KNOBS)
    return {k: v for k, v in flatten(config).items()
            if k in ("ablation", "seed") or not (k.startswith(NOT_KNOBS) or k in skipped)}


def config_knobs(cfg: DictConfig) -> dict[str, Any]:
    task = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    task.pop("hydra", None)
    return run_knobs(task)


def knob_changes(before: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    """knob -> (before, now) for the knobs both have with other values."""
    return {k: (before[k], now[k]) for k in sorted(before.keys() & now.keys())
            if before[k] != now[k]}


def config_hash(knobs: dict) -> str:
    text = json.dumps(knobs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What every checkpoint of this run carries under IDENTITY_KEY."""
    knobs = config_knobs(cfg)
    return {"cnexp_version": cnexp_version(), "schema": SCHEMA, "record_version": RECORD_VERSION,
            "config_hash": config_hash(knobs), "knobs": knobs}


# ---- reading a checkpoint's identity --------------------------------------------------------
def migrate_schema_1(path: Path) -> Optional[dict]:
    """A schema-1 checkpoint's identity, from the config its run kept when it started
    (<run>/.hydra_at_start/config.yaml beside <run>/checkpoints/); None without one."""
    saved = Path(path).resolve().parent.parent / HYDRA_AT_START / CONFIG_FILE
    if not saved.is_file():
        return None
    knobs = run_knobs(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    return {"cnexp_version": "before run identities", "schema": 1, "config_hash":
            config_hash(knobs), "knobs": knobs}


def saved_identity(path: str, checkpoint: dict, warm: bool) -> Optional[dict]:
    """The checkpoint's identity, migrated to this schema; RunIdentityError where it cannot be."""
    identity = checkpoint.get(IDENTITY_KEY)
    if identity is None:
        identity = migrate_schema_1(Path(path))
        if identity is None and not warm:
            raise RunIdentityError(
                f"ckpt_path '{path}' has checkpoint schema 1 (written by cnexp before checkpoints "
                f"carried their run; this cnexp writes schema {SCHEMA}) and no "
                f"{HYDRA_AT_START}/config.yaml beside its checkpoints/ says what it trained: "
                f"resume it in its own run directory, or {WARM_HINT}")
        return identity
    schema = identity.get("schema") if isinstance(identity, dict) else None
    if not isinstance(schema, int) or not 1 <= schema <= SCHEMA or \
            not isinstance(identity.get("knobs"), dict):
        raise RunIdentityError(
            f"ckpt_path '{path}' has checkpoint schema {schema!r} (cnexp "
            f"{identity.get('cnexp_version') if isinstance(identity, dict) else None}); this cnexp "
            f"({cnexp_version()}) reads schemas 1 to {SCHEMA}: update cnexp to the one that "
            "wrote it (a resume and a warm start alike need its layout)")
    return identity


def record_problem(checkpoint: dict) -> Optional[str]:
    """What in the checkpoint's record states (RunLog, EvaluationCallback) is not the shape this
    cnexp writes, or None."""
    from cnexp.run.log import RunLog

    states = checkpoint.get("callbacks") or {}
    problem = RunLog.state_problem(states.get(RunLog.__qualname__))
    if problem:
        return f"RunLog's {problem}"
    state = states.get("EvaluationCallback")  # cnexp/metrics/callbacks.py's state
    if state is None:
        return None
    missing = [k for k in ("history", "seconds", "last_step", "last_full_step") if k not in state]
    if missing:
        return f"the evaluation state has no '{missing[0]}' (it has {', '.join(map(str, state))})"
    for i, row in enumerate(state["history"] if isinstance(state["history"], list) else [None]):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            return f"the evaluation history's row {i} has no integer 'step'"
        odd = [k for k in row if k != "step" and not str(k).startswith("eval/")]
        if odd:
            return f"the evaluation history's row {i} has field '{odd[0]}' (not eval/...)"
    return None


def check_resumable(path: str, checkpoint: dict, saved: dict) -> None:
    """Lightning's version key (its own migrations need it) and the record's shape."""
    have = f"checkpoint schema {saved['schema']}, cnexp {saved.get('cnexp_version', '?')}"
    if not isinstance(checkpoint.get(LIGHTNING_VERSION_KEY), str):
        raise RunIdentityError(
            f"ckpt_path '{path}' has no '{LIGHTNING_VERSION_KEY}' ({have}): Lightning cannot "
            f"bring it to its own version, and a resume needs it; {WARM_HINT}")
    problem = record_problem(checkpoint)
    if problem:
        raise RunIdentityError(
            f"ckpt_path '{path}': {problem} ({have}); this cnexp resumes the record it writes, "
            f"checkpoint schemas 1 to {SCHEMA}: resume from a checkpoint as the run wrote it, "
            f"or {WARM_HINT}")
