"""Evaluate finished runs again under other evaluation settings, without retraining:

    python -m cnexp.evaluate <run dir or sweep dir> --out DIR [key=value ...]
    e.g. ... data.eval_size=256 eval.prompt_settings=[none,insufficient]

Each finished run below the given directory is loaded from what it exported (`controlnet/`, and
`unet/` when its decoder trained) onto its own base, and its final evaluation is run again
exactly as training runs it (cnexp/metrics/callbacks.py), under the run's config with the
overrides. Only evaluation knobs may change (eval.*, sampling.*, data.eval_size): anything else
would describe another model. DIR/<the run's path below the given directory> receives a record
that compare reads like any other run's: the run's history with its last row replaced by the
new evaluation, `final_images`, `.hydra/` and `config.yaml` with the overrides, status.json
(saying what it was evaluated from), and the new sample grids. The runs themselves are only read.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from omegaconf import OmegaConf

from cnexp.config import TrainConfig
from cnexp.errors import CnexpError
from cnexp.fileio import atomic_write, atomic_write_json
from cnexp.record import METRICS_FILE, STATUS_FILE, finished_run, read_metrics, write_metrics

log = logging.getLogger("cnexp")
EVALUATION_KNOBS = ("eval.", "sampling.", "data.eval_size")


def check_overrides(overrides: list[str]) -> None:
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+")
        if "=" not in override or not key.startswith(EVALUATION_KNOBS):
            raise CnexpError(f"cannot re-evaluate with {override!r}: only evaluation knobs may "
                             "change (eval.*, sampling.*, data.eval_size, as key=value); another "
                             "knob would describe another model: train that instead")


def evaluate_run(run_dir: Path, out_dir: Path, overrides: list[str]) -> dict:
    """Evaluate one finished run under `overrides` into out_dir; returns the new final row."""
    from cnexp.base import load_base
    from cnexp.control import get_branch
    from cnexp.data.datamodule import TriplesDataModule
    from cnexp.metrics.callbacks import build_evaluation
    from cnexp.module import ControlNetModule

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not finished_run(run_dir) or not (run_dir / "config.yaml").exists():
        raise CnexpError(f"{run_dir} holds no finished run (status ok, metrics.json and "
                         "config.yaml): only finished runs can be evaluated again")
    if out_dir.resolve() == run_dir.resolve():
        raise CnexpError(f"--out must not be the run itself ({run_dir}): its record stays as is")
    start = time.perf_counter()
    # metrics.json is what marks a record complete (compare, find_run_dirs): an earlier
    # evaluation's goes first and the new one is written last, so an interrupted evaluation
    # leaves an incomplete record, never old numbers beside new settings
    (out_dir / METRICS_FILE).unlink(missing_ok=True)
    changes = OmegaConf.from_dotlist(overrides)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig),
                          OmegaConf.load(run_dir / "config.yaml"), changes)
    cfg.paths.output_dir = str(out_dir)
    L.seed_everything(cfg.seed)
    base = load_base(cfg.base)
    if (run_dir / "unet").is_dir():  # control.sd_locked=false: the decoder trained too
        base.unet = type(base.unet).from_pretrained(run_dir / "unet")
    branch = get_branch(cfg.control.branch)
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
    _copy_config(run_dir, out_dir, changes)
    atomic_write(out_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    status = json.loads((run_dir / STATUS_FILE).read_text())
    atomic_write_json(out_dir / STATUS_FILE, {
        **status, "evaluated_from": str(run_dir), "evaluation_overrides": overrides,
        "evaluation_seconds": round(time.perf_counter() - start, 1)})
    write_metrics(out_dir, replace(record, history=history, final=row,
                                   final_images=evaluation.final_images))
    return row


def _copy_config(run_dir: Path, out_dir: Path, changes) -> None:
    """The run's .hydra/ (what compare reads labels and knobs from), overrides applied."""
    hydra_dir = out_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    for name in ("hydra.yaml", "overrides.yaml"):
        if (run_dir / ".hydra" / name).exists():
            shutil.copyfile(run_dir / ".hydra" / name, hydra_dir / name)
    if (run_dir / ".hydra" / "config.yaml").exists():
        config = OmegaConf.merge(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), changes)
        atomic_write(hydra_dir / "config.yaml", OmegaConf.to_yaml(config))


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
        runs = sorted(p.parent for p in args.runs.rglob(METRICS_FILE)
                      if finished_run(p.parent) and args.out.resolve() not in p.resolve().parents)
        if not runs:
            raise CnexpError(f"no finished run below {args.runs}")
        for run in runs:
            target = args.out / run.relative_to(args.runs)
            row = evaluate_run(run, target, args.overrides)
            log.info("%s -> %s (%d metrics)", run, target, len(row) - 1)
    except CnexpError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
