"""DDP on CPU (trainer=ddp_cpu: 2 gloo processes) against one process with the same global batch."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cnexp.data.resumable import ResumableShuffleSampler
from conftest import ROOT, TINY

SMALL = ["data.train_size=32", "data.val_size=8", "data.test_size=8", "data.batch_size=4",
         "data.eval_size=8", "logger.mode=disabled", "trainer.enable_progress_bar=false",
         "trainer.max_steps=8", "trainer.log_every_n_steps=1", "eval.every_n_steps=4",
         "eval.curve_images=4", "eval.prompt_settings=[conflicting,perfect]",
         "eval.fid_reference_size=8"]


def test_ranks_together_see_each_global_batch_once():
    one = list(ResumableShuffleSampler(20, 4, seed=3))
    ranks = [list(ResumableShuffleSampler(20, 4, seed=3, rank=r, world=2)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(one)  # every sample once per epoch
    for step in range(len(one) // 4):  # rank r holds positions r, r+2 of every global batch
        batch = one[4 * step:4 * step + 4]
        assert ranks[0][2 * step:2 * step + 2] == batch[0::2]
        assert ranks[1][2 * step:2 * step + 2] == batch[1::2]


def test_a_global_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="does not split over 2"):
        ResumableShuffleSampler(20, 5, seed=0, world=2)


def _run(out, data, trainer):
    cmd = [sys.executable, "run.py", f"trainer={trainer}", f"hydra.run.dir={out}",
           f"data.root={data}", *SMALL]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _losses(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f)
                if r.get("train/loss")}


def assert_ddp_matches_one_process(one_dir, ddp_dir, steps):
    """The DDP run in ddp_dir trained and evaluated as the one-process run in one_dir did
    (also used by tests/test_slurm.py for a 2-task SLURM job)."""
    one_losses, ddp_losses = _losses(one_dir), _losses(ddp_dir)
    one, ddp = (json.loads((d / "metrics.json").read_text()) for d in (one_dir, ddp_dir))
    # Same global batches and per-sample noise; only the gradient all-reduce's summation order
    # differs, so the trajectories agree to float32 round-off, not bitwise.
    assert len(one_losses) == len(ddp_losses) == steps  # rank zero logs each step once
    for step, loss in one_losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-6), step
    a = load_file(one_dir / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(ddp_dir / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # evaluation split over the ranks, metric states synced: the same final numbers
    scores = [k for k in one["final"] if k.startswith("eval/") and "seconds" not in k]
    assert len(scores) >= 2, scores  # something to compare
    for name in scores:
        assert ddp["final"][name] == pytest.approx(one["final"][name], rel=1e-3, abs=1e-3), name
    assert [h["step"] for h in ddp["history"]] == [h["step"] for h in one["history"]]
    assert not torch.isnan(torch.tensor(ddp["final_loss"]))
    return one, ddp


@pytest.mark.slow
@pytest.mark.skipif(not (TINY / "model_index.json").exists(), reason="needs assets/tinyworld")
def test_ddp_cpu_matches_one_process(tmp_path):
    data = tmp_path / "data"
    _run(tmp_path / "one", data, "cpu")
    _run(tmp_path / "ddp", data, "ddp_cpu")
    one, _ = assert_ddp_matches_one_process(tmp_path / "one", tmp_path / "ddp", steps=8)
    assert len([k for k in one["final"] if k.startswith("eval/")]) >= 8
