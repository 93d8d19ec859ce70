"""Checkpoint/resume, pre-emption and numerical guards (issue 8)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cnexp.data.resumable import ResumableShuffleSampler
from cnexp.reliability import NonFiniteError, NonFiniteGuard
from conftest import ROOT

SMALL = ["data.train_size=40", "data.val_size=8", "data.test_size=8", "data.batch_size=4",
         "eval.enabled=false", "logger.mode=disabled", "trainer.enable_progress_bar=false",
         "trainer.max_steps=24", "trainer.checkpoint_every_n_steps=4"]


def _start(out, data, *extra, log=None):
    cmd = [sys.executable, "run.py", f"hydra.run.dir={out}", f"data.root={data}", *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "WANDB_MODE": "disabled"})


def _weights(out):
    return load_file(out / "controlnet" / "diffusion_pytorch_model.safetensors")


def _finish(proc):
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_controlnet_bitwise(tmp_path):
    data = tmp_path / "data"
    _finish(_start(tmp_path / "straight", data))

    killed = tmp_path / "killed"
    proc = _start(killed, data)
    deadline = time.time() + 600
    while not list((killed / "checkpoints").glob("*step=12*.ckpt")):  # mid-run, mid-epoch
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "controlnet").exists()
    _finish(_start(killed, data, "ckpt_path=last"))

    straight, resumed = _weights(tmp_path / "straight"), _weights(killed)
    assert straight.keys() == resumed.keys()
    differing = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exit(tmp_path):
    out, log_path = tmp_path / "run", tmp_path / "log.txt"
    with log_path.open("w") as log:
        proc = _start(out, tmp_path / "data", "trainer.max_steps=100000",
                      "trainer.checkpoint_every_n_steps=100000", log=log)
        deadline = time.time() + 600
        while "Trainable params" not in log_path.read_text():  # Lightning's summary: fit began
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    assert (out / "checkpoints" / "last.ckpt").exists(), log_path.read_text()[-2000:]
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] > 0
    assert not any(k.startswith("unet.") for k in state["state_dict"]), "frozen base not saved"


def test_resumable_sampler_continues_the_same_order():
    full = ResumableShuffleSampler(10, batch_size=3, seed=5)
    order = [list(full) for _ in range(3)]  # three epochs, 9 samples each (drop_last)
    flat = [i for epoch in order for i in epoch]
    resumed = ResumableShuffleSampler(10, batch_size=3, seed=5, start_batch=4)  # epoch 1, batch 1
    assert list(resumed) + list(resumed) == flat[12:]
    assert order[0] != order[1]


class _Trainer:
    global_step = 7


class _Module:
    def log(self, *args, **kwargs):
        pass


def _optimizer(grad_value):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), grad_value)
    return torch.optim.AdamW([p]), p


def test_nonfinite_gradient_stops_naming_the_step(tmp_path):
    guard = NonFiniteGuard("stop", tmp_path)
    opt, _ = _optimizer(float("nan"))
    with pytest.raises(NonFiniteError, match="step 7.*last good checkpoint"):
        guard.on_before_optimizer_step(_Trainer(), _Module(), opt)
    with pytest.raises(NonFiniteError, match="loss"):
        guard.on_before_backward(_Trainer(), _Module(), torch.tensor(float("inf")))


def test_nonfinite_gradient_skip_leaves_weights_untouched():
    guard = NonFiniteGuard("skip")
    opt, p = _optimizer(float("inf"))
    guard.on_before_optimizer_step(_Trainer(), _Module(), opt)
    opt.step()
    assert torch.equal(p.data, torch.zeros(3)) and guard.skipped == 1
    opt2, p2 = _optimizer(1.0)  # finite gradients pass through
    guard.on_before_optimizer_step(_Trainer(), _Module(), opt2)
    assert p2.grad is not None


def test_guard_clips_finite_gradients_like_clip_grad_norm():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]  # total norm 13
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    NonFiniteGuard("stop", clip_norm=1.0).on_before_optimizer_step(
        _Trainer(), _Module(), torch.optim.AdamW(params))
    reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(reference, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.grad, r.grad)
    assert abs(torch.cat([p.grad for p in params]).norm().item() - 1.0) < 1e-5
    small = torch.nn.Parameter(torch.zeros(2))
    small.grad = torch.tensor([0.3, 0.4])  # norm 0.5 < 1: left as is
    NonFiniteGuard("stop", clip_norm=1.0).on_before_optimizer_step(
        _Trainer(), _Module(), torch.optim.AdamW([small]))
    assert torch.equal(small.grad, torch.tensor([0.3, 0.4]))
