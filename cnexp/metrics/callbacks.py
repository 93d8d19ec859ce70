"""Evaluation during training: sample the fixed evaluation set, score it, log grids.

Two kinds of evaluation, both on the data module's fixed evaluation set with fixed sampler seeds
(image i always starts from the noise of seed + i), so runs, seeds and ablations are paired:
- full (step 0 unless eval.full_at_start=false, every eval.full_every_n_steps, the end): every
  prompt setting of the paper, each scored for control fidelity and by the run's sample metrics
  (CLIP score, FID, ...: cnexp/metrics/registry.py) -> eval/<setting>/<metric>, plus the
  perfect prompt's values as the headline eval/<metric>, and one grid PNG per setting;
- curve (every eval.every_n_steps, and at each full evaluation): control fidelity of the first
  eval.curve_images samples under the perfect prompt -> eval/curve/<metric>; the curve that
  sudden convergence is read from at the end;
- copy drift (eval/copy_drift, every evaluation): how far the trainable copy has moved from the
  base weights it was copied from (cnexp/metrics/drift.py).
The last full evaluation also keeps each image's fidelity scores (`final_images`), from which
compare separates image-to-image from seed-to-seed variance.
Under DDP each rank samples a contiguous block of the set; torchmetrics syncs the metric states
and only rank zero logs and writes files.
"""
from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from torchmetrics import MeanMetric
from torchvision.utils import make_grid, save_image

from cnexp.config import EvalConfig, SamplingConfig
from cnexp.errors import ConfigError
from cnexp.fileio import atomic_write
from cnexp.metrics.convergence import sudden_convergence
from cnexp.metrics.drift import CopyDrift
from cnexp.metrics.pixels import to_uint8
from cnexp.metrics.fidelity import FIDELITY, Annotate, fidelity_kind, fidelity_scores
from cnexp.metrics.prompts import prompt_settings
from cnexp.metrics.registry import SampleMetric, Samples, selected_metrics
from cnexp.precision import frozen_autocast
from cnexp.sampling import generate, make_pipeline, make_scheduler

log = logging.getLogger("cnexp")
CURVE = "curve"
HEADLINE_SETTING = "perfect"


