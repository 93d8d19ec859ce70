"""A run, built and fitted: `build_run` makes every component from the config (listed by `Run`),
`train` fits it, then records, exports and reports; `build_model` is what cnexp.plan times."""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cnexp.base import BaseBundle, load_base
from cnexp.control import Branch, build_controlnet
from cnexp.control.base_damage import BaseDamageCallback
from cnexp.data.datamodule import TriplesDataModule
from cnexp.device import describe, resolve_device
from cnexp.encode_cache import FrozenEncoderCache
from cnexp.encode_store import DiskEncoderCache, tokenizer_digest, weights_digest
from cnexp.families.family import BaseFamily, get_family
from cnexp.fileio import atomic_write
from cnexp.finite import NonFiniteGuard
from cnexp.metrics.callbacks import EvaluationCallback, build_evaluation
from cnexp.module import ControlNetModule
from cnexp.precision import resolve_frozen_dtype, store_frozen
from cnexp.progress import StepProgressBar
from cnexp.quiet import quiet_weight_loading_bars
from cnexp.run.checkpoint_io import SafeCheckpointIO
from cnexp.run.checkpoints import RunCheckpoints
from cnexp.run.context import apply_slurm_resources, is_rank_zero, set_threads
from cnexp.run.identity import run_identity
from cnexp.run.log import RunLog
from cnexp.run.naming import wandb_identity
from cnexp.run.record import (CHECKPOINT_DIR, CONFIG_FILE, CSV_FILE, WANDB_ID_FILE, RunMetrics,
                              write_metrics)
from cnexp.run.resume import Start, decide_start, load_warm_weights
from cnexp.run.signals import StopAtStepEnd, StopSignals
from cnexp.validate import validate

log = logging.getLogger("cnexp")




def build_loggers(cfg: DictConfig, out_dir: Path) -> list:
    """W&B (csv/metrics.csv is written from the run's record by RunLog, not by a logger)."""
    mode = cfg.logger.mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return []
    # one W&B run per run directory: a resumed run continues it under the same id
    id_file = out_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    if not run_id:
        run_id = uuid.uuid4().hex[:12]  # W&B run ids: letters and digits
        if is_rank_zero():
            atomic_write(id_file, run_id + "\n")
    # group = sweep or ablation, name = <ablation>-s<seed>, tags = knobs off baseline; W&B's own
    # banner and closing summary stay off (report() says where the run went), its warnings on
    # (docs/evaluation.md): offline, its hint `wandb online` would not apply (mode is passed here)
    logger = WandbLogger(project=cfg.logger.project, save_dir=str(out_dir), id=run_id,
                         resume="allow", offline=mode == "offline", **wandb_identity(cfg),
                         config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                         settings={"silent": True} if mode == "offline" else {"quiet": True})
    # Lightning always passes anonymous=None, which recent wandb warns has no effect
    logger._wandb_init.pop("anonymous", None)
    return [logger]


def apply_speed_options(trainer_cfg, base, controlnet) -> None:
    """trainer.tf32 / gradient_checkpointing (docs/performance.md measures them; trainer.compile
    acts in ControlNetModule, on the training forward only)."""
    if trainer_cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if trainer_cfg.gradient_checkpointing:
        # the frozen UNet's activations are kept for backward too: the residuals flow through it
        for model in (controlnet, base.unet):
            if getattr(model, "_supports_gradient_checkpointing", False):
                model.enable_gradient_checkpointing()


def build_cache(cache_cfg, cache_root: str, base) -> FrozenEncoderCache:
    """The frozen-encoder cache that cache.* asks for (docs/gpu.md)."""
    conditions = cache_cfg.conditions and get_family(base.family).control_reads_latents
    kwargs = dict(latents=cache_cfg.latents, text=cache_cfg.text, fill_batch=cache_cfg.fill_batch,
                  fill_workers=cache_cfg.fill_workers, conditions=conditions)
    if cache_cfg.store == "memory" or not (cache_cfg.latents or cache_cfg.text or conditions):
        return FrozenEncoderCache(**kwargs)
    # the base's part of the disk key: the encoders' weights (content, dtype) and tokenizer
    base_key = {name: tokenizer_digest(part) if name.startswith("tokenizer")
                else weights_digest(part)
                for name, part in get_family(base.family).encoders(base).items()}
    root = cache_cfg.dir or str(Path(cache_root) / "encoders")
    return DiskEncoderCache(root, base_key, **kwargs)


@dataclass
class Model:
    """What trains: the frozen base (its family says how it is used), the branch and its
    network, and the LightningModule that joins them."""
    base: BaseBundle
    family: BaseFamily
    branch: Branch
    controlnet: nn.Module
    module: ControlNetModule


