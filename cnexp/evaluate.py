"""Evaluate finished runs again under other evaluation settings, without retraining:

    python -m cnexp.evaluate <run dir or sweep dir> --out DIR [key=value ...]
    e.g. ... data.eval_size=256 eval.prompt_settings=[none,insufficient]

Each finished run below the given directory is loaded from what it exported (`controlnet/`, and
`unet/` when its decoder trained) onto its own base, and its final evaluation is run again
exactly as training runs it (cnexp/metrics/callbacks.py), under the run's config with the
overrides. Only evaluation knobs may change (eval.*, sampling.*, data.eval_size): anything else
would describe another model. DIR/<the run's path below the given directory> receives a record
that compare reads like any other run's: the run's history with its last row replaced by the
new evaluation, `final_images`, `.hydra/` and `config.yaml` with the overrides (appended to
`.hydra/overrides.yaml` too), status.json (saying what it was evaluated from), and the new sample
grids. The runs themselves are only read. Every run found is evaluated or listed at the end with
why it was skipped (exit code 1 if any was); a mistyped or invalid knob stops before any run
(exit code 2), naming the knob and the valid names closest to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import shutil
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnexp.analysis.runs import find_run_dirs
from cnexp.config import TrainConfig
from cnexp.errors import CnexpError
from cnexp.fileio import atomic_write, atomic_write_json
from cnexp.overrides import flatten
from cnexp.run.record import (CONFIG_FILE, ERROR_FILE, METRICS_FILE, STATUS_FILE, RecordError,
                              finished_run, read_metrics, read_status, write_metrics)

log = logging.getLogger("cnexp")
EVALUATION_SECTIONS = ("eval.", "sampling.")
EVALUATION_KEYS = ("data.eval_size",)


def is_evaluation_knob(key: str) -> bool:
    return key.startswith(EVALUATION_SECTIONS) or key in EVALUATION_KEYS


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def check_overrides(overrides: list[str]) -> None:
    """Each override names an evaluation knob of cnexp/config.py with a value its type and range
    accept; otherwise one CnexpError naming it, with the closest valid names."""
    schema = OmegaConf.structured(TrainConfig)
    knobs = flatten(OmegaConf.to_container(schema, resolve=False))
    valid = sorted(k for k in knobs if is_evaluation_knob(k))
    for override in overrides:
        key, why = _key(override), ""
        if "=" not in override:
            why = "give it as key=value (e.g. data.eval_size=256)"
        elif key not in knobs:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            why = (f"{key} is not a knob; did you mean {' or '.join(close)}?" if close else
                   f"{key} is not an evaluation knob; they are: {', '.join(valid)}")
        elif not is_evaluation_knob(key):
            why = ("only evaluation knobs may change (eval.*, sampling.*, data.eval_size); "
                   "another knob would describe another model: train that instead")
        else:
            why = _bad_value(schema, override, key)
        if why:
            raise CnexpError(f"cannot re-evaluate with {override!r}: {why}")


def _bad_value(schema, override: str, key: str) -> str:
    """Why `override`'s value does not fit its field (type, choices, declared range), or ""."""
    try:
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist([override.lstrip("+~")]))
    except OmegaConfBaseException as err:
        return f"{str(err).splitlines()[0]} (set {key}=<a valid value>)"
    allowed, value = _declared_range(key), OmegaConf.select(merged, key)
    if allowed is not None and value is not None and not allowed.ok(value):
        return f"{key} is {value}; {allowed.reason(value)}"
    return ""


def _declared_range(key: str):
    """The range cnexp/config.py declares beside the field `key` (cnexp/knobs.py), or None."""
    schema = TrainConfig
    *sections, name = key.split(".")
    for part in [*sections, name]:
        field = next((f for f in dataclasses.fields(schema) if f.name == part), None)
        if field is None:
            return None
        if part != name:
            schema = field.default_factory
    return field.metadata.get("range")


def why_unusable(run_dir: Path) -> str:
    """Why run_dir cannot be evaluated again ("" when it can): it must be a finished run with
    its record, config.yaml and exported ControlNet."""
    try:
        status = read_status(run_dir)
    except RecordError as err:
        return str(err)
    if status is None:
        return "no status.json: the run never started"
    if status.get("evaluated_from"):
        return f"an evaluation of {status['evaluated_from']}, not a run: evaluate that run"
    if status.get("status") != "ok":
        return f"status '{status.get('status')}': only finished runs can be evaluated again"
    if not (run_dir / METRICS_FILE).exists():
        return "no metrics.json although status.json says ok"
    try:
        read_metrics(run_dir / METRICS_FILE)
    except RecordError as err:
        return str(err)
    for name, what in ((CONFIG_FILE, "the config the run wrote at its end"),
                       ("controlnet", "the exported ControlNet")):
        if not (run_dir / name).exists():
            return f"no {name} ({what})"
    return ""


