"""End to end: `python run.py` in a subprocess, then the exported ControlNet in plain diffusers."""
import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

from conftest import ROOT, TINY


def run_py(out, data, *overrides):
    cmd = [sys.executable, "run.py", f"hydra.run.dir={out}", f"data.root={data}",
           "data.train_size=32", "data.val_size=8", "data.test_size=8", "data.eval_size=4",
           "sampling.steps=3", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    return run_py(tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("data"),
                  "trainer.max_steps=2")


@pytest.mark.slow
def test_fast_dev_run_trains_evaluates_and_exports(tmp_path_factory):
    out, _ = run_py(tmp_path_factory.mktemp("fdr"), tmp_path_factory.mktemp("data"),
                    "trainer.fast_dev_run=true")
    assert (out / "controlnet" / "config.json").exists() and (out / "metrics.json").exists()


@pytest.mark.slow
def test_run_writes_everything_and_says_where(short_run):
    out, stdout = short_run
    grids = [f"samples/{setting}/step_00000{step}.png"
             for setting in ("none", "insufficient", "conflicting", "perfect") for step in (0, 2)]
    for path in ["controlnet/config.json", "metrics.json", "config.yaml", "csv/metrics.csv", *grids]:
        assert (out / path).exists(), path
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run missing"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"eval/shape_iou", "eval/edge_f1"} <= set(metrics["final"])
    # the data check's counts travel with the run (train/val/test sizes set by run_py)
    assert metrics["data_check"]["samples"] == {"train": 32, "val": 8, "test": 8}
    assert metrics["data_check"]["refused"] is False
    assert str(out / "controlnet") in stdout


@pytest.mark.slow
def test_exported_controlnet_loads_into_the_diffusers_pipeline(short_run):
    out, _ = short_run
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        TINY, controlnet=ControlNetModel.from_pretrained(out / "controlnet"),
        safety_checker=None, requires_safety_checker=False)
    condition = torch.zeros(1, 3, 64, 64)
    condition[:, :, 20:40, 20] = 1.0
    image = pipe("a red square on a blue background", image=condition, num_inference_steps=3,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_tiny_bundle_is_a_plain_stable_diffusion_pipeline():
    pipe = StableDiffusionPipeline.from_pretrained(TINY, safety_checker=None,
                                                   requires_safety_checker=False)
    image = pipe("a red circle on a blue background", num_inference_steps=3, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)
