"""Build everything from the config, train, evaluate, export; return the run's summary."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from cnexp.base import load_base
from cnexp.control import build_controlnet
from cnexp.data.datamodule import TriplesDataModule
from cnexp.metrics.callbacks import EvaluationCallback
from cnexp.module import ControlNetModule
from cnexp.validate import validate

log = logging.getLogger("cnexp")


def build_loggers(cfg: DictConfig, out_dir: Path) -> list:
    mode = cfg.logger.mode or os.environ.get("WANDB_MODE") or "offline"
    loggers = []
    if mode != "disabled":
        wandb_logger = WandbLogger(project=cfg.logger.project, group=cfg.logger.group,
                                   name=cfg.logger.name, save_dir=str(out_dir),
                                   offline=mode == "offline", job_type="train")
        wandb_logger.experiment.config.update(OmegaConf.to_container(cfg, resolve=True),
                                              allow_val_change=True)
        loggers.append(wandb_logger)
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
    return loggers


def train(cfg: DictConfig) -> dict:
    """The whole experiment. Returns (and writes to metrics.json) the run's summary."""
    validate(cfg)
    start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    base = load_base(cfg.base)
    controlnet = build_controlnet(base.unet, cfg.control)
    module = ControlNetModule(base, controlnet, cfg.optim, seed=cfg.seed)
    data = TriplesDataModule(cfg.data, seed=cfg.seed)
    data.prepare_data()
    evaluation = EvaluationCallback(data.eval_batch(), cfg.sampling, cfg.eval, out_dir)
    checkpoints = ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True,
                                  every_n_train_steps=max(1, cfg.trainer.max_steps // 4))
    loggers = build_loggers(cfg, out_dir)
    trainer = L.Trainer(
        max_steps=cfg.trainer.max_steps, accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices, precision=cfg.trainer.precision,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        log_every_n_steps=cfg.trainer.log_every_n_steps, fast_dev_run=cfg.trainer.fast_dev_run,
        enable_progress_bar=cfg.trainer.enable_progress_bar, logger=loggers or False,
        callbacks=[evaluation, checkpoints], limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=str(out_dir), deterministic=False)
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - fit_start

    summary = {"ablation": cfg.ablation, "seed": cfg.seed, "steps": trainer.global_step,
               "fit_seconds": round(fit_seconds, 1),
               "eval_seconds": round(evaluation.seconds, 1),
               "eval_share": round(evaluation.seconds / max(fit_seconds, 1e-9), 3),
               "final_loss": float(trainer.callback_metrics.get("train/loss", torch.nan)),
               "step0": evaluation.history[0], "final": evaluation.history[-1],
               "history": evaluation.history}
    if trainer.is_global_zero:
        if cfg.export:
            controlnet.save_pretrained(out_dir / "controlnet")
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
        summary["wall_seconds"] = round(time.perf_counter() - start, 1)
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
        report(out_dir, summary, loggers)
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.experiment.summary.update({k: v for k, v in summary["final"].items()})
            lg.experiment.finish()  # one W&B run per job, never merged across a sweep
    return summary


def report(out_dir: Path, summary: dict, loggers: list) -> None:
    s0, s1 = summary["step0"], summary["final"]
    lines = [
        f"cnexp run finished: {summary['steps']} steps in {summary['fit_seconds']}s "
        f"(evaluation {summary['eval_share']:.0%} of it)",
        f"  control fidelity  shape IoU {s0['eval/shape_iou']:.3f} -> {s1['eval/shape_iou']:.3f}"
        f"   edge F1 {s0['eval/edge_f1']:.3f} -> {s1['eval/edge_f1']:.3f}   (step 0 -> final)",
        f"  run directory     {out_dir}",
        f"  controlnet        {out_dir / 'controlnet'}  (ControlNetModel.from_pretrained)",
        f"  sample grids      {out_dir / 'samples'}  (condition | sample | real)",
        f"  metrics           {out_dir / 'metrics.json'}, {out_dir / 'csv' / 'metrics.csv'}",
    ]
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        lines.append(f"  wandb             {out_dir / 'wandb'}  (offline: `wandb sync` it)")
    print("\n".join(lines), flush=True)
