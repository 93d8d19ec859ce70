"""Evaluation during training: sample the fixed evaluation set, score it, log a grid."""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from cnexp.config import EvalConfig, SamplingConfig
from cnexp.metrics.fidelity import control_fidelity
from cnexp.sampling import generate, make_pipeline


class EvaluationCallback(L.Callback):
    """At step 0, every `every_n_steps` and at the end: control fidelity + a sample grid.

    The evaluation batch and the sampler seeds are fixed, so every run sees the same conditions,
    prompts and initial noise, and step 0 shows the untouched base (zero connectors).
    """

    def __init__(self, eval_batch: dict, sampling: SamplingConfig, cfg: EvalConfig, out_dir: Path):
        self.batch = eval_batch
        self.sampling = sampling
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.history: list[dict] = []
        self.seconds = 0.0

    def on_train_start(self, trainer, module) -> None:
        self.evaluate(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        every = self.cfg.every_n_steps
        if every and trainer.global_step % every == 0 and trainer.global_step < trainer.max_steps:
            self.evaluate(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.evaluate(trainer, module)

    @torch.no_grad()
    def sample(self, module) -> torch.Tensor:
        pipe = make_pipeline(module, self.sampling)
        conditions, prompts = self.batch["condition"], self.batch["caption"]
        chunks = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            stop = start + self.cfg.batch_size
            chunks.append(generate(pipe, conditions[start:stop], prompts[start:stop],
                                   self.sampling, first_index=start).cpu())
        return torch.cat(chunks)

    def evaluate(self, trainer, module) -> dict:
        start = time.perf_counter()
        step = trainer.global_step
        images = self.sample(module)
        metrics = {f"eval/{k}": v for k, v in control_fidelity(images, self.batch["condition"]).items()}
        self.seconds += time.perf_counter() - start
        metrics["eval/seconds_total"] = self.seconds
        self.history.append({"step": step, **metrics})
        self.log_results(trainer, step, metrics, images)
        return metrics

    @rank_zero_only
    def log_results(self, trainer, step: int, metrics: dict, images: torch.Tensor) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        grid_path = self.out_dir / "samples" / f"step_{step:06d}.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        rows = min(self.cfg.grid_rows, len(images))
        # Each row: condition | sample | real image (the condition's ground truth).
        tiles = torch.stack([self.batch["condition"][:rows], images[:rows],
                             (self.batch["image"][:rows] + 1) / 2], dim=1).flatten(0, 1)
        grid = make_grid(tiles, nrow=3, padding=2, pad_value=0.5)
        save_image(grid, grid_path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [grid], step=step,
                                 caption=[f"step {step}: condition | sample | real"])