def build_model(cfg: DictConfig, frozen_dtype: torch.dtype,
                cache: FrozenEncoderCache | None = None) -> Model:
    """The base, the control branch on it and the module, as a run trains them (cnexp.plan's
    step timing builds the same)."""
    base = load_base(cfg.base)
    family = get_family(base.family)
    branch = family.branch(cfg.control.branch)
    controlnet = build_controlnet(family.denoiser(base), cfg.control, branch)
    apply_speed_options(cfg.trainer, base, controlnet)
    # the copy then starts from the base as stored, so step 0's copy drift is exactly 0
    store_frozen((*family.frozen(base), controlnet), frozen_dtype,
                 copies=branch.copied_from_base(controlnet, family.denoiser(base)))
    if cache is None:
        cache = FrozenEncoderCache(latents=False, text=False)
    elif callable(cache):  # built from the base it caches
        cache = cache(base)
    module = ControlNetModule(base, controlnet, cfg.optim, seed=cfg.seed, cache=cache,
                              compiled=cfg.trainer.compile, branch=branch)
    return Model(base, family, branch, controlnet, module)


@dataclass
class Run:
    """Everything a run is made of, built before anything trains (`build_run`), in the order
    `train` uses it."""
    cfg: DictConfig
    out_dir: Path
    started: float  # perf_counter at the build's start: the record's wall time
    start: Start  # resume, warm start or fresh (cnexp/run/resume.py)
    model: Model
    data: TriplesDataModule
    evaluation: EvaluationCallback
    damage: BaseDamageCallback
    run_log: RunLog  # the record that checkpoints carry: losses and fit time
    loggers: list
    trainer: L.Trainer