def block(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous share [lo, hi) of n items that `rank` of `world` evaluates."""
    return n * rank // world, n * (rank + 1) // world


def synced_mean(values: list[float], device: torch.device) -> float:
    """Mean over all ranks' values (torchmetrics syncs the sums when it computes)."""
    mean = MeanMetric(sync_on_compute=True).to(device)
    if values:
        mean.update(torch.tensor(values, dtype=torch.float32, device=device))
    return float(mean.compute())


def gathered(values: list[float]) -> list[float]:
    """Every rank's values, concatenated in rank order (this rank's alone without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


def check_config(cfg: EvalConfig, fidelity: str) -> None:
    """eval.convergence_metric against the fidelity (the ranges: cnexp/validate.py)."""
    metrics = FIDELITY[fidelity].metrics
    if cfg.convergence_metric not in (None, *metrics):
        raise ConfigError(f"eval.convergence_metric is {cfg.convergence_metric!r}; the {fidelity} "
                          f"fidelity reports {list(metrics)} (override it: python run.py "
                          "eval.convergence_metric=...)")


class EvaluationCallback(L.Callback):
    """Schedules and runs the evaluations (see the module docstring); keeps their history."""

    def __init__(self, eval_batch: dict, sampling: SamplingConfig, cfg: EvalConfig,
                 out_dir: Path, fidelity: str = "outline", annotate: Optional[Annotate] = None,
                 metrics: Sequence[SampleMetric] = ()):
        """metrics: the sample metrics to score full evaluations with, loaded (build_evaluation);
        those needing more images than the evaluation set holds are left out."""
        check_config(cfg, fidelity)
        self.batch, self.sampling, self.cfg = eval_batch, sampling, cfg
        self.out_dir = Path(out_dir)
        self.fidelity, self.annotate = fidelity, annotate
        self.history: list[dict] = []
        self.seconds = 0.0
        self.sudden: dict = {}
        self.final_images: dict[str, list[float]] = {}  # the last full evaluation's, per image
        n = len(eval_batch["caption"])
        self.num_images = min(cfg.num_images or n, n)
        self.curve_images = min(cfg.curve_images, self.num_images)
        self.metrics = [m for m in metrics if self.num_images >= m.min_images]
        self.settings = prompt_settings(eval_batch["caption"][:self.num_images],
                                        list(cfg.prompt_settings), cfg.insufficient_prompt,
                                        cfg.conflict_shift)
        self._last_step: Optional[int] = None
        self._last_full_step: Optional[int] = None
        self._pipe = None  # (module, pipeline): one per run, built at the first evaluation
        self.copy_drift = CopyDrift()  # keeps the frozen base's norm across evaluations

    # ---- checkpoint state: a resumed run continues the history from the true step 0 ----------
    def state_dict(self) -> dict:
        return {"history": list(self.history), "seconds": self.seconds,
                "last_step": self._last_step, "last_full_step": self._last_full_step,
                "final_images": dict(self.final_images)}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        self.final_images = dict(state.get("final_images", {}))
        self.seconds = float(state["seconds"])
        self._last_step, self._last_full_step = state["last_step"], state["last_full_step"]

    # ---- schedule -----------------------------------------------------------------------------
    def on_train_start(self, trainer, module) -> None:
        if self.cfg.enabled and trainer.global_step == 0:  # a resumed run evaluated step 0
            self.evaluate(trainer, module, full=self.cfg.full_at_start)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.cfg.enabled or step >= trainer.max_steps > 0 or step == self._last_step:
            return  # the end is on_train_end's
        full = self.cfg.full_every_n_steps > 0 and step % self.cfg.full_every_n_steps == 0
        curve = self.cfg.every_n_steps > 0 and step % self.cfg.every_n_steps == 0 and \
            self.curve_images > 0
        if full or curve:
            self.evaluate(trainer, module, full=full)

    def on_train_end(self, trainer, module) -> None:
        if not self.cfg.enabled:
            return
        if trainer.global_step != self._last_full_step:
            self.evaluate(trainer, module, full=True)
        self.sudden = self.sudden_convergence()
        self.log_summary(trainer)

    # ---- sampling and scoring -----------------------------------------------------------------
    @torch.no_grad()
    def sample(self, module, prompts: list[str], lo: int, hi: int) -> torch.Tensor:
        """Images lo..hi-1 of the evaluation set under `prompts` (one per image of the set)."""
        sampling = self.sampling
        if not any(prompts[lo:hi]):
            # all prompts empty: guidance mixes two equal predictions, so skipping it gives the
            # same images at half the cost
            sampling = OmegaConf.merge(sampling, {"guidance_scale": 1.0})
        pipe = self.pipeline(module)
        chunks = [torch.empty(0, 3, *self.batch["condition"].shape[-2:], device=module.device)]
        for start in range(lo, hi, self.cfg.batch_size):
            stop = min(start + self.cfg.batch_size, hi)
            with frozen_autocast(module):  # a half-precision base meets the fp32 branch
                chunks.append(generate(pipe, self.batch["condition"][start:stop],
                                       prompts[start:stop], sampling, first_index=start))
        return torch.cat(chunks)

    def pipeline(self, module):
        """The run's sampling pipeline: built once (it shares the module's weights, which train
        in place); each use gets a fresh scheduler, so every evaluation samples bitwise as a
        newly built pipeline would (a multistep scheduler keeps state between calls)."""
        if self._pipe is None or self._pipe[0] is not module:
            self._pipe = (module, make_pipeline(module, self.sampling, progress=False))
        else:
            self._pipe[1].scheduler = make_scheduler(module, self.sampling)
        return self._pipe[1]

    def score_fidelity(self, images: torch.Tensor, lo: int, prefix: str, device,
                       per_image: Optional[dict] = None) -> dict:
        """Mean fidelity of images lo.. of the set; every rank calls it, with or without images.
        per_image: filled with every image's scores, in the set's order over all ranks."""
        # a restyled tiny-world condition (data.condition_style) is scored against the outline
        conditions = self.batch.get("outline", self.batch["condition"])[lo:lo + len(images)]
        scores = fidelity_scores(images, conditions, self.fidelity, self.annotate) \
            if len(images) else {}
        names = FIDELITY[self.fidelity].metrics
        if per_image is not None:
            per_image.update({f"{prefix}/{name}": gathered(scores.get(name, [])) for name in names})
        return {f"{prefix}/{name}": synced_mean(scores.get(name, []), device) for name in names}

    def _build_metrics(self, trainer, device) -> None:
        for metric in self.metrics:  # built at the first evaluation, on the model's device
            metric.prepare(device, holds_reference=trainer.is_global_zero)

    def score_full(self, images: torch.Tensor, setting: str, lo: int, device,
                   per_image: dict) -> dict:
        prefix = f"eval/{setting}"
        metrics = self.score_fidelity(images, lo, prefix, device, per_image)
        hi = lo + len(images)
        samples = Samples(setting, images, to_uint8(images), list(self.batch["caption"][lo:hi]),
                          list(self.settings[setting][lo:hi]))
        for metric in self.metrics:
            scores = metric.score(samples.given(metric.needs))
            metrics.update({f"{prefix}/{key}": value for key, value in scores.items()})
        return metrics

    def evaluate(self, trainer, module, full: bool) -> dict:
        start = time.perf_counter()
        step, device = trainer.global_step, module.device
        rank, world = trainer.global_rank, trainer.world_size
        metrics, grids = {}, {}
        if full:
            self._build_metrics(trainer, device)
            lo, hi = block(self.num_images, rank, world)
            per_image: dict[str, list[float]] = {}
            for setting, prompts in self.settings.items():
                images = self.sample(module, prompts, lo, hi)
                metrics.update(self.score_full(images, setting, lo, device, per_image))
                grids[setting] = (images, lo)
            self.final_images = per_image
            if HEADLINE_SETTING in self.settings:
                prefix = f"eval/{HEADLINE_SETTING}/"
                metrics.update({"eval/" + k[len(prefix):]: v for k, v in list(metrics.items())
                                if k.startswith(prefix)})
            self._last_full_step = step
        if self.curve_images == 0:
            pass  # no curve: eval.curve_images=0
        elif HEADLINE_SETTING in grids:  # the curve's images: this rank's share of the first
            images, lo = grids[HEADLINE_SETTING]
            curve = images[:max(0, min(len(images), self.curve_images - lo))]
            metrics.update(self.score_fidelity(curve, lo, f"eval/{CURVE}", device))
        else:
            lo, hi = block(self.curve_images, rank, world)
            curve = self.sample(module, self.batch["caption"], lo, hi)
            grids[HEADLINE_SETTING] = (curve, lo)
            metrics.update(self.score_fidelity(curve, lo, f"eval/{CURVE}", device))
        drift = self.copy_drift(module.branch.copied_from_base(module.controlnet, module.unet))
        if drift is not None:
            metrics["eval/copy_drift"] = drift
        self.seconds += time.perf_counter() - start
        metrics["eval/seconds_total"] = self.seconds
        self.history.append({"step": step, **metrics})
        self._last_step = step
        self.log_results(trainer, step, metrics, grids)
        return metrics

    # ---- results ------------------------------------------------------------------------------
    def sudden_convergence(self) -> dict:
        """{metric: sudden_convergence(...)} for eval.convergence_metric on the curve."""
        fidelity = FIDELITY[self.fidelity]
        name = self.cfg.convergence_metric or fidelity.headline
        key = f"eval/{CURVE}/{name}"
        points = {row["step"]: row[key] for row in self.history if key in row}  # last per step
        if not points:
            return {}
        steps = sorted(points)
        return {name: sudden_convergence(steps, [points[s] for s in steps],
                                         self.cfg.convergence_threshold,
                                         fidelity.higher_is_better)}

    @rank_zero_only
    def log_results(self, trainer, step: int, metrics: dict, grids: dict) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for setting, (images, lo) in grids.items():
            if lo != 0 or not len(images):
                continue
            rows = min(self.cfg.grid_rows, len(images))
            # each row: condition | sample | real image (the condition's ground truth)
            tiles = torch.stack([self.batch["condition"][:rows], images[:rows].cpu(),
                                 (self.batch["image"][:rows] + 1) / 2], dim=1).flatten(0, 1)
            grid = make_grid(tiles, nrow=3, padding=2, pad_value=0.5)
            path = self.out_dir / "samples" / setting / f"step_{step:06d}.png"
            png = io.BytesIO()
            save_image(grid, png, format="png")
            atomic_write(path, png.getvalue())  # a full disk: one message, no half image
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(f"samples/{setting}", [grid], step=step,
                                     caption=[f"step {step}, {setting} prompt: "
                                              "condition | sample | real"])

    @rank_zero_only
    def log_summary(self, trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and self.sudden:
                logger.experiment.summary["sudden_convergence"] = self.sudden


def build_evaluation(cfg, data, out_dir: Path) -> EvaluationCallback:
    """The evaluation callback of a run config (cnexp.config.TrainConfig) and its data module.
    Loads what can fail (annotator, each selected metric's network) now, before training
    starts; with eval.enabled=false none of them (the callback then only holds the evaluation
    batch, which the base-damage check uses)."""
    ev = cfg.eval
    eval_batch = data.eval_batch()  # sets the data module up
    annotator = cfg.data.annotator
    kind = fidelity_kind(ev.fidelity, annotator)
    if not ev.enabled:
        return EvaluationCallback(eval_batch, cfg.sampling, ev, out_dir, fidelity=kind)
    metrics = selected_metrics(cfg)
    n = len(eval_batch["caption"])
    # data.eval_size larger than the split is fitted (and said) by the data's setup
    skipped = [f"{m.name} needs {m.min_images} images and is skipped" for m in metrics
               if n < m.min_images]
    if skipped:
        log.warning("eval: the evaluation set has %d image(s): %s", n, "; ".join(skipped))
    annotate = None
    if FIDELITY[kind].needs_annotator:
        from cnexp.data.annotators import get_annotator

        annotate = get_annotator(annotator, pretrained=cfg.data.annotator_path,
                                 **dict(cfg.data.annotator_params or {}))
    for metric in metrics:
        metric.load(cfg, data)
    return EvaluationCallback(eval_batch, cfg.sampling, ev, out_dir, fidelity=kind,
                              annotate=annotate, metrics=metrics)