def evaluate_run(run_dir: Path, out_dir: Path, overrides: list[str]) -> dict:
    """Evaluate one finished run under `overrides` into out_dir; returns the new final row."""
    from cnexp.base import load_base
    from cnexp.families.family import get_family
    from cnexp.data.datamodule import TriplesDataModule
    from cnexp.metrics.callbacks import build_evaluation
    from cnexp.module import ControlNetModule

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not finished_run(run_dir) or not (run_dir / CONFIG_FILE).exists():
        raise CnexpError(f"{run_dir} holds no finished run (status ok, metrics.json and "
                         "config.yaml): only finished runs can be evaluated again")
    if out_dir.resolve() == run_dir.resolve():
        raise CnexpError(f"--out must not be the run itself ({run_dir}): its record stays as is")
    start = time.perf_counter()
    # metrics.json is what marks a record complete (compare, find_run_dirs): an earlier
    # evaluation's goes first and the new one is written last, so an interrupted evaluation
    # leaves an incomplete record, never old numbers beside new settings
    (out_dir / METRICS_FILE).unlink(missing_ok=True)
    changes = OmegaConf.from_dotlist([o.lstrip("+~") for o in overrides])
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig),
                          OmegaConf.load(run_dir / CONFIG_FILE), changes)
    cfg.paths.output_dir = str(out_dir)
    L.seed_everything(cfg.seed)
    base = load_base(cfg.base)
    if (run_dir / "unet").is_dir():  # control.sd_locked=false: the decoder trained too
        base.unet = type(base.unet).from_pretrained(run_dir / "unet")
    branch = get_family(base.family).branch(cfg.control.branch)
    controlnet = branch.load(run_dir / "controlnet")
    module = ControlNetModule(base, controlnet, cfg.optim, seed=cfg.seed, branch=branch).eval()
    data = TriplesDataModule(cfg.data, seed=cfg.seed, tokenizer=base.tokenizer,
                             prompts=(cfg.eval.insufficient_prompt,))
    data.prepare_data()
    evaluation = build_evaluation(cfg, data, out_dir)
    record = read_metrics(run_dir / METRICS_FILE)
    trainer = SimpleNamespace(global_step=record.steps, global_rank=0, world_size=1,
                              is_global_zero=True, loggers=[])
    with torch.no_grad():
        row = {"step": record.steps, **evaluation.evaluate(trainer, module, full=True)}
    history = [r for r in record.history if r["step"] != record.steps] + [row]
    _copy_config(run_dir, out_dir, changes, overrides)
    atomic_write(out_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg))
    status = json.loads((run_dir / STATUS_FILE).read_text())
    atomic_write_json(out_dir / STATUS_FILE, {
        **status, "evaluated_from": str(run_dir), "evaluation_overrides": overrides,
        "evaluation_seconds": round(time.perf_counter() - start, 1)})
    write_metrics(out_dir, replace(record, history=history, final=row,
                                   final_images=evaluation.final_images))
    return row


def _copy_config(run_dir: Path, out_dir: Path, changes, overrides: list[str]) -> None:
    """The run's .hydra/ (what compare reads labels and knobs from), overrides applied and
    recorded in overrides.yaml (replacing the run's own for the same key)."""
    hydra_dir = out_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / ".hydra" / "hydra.yaml").exists():
        shutil.copyfile(run_dir / ".hydra" / "hydra.yaml", hydra_dir / "hydra.yaml")
    lines = _read_list(run_dir / ".hydra" / "overrides.yaml")
    changed = {_key(o) for o in overrides}
    lines = [line for line in lines if _key(str(line)) not in changed] + list(overrides)
    atomic_write(hydra_dir / "overrides.yaml", yaml.safe_dump(lines, default_flow_style=False))
    if (run_dir / ".hydra" / CONFIG_FILE).exists():
        config = OmegaConf.merge(OmegaConf.load(run_dir / ".hydra" / CONFIG_FILE), changes)
        atomic_write(hydra_dir / CONFIG_FILE, OmegaConf.to_yaml(config))


def _read_list(path: Path) -> list:
    try:
        lines = yaml.safe_load(path.read_text()) if path.exists() else []
    except (OSError, yaml.YAMLError):
        lines = []
    return lines if isinstance(lines, list) else []


def evaluate_tree(runs: Path, out: Path, overrides: list[str]) -> tuple[int, list]:
    """Evaluate every usable run below `runs` into `out`; returns (how many were evaluated,
    [(run dir, why it was skipped)])."""
    inside_out = out.resolve()
    found = [d for d in find_run_dirs(runs)
             if d.resolve() != inside_out and inside_out not in d.resolve().parents]
    evaluated, skipped = 0, []
    for run in found:
        target = out / run.relative_to(runs)
        why = why_unusable(run)
        if not why:
            try:
                row = evaluate_run(run, target, overrides)
                log.info("%s -> %s (%d metrics)", run, target, len(row) - 1)
                evaluated += 1
                continue
            except CnexpError as err:
                why = str(err)
            except Exception as err:  # noqa: BLE001 - one run's fault must not stop the others
                why = f"evaluation failed: {type(err).__name__}: {err}{_keep_traceback(target)}"
        skipped.append((run, why))
    return evaluated, skipped


def _keep_traceback(target: Path) -> str:
    try:
        target.mkdir(parents=True, exist_ok=True)
        atomic_write(target / ERROR_FILE, traceback.format_exc())
        return f" (traceback: {target / ERROR_FILE})"
    except OSError:
        return ""


def skipped_table(skipped: list, total: int) -> str:
    width = max(len(str(run)) for run, _ in skipped)
    return "\n".join([f"skipped {len(skipped)} of {total} runs:",
                      f"  {'run':{width}}  why"] +
                     [f"  {str(run):{width}}  {why}" for run, why in skipped])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnexp.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="a run directory, or a directory above runs")
    parser.add_argument("--out", type=Path, required=True, help="where the new records go")
    parser.add_argument("overrides", nargs="*", help="evaluation knobs, key=value")
    args = parser.parse_intermixed_args(argv)  # overrides before or after --out
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_overrides(args.overrides)
        if not args.runs.is_dir():
            raise CnexpError(f"{args.runs} is not a directory")
    except CnexpError as err:
        print(err, file=sys.stderr)
        return 2
    evaluated, skipped = evaluate_tree(args.runs, args.out, args.overrides)
    if skipped:
        print(skipped_table(skipped, evaluated + len(skipped)), file=sys.stderr)
    if not evaluated:
        print(f"no finished run below {args.runs} could be evaluated", file=sys.stderr)
        return 2
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
