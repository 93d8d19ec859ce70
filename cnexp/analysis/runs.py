"""Read a sweep into RunRecords: every job directory under it (finished, failed or cut off), the
jobs its multirun.yaml defined but that never started, or the runs of a W&B group.

A job directory (written by run.py + cnexp/train.py) holds `.hydra/` (config and overrides),
`status.json` (+ `error.txt` if it failed), and once finished `metrics.json`, `config.yaml` and
`samples/*.png`. Everything here tolerates what is absent.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from cnexp.overrides import JOB_DIR_NAME, NOT_KNOBS, sweep_overrides
from cnexp.run.record import (CONFIG_FILE, ERROR_FILE, METRICS_FILE, STATUS_FILE, RecordError,
                              RunMetrics, read_metrics, read_status)

# broken: a record that is not what a run writes (truncated, edited, another program's file);
# unreadable: a directory without .hydra/ and config.yaml, whose ablation and knobs are unknown;
# duplicate: a finished run of an ablation, variant and seed that another finished run counts for
OK, FAILED, INCOMPLETE, MISSING, BROKEN = "ok", "failed", "incomplete", "missing", "broken"
UNREADABLE, DUPLICATE = "unreadable", "duplicate"
STATUSES = (OK, FAILED, INCOMPLETE, BROKEN, MISSING, UNREADABLE, DUPLICATE)
DUPLICATE_RULE = ("of several finished runs with the same ablation, swept knobs and seed, the one "
                  "whose metrics.json was written last counts (ties: the last path); the others "
                  "are listed as duplicates")
STEP_IN_NAME = re.compile(r"step[_-]?(\d+)")
BUDGET_KEYS = ("steps", "fit_seconds", "wall_seconds", "seconds", "epoch", "host", "cpus",
               "torch_threads", "gpu")
WANDB_STATES = {"finished": OK, "failed": FAILED, "crashed": FAILED, "killed": FAILED}


@dataclass
class RunRecord:
    name: str
    ablation: str
    seed: Optional[int]
    status: str  # one of STATUSES
    error: str = ""
    path: Optional[Path] = None
    variant: str = ""  # swept knobs other than ablation and seed: "optim.lr=0.001"
    overrides: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # .hydra/config.yaml (unresolved) or W&B config
    final: dict[str, float] = field(default_factory=dict)  # eval/... at the last evaluation
    history: list[dict] = field(default_factory=list)  # [{"step": s, "eval/...": v}, ...]
    images: dict[str, list[float]] = field(default_factory=dict)  # metrics.json final_images
    sudden: Any = None  # metrics.json's `sudden_convergence`, whatever its shape
    base_damage: Optional[float] = None  # metrics.json's `base_damage_step0`
    samples: dict[str, Path] = field(default_factory=dict)  # prompt setting -> last grid PNG
    budget: dict[str, Any] = field(default_factory=dict)  # steps, seconds, machine

    @property
    def label(self) -> str:
        return f"{self.ablation} [{self.variant}]" if self.variant else self.ablation


def is_metric(key: str) -> bool:
    """An evaluation metric (eval/<metric> or eval/<setting>/<metric>), not bookkeeping."""
    return key.startswith("eval/") and "seconds" not in key


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if is_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def non_finite(row: dict) -> Optional[str]:
    """What makes a final row unusable: "non-finite eval/fid = nan" (null: how the run's writer
    stores a NaN or an infinity, cnexp/run/record.py), or None when every metric is a number."""
    for key, value in row.items():
        if not is_metric(key):
            continue
        if value is None:
            return f"non-finite {key} = null (NaN or Inf when the run wrote it)"
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"non-finite {key} = {value}"
    return None


def _load(path: Path, parse=json.loads) -> Any:
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _overrides(lines: Optional[list]) -> dict[str, str]:
    """["+ablation=lite", "seed=1"] -> {"ablation": "lite", "seed": "1"}"""
    pairs = (str(line).split("=", 1) for line in lines or [] if "=" in str(line))
    return {key.lstrip("+~"): value for key, value in pairs}


def last_grids(samples_dir: Path) -> dict[str, Path]:
    """The highest-step grid per prompt setting: samples/step_000500.png -> "default",
    samples/perfect/step_000500.png or samples/step_000500_perfect.png -> "perfect"."""
    best: dict[str, tuple[int, Path]] = {}
    for png in sorted(samples_dir.rglob("*.png")) if samples_dir.is_dir() else []:
        rel = png.relative_to(samples_dir).with_suffix("").as_posix()
        match = STEP_IN_NAME.search(rel)
        if match is None:
            continue
        setting = (rel[:match.start()] + rel[match.end():]).strip("/_- ").replace("/", "_")
        setting, step = setting or "default", int(match.group(1))
        if setting not in best or step > best[setting][0]:
            best[setting] = (step, png)
    return {setting: png for setting, (_, png) in best.items()}


def read_run(run_dir: Path) -> RunRecord:
    """One run directory as a RunRecord; never raises over what the directory holds: a record
    that cannot be read makes the run `broken`, with the reason in `error`."""
    config = _load(run_dir / ".hydra" / CONFIG_FILE, yaml.safe_load)
    config = config if isinstance(config, dict) else {}
    overrides = _overrides(_load(run_dir / ".hydra" / "overrides.yaml", yaml.safe_load))
    from_name = JOB_DIR_NAME.match(run_dir.name)
    ablation = config.get("ablation") or overrides.get("ablation") or \
        (from_name and from_name["ablation"]) or "?"
    seed = next((s for s in (config.get("seed"), overrides.get("seed"),
                             from_name and from_name["seed"]) if s is not None), None)
    record = RunRecord(name=run_dir.name, ablation=str(ablation),
                       seed=_int_or_none(seed), status=INCOMPLETE,
                       path=run_dir, overrides=overrides, config=config)
    if not (run_dir / ".hydra").is_dir() and not (run_dir / CONFIG_FILE).exists():
        # guessing its group from a name or a record would invent what the sweep varied
        record.ablation, record.seed, record.status = "?", None, UNREADABLE
        record.error = ("no .hydra/ and no config.yaml: its ablation and knobs cannot be read, "
                        "so it is in no group (copy the run's .hydra/ back to include it)")
        return record
    try:
        status = read_status(run_dir) or {}
        metrics = read_metrics(run_dir / METRICS_FILE) \
            if (run_dir / METRICS_FILE).exists() else None
    except RecordError as err:
        record.status, record.error = BROKEN, str(err)
        return record
    if status.get("status") == FAILED or (metrics is None and (run_dir / ERROR_FILE).exists()):
        record.status = FAILED
        record.error = status.get("error") or _exception_line(run_dir / ERROR_FILE)
    elif metrics is not None:
        _fill(record, metrics, status)
        bad = non_finite(metrics.final)
        if bad:  # a NaN is not a result: the run failed, and the report says why
            record.status, record.error, record.final = FAILED, bad, {}
    elif status.get("status") in ("preempted", "interrupted"):
        record.error = (f"{status['status']} at step {status.get('step')} "
                        f"({status.get('time')}); resume: {status.get('resume')}")
    else:
        since = f" ({status['status']} since {status.get('time')})" if status else ""
        record.error = f"no metrics.json{since}: still running, or killed"
    return record


def _int_or_none(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _fill(record: RunRecord, metrics: RunMetrics, status: dict) -> None:
    record.status = OK
    record.ablation, record.seed = metrics.ablation, metrics.seed
    record.final = _numbers(metrics.final)
    record.history = [{"step": row["step"], **_numbers(row)} for row in metrics.history]
    record.images = {k: [math.nan if v is None else float(v) for v in values]
                     for k, values in metrics.final_images.items()}
    record.sudden = metrics.sudden_convergence
    record.base_damage = metrics.base_damage_step0
    record.samples = last_grids(record.path / "samples")
    budget = {**status, "steps": metrics.steps, "fit_seconds": metrics.fit_seconds,
              "wall_seconds": metrics.wall_seconds}
    record.budget = {k: v for k, v in budget.items() if k in BUDGET_KEYS and v is not None}


def _exception_line(path: Path) -> str:
    lines = (_load(path, str) or "").strip().splitlines()
    return lines[-1] if lines else ""  # a traceback's last line is the exception


def find_run_dirs(root: Path) -> list[Path]:
    dirs = {p.parent for marker in (METRICS_FILE, STATUS_FILE) for p in root.rglob(marker)}
    dirs |= {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    return sorted(dirs, key=lambda d: (d.parent.as_posix(), _job_number(d), d.name))


def _job_number(run_dir: Path) -> int:
    head = run_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


class _GroupOptions:
    """Lists a config group's options for Hydra's glob() sweeps, as Hydra's config loader would."""

    def __init__(self, config_dirs: list[Path]):
        self.config_dirs = config_dirs

    def get_group_options(self, group: str, results_filter=None, **_) -> list[str]:
        return sorted({p.stem for d in self.config_dirs for p in (d / group).glob("*.yaml")})