def build_run(cfg: DictConfig, signals: StopSignals | None = None) -> Run:
    """Check the config, decide how the run starts, build its model, data, callbacks and
    trainer. `signals`: run.py's stop-signal handlers (pre-emption, Ctrl-C); None outside it."""
    identity = run_identity(cfg)  # what its checkpoints carry: the knobs as the run was given
    apply_slurm_resources(cfg)  # under hydra/launcher=slurm the job's GPUs choose the devices
    validate(cfg)
    quiet_weight_loading_bars()  # transformers' bar per encoder read from disk
    started = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # before anything heavy: a wrong checkpoint, or one of another run, fails now
    start = decide_start(cfg, out_dir, identity)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in the run's name
    device = resolve_device(cfg.trainer)  # trainer=auto: this machine's GPU or CPU, once
    if device.accelerator == "cpu" and isinstance(device.devices, int):
        # CPU processes share the cores: n processes on n cores must not each spawn n threads
        set_threads(max(1, torch.get_num_threads() // max(1, device.devices)))
    frozen_dtype = resolve_frozen_dtype(cfg.trainer)
    if is_rank_zero():
        log.info(describe(device, frozen_dtype))
    model = build_model(cfg, frozen_dtype,
                        cache=lambda base: build_cache(cfg.cache, cfg.paths.cache, base))
    if start.warm:
        load_warm_weights(model.module, start)
    # the tokenizer: setup warns once about captions it cannot carry whole
    prompts = (cfg.eval.insufficient_prompt,) if cfg.eval.enabled else ()
    data = TriplesDataModule(cfg.data, seed=cfg.seed, tokenizer=model.base.tokenizer,
                             prompts=prompts)
    data.prepare_data()
    evaluation = build_evaluation(cfg, data, out_dir)
    loggers = build_loggers(cfg, out_dir)
    damage = BaseDamageCallback(evaluation.batch)
    run_log = RunLog(cfg.trainer.log_every_n_steps,
                     out_dir / CSV_FILE if cfg.logger.csv else None,
                     lambda: evaluation.history)
    run_log.warm_start = start.warm  # a resume's checkpoint restores the run's own
    trainer = build_trainer(cfg, device, model.module, identity, out_dir, signals, loggers,
                            evaluation, [damage, evaluation, run_log])
    return Run(cfg, out_dir, started, start, model, data, evaluation, damage, run_log, loggers,
               trainer)


def build_trainer(cfg: DictConfig, device, module, identity: dict, out_dir: Path,
                  signals: StopSignals | None, loggers: list, evaluation: EvaluationCallback,
                  record: list) -> L.Trainer:
    """Lightning's Trainer with the run's callbacks: `record` (base damage, evaluation, run log)
    first, then checkpoints, the non-finite guard, the stop at a step's end and the bar."""
    ckpt_dir = out_dir / CHECKPOINT_DIR
    every = cfg.trainer.checkpoint_every_n_steps or max(1, cfg.trainer.max_steps // 4)
    checkpoints = RunCheckpoints(ckpt_dir, every, identity)  # last.ckpt: a link, one write
    guards = [NonFiniteGuard(cfg.trainer.on_nonfinite, ckpt_dir, cfg.trainer.gradient_clip_val)]
    # after the evaluation and the record in each step, so a stop saves both
    stop = [StopAtStepEnd(signals, ckpt_dir)] if signals is not None else []
    bar = [StepProgressBar(lambda: evaluation.seconds)] if cfg.trainer.enable_progress_bar else []
    return L.Trainer(
        max_steps=cfg.trainer.max_steps, accelerator=device.accelerator,
        devices=device.devices, precision=device.precision,
        strategy=cfg.trainer.strategy, num_nodes=cfg.trainer.num_nodes,
        use_distributed_sampler=False,  # the data module deals global batches to the ranks
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=None,  # the finite guard clips, reusing its gradient norm
        log_every_n_steps=cfg.trainer.log_every_n_steps, fast_dev_run=cfg.trainer.fast_dev_run,
        enable_progress_bar=cfg.trainer.enable_progress_bar, logger=loggers or False,
        enable_model_summary=False,  # Lightning's parameter table (docs/evaluation.md)
        callbacks=[*record, checkpoints, *guards, *stop, *bar],
        # atomic saves, resume checks the keys; on SLURM, cnexp's signals own the save and the
        # requeue is submitit's (docs/slurm.md), so Lightning's own requeue stays off
        plugins=[SafeCheckpointIO(module),
                 *([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])],
        limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=str(out_dir), deterministic=False)


def train(cfg: DictConfig, signals: StopSignals | None = None) -> dict:
    """The whole experiment: build the run, fit it, record, export and report. Returns (and
    writes to metrics.json) the run's summary."""
    run = build_run(cfg, signals)
    run.trainer.fit(run.model.module, datamodule=run.data, ckpt_path=run.start.resume)
    record = run_record(run)
    trainer, out_dir, model = run.trainer, run.out_dir, run.model
    if trainer.is_global_zero:
        if cfg.export:
            model.branch.export(model.controlnet, out_dir / "controlnet")
            if not cfg.control.sd_locked:  # part of the base trained too
                model.family.export_unlocked(model.base, out_dir)
        OmegaConf.save(cfg, out_dir / CONFIG_FILE, resolve=True)
        record.wall_seconds = round(time.perf_counter() - run.started, 1)
        write_metrics(out_dir, record)
    summary = record.to_json()
    if trainer.is_global_zero:
        report(out_dir, summary, run.loggers)
    for lg in run.loggers:
        if isinstance(lg, WandbLogger):
            # step 0 beside the final values; not a wandb.Table, whose artifact leaves its
            # temporary directory to the garbage collector (a ResourceWarning, wandb#5258)
            lg.experiment.summary.update({**summary["final"], "step0": summary["step0"]})
            lg.experiment.finish()  # one W&B run per job, never merged across a sweep
    return summary


def run_record(run: Run) -> RunMetrics:
    """metrics.json's content once the fit has ended."""
    fit_seconds = run.run_log.fit_seconds  # every segment of a resumed run
    evaluation, history = run.evaluation, run.evaluation.history
    return RunMetrics(
        ablation=run.cfg.ablation, seed=run.cfg.seed, steps=run.trainer.global_step,
        history=history, step0=history[0] if history else {},
        final=history[-1] if history else {}, sudden_convergence=evaluation.sudden,
        base_damage_step0=run.damage.value, controlnet_class=type(run.model.controlnet).__name__,
        final_loss=float(run.trainer.callback_metrics.get("train/loss", torch.nan)),
        fit_seconds=round(fit_seconds, 1), eval_seconds=round(evaluation.seconds, 1),
        eval_share=round(evaluation.seconds / max(fit_seconds, 1e-9), 3),
        losses=run.run_log.losses, resumed_at=run.run_log.resumed_at,
        final_images=evaluation.final_images, data_check=run.data.data_check,
        warm_start=run.run_log.warm_start)


def report(out_dir: Path, summary: dict, loggers: list) -> None:
    s0, s1 = summary["step0"], summary["final"]
    # fit and evaluation time alike cover the whole run: a resume adds its checkpoint's figures
    whole = " over all its segments" if summary["resumed_at"] else ""
    lines = [
        f"cnexp run finished: {summary['steps']} steps in {summary['fit_seconds']}s{whole} "
        f"(evaluation {summary['eval_share']:.0%} of it)",
        "  perfect prompt    " + "   ".join(  # headline metrics (eval/<metric>)
            f"{k[5:]} {s0[k]:.3f} -> {s1[k]:.3f}" for k in s1
            if k.count("/") == 1 and "seconds" not in k and k in s0) + "   (step 0 -> final)",
        *(f"  sudden converg.   {m} crosses {c['threshold']} at step {c['step']}, steepest "
          f"rise at step {c['steepest_rise_step']}"
          for m, c in summary["sudden_convergence"].items()),
        *([f"  resumed at step   {', '.join(map(str, summary['resumed_at']))}"]
          if summary["resumed_at"] else []),
        f"  run directory     {out_dir}",
        f"  controlnet        {out_dir / 'controlnet'}  ({summary['controlnet_class']}"
        ".from_pretrained)",
        f"  sample grids      {out_dir / 'samples'}/<prompt setting>  (condition | sample | real)",
        f"  metrics           {out_dir / 'metrics.json'}, {out_dir / 'csv' / 'metrics.csv'}",
    ]
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        lines.append(f"  wandb             {out_dir / 'wandb'}  (offline: `wandb sync` it)")
    print("\n".join(lines), flush=True)
