"""What every arm's test does: train a few steps on the tiny world through train(), evaluate,
export, and load the export back through its branch (tests/test_arm_*.py)."""
from __future__ import annotations

import json

import torch

from cnexp.analysis.runs import OK, read_run
from cnexp.control import get_branch
from cnexp.train import train
from conftest import compose_cfg

FEW_STEPS = ["data.train_size=16", "data.val_size=4", "data.test_size=4", "data.batch_size=4",
             "data.eval_size=2", "trainer.max_steps=2", "sampling.steps=2",
             "eval.prompt_settings=[perfect]", "eval.fid=false", "eval.clip_score=false",
             "eval.curve_images=2", "logger.mode=disabled", "logger.csv=false",
             "trainer.enable_progress_bar=false"]


def train_arm(tmp_path, overrides: list[str]):
    """(summary, the exported network loaded back, the composed config)."""
    cfg = compose_cfg([f"data.root={tmp_path / 'data'}", *FEW_STEPS, *overrides],
                      out_dir=tmp_path / "run")
    summary = train(cfg)
    assert summary["steps"] == 2
    assert "eval/perfect/shape_iou" in summary["final"]  # sampled through its pipeline
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2
    record = read_run(tmp_path / "run")  # what sweep reports and compare read
    assert record.status == OK and "eval/perfect/shape_iou" in record.final, record.error
    loaded = get_branch(cfg.control.branch).load(tmp_path / "run" / "controlnet")
    return summary, loaded, cfg


def unet_inputs(seed=0):
    """(noisy latents, timesteps, text embeddings, conditions) of the tiny base's shapes."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([5, 600]),
            torch.randn(2, 77, 64, generator=generator),
            torch.rand(2, 3, 64, 64, generator=generator))


def per_sample(x):
    """Per-sample mean and std (what cross_norm matches)."""
    return x.mean((1, 2, 3)), x.std((1, 2, 3))