def expected_jobs(sweep_dir: Path) -> Optional[list[dict[str, str]]]:
    """The swept values of every job that the sweep's multirun.yaml defines, or None."""
    hydra = (_load(sweep_dir / "multirun.yaml", yaml.safe_load) or {}).get("hydra")
    if not hydra:
        return None
    sources = hydra.get("runtime", {}).get("config_sources") or []
    lister = _GroupOptions([Path(s["path"]) for s in sources if s.get("schema") == "file"])
    swept: dict[str, list[str]] = {}
    try:
        for override in sweep_overrides(hydra):
            override.config_loader = lister  # glob() sweeps list the config group's options
            swept[override.key_or_group] = list(override.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - an unusual sweep: fall back to the runs found
        return None
    return [dict(zip(swept, values)) for values in itertools.product(*swept.values())]


def load_sweep(root: Path) -> list[RunRecord]:
    """Every run under root, plus a `missing` record per job the sweep defined but never ran;
    duplicates marked (DUPLICATE_RULE). Unreadable runs take no part in the accounting."""
    root = Path(root)
    every = [read_run(d) for d in find_run_dirs(root)]
    records = [r for r in every if r.status != UNREADABLE]
    jobs = expected_jobs(root)
    swept = set(jobs[0]) if jobs else {k for k in _keys(records) if _varies(records, k)}
    knobs = sorted(k for k in swept if not k.startswith(NOT_KNOBS))
    for record in records:
        record.variant = ", ".join(f"{k}={record.overrides[k]}" for k in knobs
                                   if k in record.overrides)
    if jobs is not None:
        seen = [r.overrides for r in records]
        for job in jobs:
            if not any(all(o.get(k) == v for k, v in job.items()) for o in seen):
                records.append(_missing(job, knobs))
    else:  # no multirun.yaml: expect every label x seed seen
        labels = {(r.ablation, r.variant) for r in records}
        seeds = {r.seed for r in records if r.seed is not None}
        have = {(r.ablation, r.variant, r.seed) for r in records}
        for (ablation, variant), seed in itertools.product(sorted(labels), sorted(seeds)):
            if (ablation, variant, seed) not in have:
                records.append(RunRecord(f"{ablation}-s{seed}", ablation, seed, MISSING,
                                         "never ran", variant=variant))
    mark_duplicates(records, root)
    return records + [r for r in every if r.status == UNREADABLE]


def shown_path(path: Optional[Path], root: Optional[Path]) -> str:
    """A run's directory as a report shows it: relative to the compared directory (a report
    moved or committed names no machine's absolute paths), else as given."""
    if path is None:
        return ""
    if root is not None:
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:  # not below root
            pass
    return str(path)


def mark_duplicates(records: list[RunRecord], root: Optional[Path] = None) -> None:
    """Mark all but one finished run per (label, seed) DUPLICATE, naming the one that counts
    (by its path relative to root, when given)."""
    finished: dict[tuple[str, Optional[int]], list[RunRecord]] = {}
    for run in records:
        if run.status == OK:
            finished.setdefault((run.label, run.seed), []).append(run)
    for runs in finished.values():
        runs.sort(key=lambda r: (_written(r), str(r.path or "")))
        counted = runs[-1]
        for run in runs[:-1]:
            run.status = DUPLICATE
            counts = shown_path(counted.path, root) or counted.name
            run.error = f"duplicate of {counts}, which counts"


def _written(run: RunRecord) -> float:
    try:
        return (run.path / METRICS_FILE).stat().st_mtime if run.path else 0.0
    except OSError:
        return 0.0


def _keys(records: Iterable[RunRecord]) -> set[str]:
    return {k for r in records for k in r.overrides}


def _varies(records: list[RunRecord], key: str) -> bool:
    return len({r.overrides.get(key) for r in records}) > 1


def _missing(job: dict[str, str], knobs: list[str]) -> RunRecord:
    ablation = job.get("ablation", "baseline")
    seed = int(job["seed"]) if job.get("seed", "").lstrip("-").isdigit() else None
    variant = ", ".join(f"{k}={job[k]}" for k in knobs if k in job)
    return RunRecord(" ".join(f"{k}={v}" for k, v in job.items()), ablation, seed, MISSING,
                     "defined by the sweep, no directory", variant=variant)


def load_wandb(path: str, group: str, api: Any = None) -> list[RunRecord]:
    """The runs of one W&B group (`entity/project`), read through the public API (online)."""
    if api is None:
        import wandb

        api = wandb.Api()
    records = []
    for run in api.runs(path, filters={"group": group}):
        config, summary = dict(run.config), dict(run.summary_metrics)
        history = []
        for row in run.scan_history():
            values = _numbers(row)
            step = row.get("trainer/global_step", row.get("_step"))
            if values and step is not None:
                history.append({"step": int(step), **values})
        status = WANDB_STATES.get(str(run.state).lower(), INCOMPLETE)
        error = "" if status == OK else f"W&B state: {run.state}"
        if status == OK and non_finite(summary):
            status, error = FAILED, non_finite(summary)
        records.append(RunRecord(
            name=run.name, ablation=str(config.get("ablation", "?")), seed=config.get("seed"),
            status=status, error=error,
            config=config, final=_numbers(summary) if status == OK else {}, history=history,
            sudden=summary.get("sudden_convergence")))
    mark_duplicates(records)
    return records
