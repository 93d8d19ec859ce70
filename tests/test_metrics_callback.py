"""The evaluation callback: its sampling shortcuts, its DDP split, a real one-step run."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from cnexp.config import EvalConfig
from cnexp.control import build_controlnet
from cnexp.metrics.callbacks import EvaluationCallback, block
from cnexp.metrics.prompts import SETTINGS
from cnexp.module import ControlNetModule
from cnexp.sampling import generate, make_pipeline

from conftest import TINY, compose_cfg


def test_ranks_share_the_evaluation_set_in_contiguous_blocks():
    for n, world in [(32, 1), (32, 3), (5, 8)]:
        blocks = [block(n, rank, world) for rank in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(hi == lo for (_, hi), (lo, _) in zip(blocks, blocks[1:]))


@pytest.mark.skipif(not (TINY / "model_index.json").exists(),
                    reason="needs the tiny world bundle at assets/tinyworld")
def test_the_no_prompt_setting_samples_without_guidance_and_gets_the_same_images(
        tiny_cfg, tiny_base, tmp_path):
    """The callback samples the empty-prompt setting at guidance 1 (half the cost): guidance
    mixes two equal predictions there, so the images must not change."""
    module = ControlNetModule(tiny_base, build_controlnet(tiny_base.unet, tiny_cfg.control),
                              tiny_cfg.optim)
    conditions = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    guided = OmegaConf.merge(tiny_cfg.sampling, {"guidance_scale": 3.0, "steps": 3})
    batch = {"condition": conditions, "image": conditions * 2 - 1, "caption": ["x", "y"]}
    callback = EvaluationCallback(batch, guided, OmegaConf.structured(EvalConfig()), tmp_path)
    a = generate(make_pipeline(module, guided, False), conditions, ["", ""], guided)
    b = callback.sample(module, ["", ""], 0, 2)
    assert (a - b).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not (TINY / "model_index.json").exists(),
                    reason="needs the tiny world bundle at assets/tinyworld "
                           "(python -m cnexp.tinyworld.build)")
def test_fast_dev_run_with_evaluation_writes_metrics_json_and_grids(tmp_path):
    from cnexp.train import train

    out = tmp_path / "run"
    cfg = compose_cfg(["data.train_size=32", "data.val_size=8", "data.test_size=8",
                       f"data.root={tmp_path / 'data'}", "data.batch_size=4", "data.eval_size=4",
                       "sampling.steps=2", "logger.mode=disabled", "logger.csv=false",
                       "trainer.fast_dev_run=true", "export=false",
                       f"paths.cache={tmp_path / 'cache'}"], out_dir=out)
    train(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    for setting in SETTINGS:
        for name in ("shape_iou", "edge_f1", "clip_score", "fid"):
            assert f"eval/{setting}/{name}" in final
        assert (out / "samples" / setting / f"step_{metrics['steps']:06d}.png").is_file()
        assert (out / "samples" / setting / "step_000000.png").is_file()
    assert final["eval/shape_iou"] == final["eval/perfect/shape_iou"]
    assert "eval/conflicting/clip_score_prompt" in final and "eval/curve/shape_iou" in final
    assert metrics["step0"]["step"] == 0
    assert metrics["sudden_convergence"]["shape_iou"]["threshold"] == cfg.eval.convergence_threshold
    assert list((tmp_path / "cache" / "fid_reference").glob("*.pt"))  # cached for the next run
