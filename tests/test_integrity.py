"""Run integrity (issue 13): a pre-empted, resumed or crowded run reports what a clean one does.

Real processes and real signals: SIGTERM / SIGINT / SIGKILL to `python run.py`, two processes
on one run directory, two first runs on one fresh data root and cache.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

# Small but with a real record: evaluations every 4 steps (curve) and a full one at 0 and the end
SMALL = ["data.train_size=40", "data.val_size=8", "data.test_size=8", "data.batch_size=4",
         "data.eval_size=4", "eval.every_n_steps=4", "eval.curve_images=2", "eval.fid=false",
         "eval.prompt_settings=[none,perfect]", "sampling.steps=2", "logger.mode=disabled",
         "trainer.enable_progress_bar=false", "trainer.max_steps=24",
         "trainer.log_every_n_steps=2", "trainer.checkpoint_every_n_steps=4"]
TIMING = ("seconds", "share")  # record fields that measure time, not the model


def start(out, data, *extra, cache=None, log=None):
    """`log`: a file for the output of a run nobody reads until it ends (a pipe would fill)."""
    cmd = [sys.executable, "run.py", f"hydra.run.dir={out}", f"data.root={data}", *SMALL,
           *([f"paths.cache={cache}"] if cache else []), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w") if log else subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled"})


def start_until(out, data, step, *extra, log=None):
    """A run started and trained past the checkpoint of `step`."""
    proc = start(out, data, *extra, log=log)
    wait_for(proc, lambda: list((out / "checkpoints").glob(f"step-{step:06d}.ckpt")),
             f"step {step}")
    return proc


def run_now(out, data, *extra):
    return subprocess.run([sys.executable, "run.py", f"hydra.run.dir={out}", f"data.root={data}",
                           *SMALL, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)


def finish(proc, code=0):
    output = proc.communicate(timeout=900)[0] or ""
    assert proc.returncode == code, output[-3000:]
    return output


def wait_for(proc, ready, what, timeout=600):
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def record(out):
    """metrics.json without timings and without what says it was resumed."""
    data = json.loads((out / "metrics.json").read_text())
    data.pop("resumed_at")
    return _untimed(data)


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def csv_rows(out):
    with open(out / "csv" / "metrics.csv") as f:
        return [_untimed(row) for row in csv.DictReader(f)]


def weights(out):
    return load_file(out / "controlnet" / "diffusion_pytorch_model.safetensors")


def assert_same_run(straight, resumed):
    a, b = record(straight), record(resumed)
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]]
    assert a == b  # every evaluation from step 0, losses, sudden convergence, base damage
    assert csv_rows(straight) == csv_rows(resumed)
    wa, wb = weights(straight), weights(resumed)
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run, the reference for every interrupted one."""
    base = tmp_path_factory.mktemp("straight")
    finish(start(base / "run", base / "data"))
    return base / "run", base / "data"


@pytest.mark.slow
@pytest.mark.parametrize("signum,status,code", [(signal.SIGTERM, "preempted", 143),
                                                 (signal.SIGINT, "interrupted", 130)])
def test_a_signal_saves_says_so_exits_nonzero_and_resume_continues_the_record(
        tmp_path, straight, signum, status, code):
    reference, data = straight
    out = tmp_path / "run"
    proc = start_until(out, data, 8)
    proc.send_signal(signum)
    finish(proc, code)
    state = json.loads((out / "status.json").read_text())
    assert state["status"] == status and state["exit_code"] == code
    assert state["step"] > 8 and state["checkpoint"].endswith("last.ckpt")
    assert torch.load(state["checkpoint"], weights_only=False)["global_step"] == state["step"]
    assert not (out / "metrics.json").exists() and not (out / "controlnet").exists()

    finish(start(out, data, "ckpt_path=last"))
    assert json.loads((out / "metrics.json").read_text())["resumed_at"] == [state["step"]]
    assert json.loads((out / "status.json").read_text())["status"] == "ok"
    assert_same_run(reference, out)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_record_and_weights(tmp_path, straight):
    reference, data = straight
    out = tmp_path / "run"
    proc = start_until(out, data, 12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finish(start(out, data, "ckpt_path=auto"))  # what a requeued job runs
    assert_same_run(reference, out)


def test_ctrl_c_waits_for_the_step_and_a_second_one_stops_at_once():
    from cnexp.run.signals import RunStopped, StopSignals

    signals = StopSignals()
    signals.phase = "training"
    signals._handle(signal.SIGINT, None)  # noted: the step in flight finishes
    assert signals.received == signal.SIGINT and signals.reason == "interrupted"
    with pytest.raises(RunStopped, match="a second SIGINT") as stop:
        signals._handle(signal.SIGINT, None)
    assert stop.value.exit_code == 130 and stop.value.checkpoint is None
    signals._handle(signal.SIGINT, None)  # a third, while stopping: ignored, no second raise


def test_a_signal_before_the_first_step_stops_at_once(tmp_path):
    """The step-0 evaluation and the encoder-cache fill run after on_train_start: a pre-emption
    then must not wait for them (a cluster's grace period may be shorter)."""
    from cnexp.run.signals import RunStopped, StopAtStepEnd, StopSignals

    signals = StopSignals()
    stop = StopAtStepEnd(signals, tmp_path)
    try:
        stop.on_train_start(None, None)
        with pytest.raises(RunStopped, match="preempted by SIGTERM at step 0"):
            signals._handle(signal.SIGTERM, None)
        signals.received, signals.phase = None, "setup"
        stop.on_train_batch_start(None, None, None, 0)
        signals._handle(signal.SIGTERM, None)  # now a step is in flight: it finishes first
        assert signals.received == signal.SIGTERM
    finally:
        signals.restore()


@pytest.mark.slow
def test_ctrl_c_twice_stops_the_run_with_status_interrupted(tmp_path, straight):
    """Steps made slow by an evaluation at each, so the second Ctrl-C usually lands inside the
    same step; either way the run says it was interrupted and exits 130."""
    _, data = straight
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start_until(out, data, 4, "trainer.max_steps=100000", "eval.every_n_steps=1",
                       "sampling.steps=20", log=log)
    proc.send_signal(signal.SIGINT)  # the step finishes ...
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # ... unless the user insists
    proc.wait(timeout=120)
    assert proc.returncode == 130, log.read_text()[-2000:]
    state = json.loads((out / "status.json").read_text())
    assert state["status"] == "interrupted" and state["signal"] in ("a second SIGINT", "SIGINT")


def test_ckpt_path_last_without_a_checkpoint_is_an_error_naming_the_directory(tmp_path):
    out = tmp_path / "run"
    done = run_now(out, tmp_path / "data", "ckpt_path=last")
    assert done.returncode == 2, done.stderr[-2000:]
    said = done.stdout + done.stderr
    assert f"no checkpoint to resume in {out / 'checkpoints'}" in said and "ckpt_path=auto" in said
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_ckpt_path_auto_starts_fresh_and_leaves_a_finished_run_alone(tmp_path, straight):
    _, data = straight
    out = tmp_path / "run"
    finish(start(out, data, "ckpt_path=auto", "trainer.max_steps=4", "eval.enabled=false"))
    first = (out / "metrics.json").read_text()
    output = finish(start(out, data, "ckpt_path=auto", "trainer.max_steps=4",
                          "eval.enabled=false"))
    assert "already finished" in output and (out / "metrics.json").read_text() == first


@pytest.mark.slow
def test_one_run_per_directory(tmp_path, straight):
    _, data = straight
    out = tmp_path / "run"
    first = start_until(out, data, 4, "trainer.max_steps=100000", log=tmp_path / "log.txt")
    overrides = (out / ".hydra" / "overrides.yaml").read_text()
    second = run_now(out, data, "optim.lr=0.5")
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"run directory {out} is in use by another run (pid {first.pid}" in second.stderr
    assert json.loads((out / "status.json").read_text())["pid"] == first.pid  # untouched
    assert (out / ".hydra" / "overrides.yaml").read_text() == overrides  # put back
    # the first run is gone: its directory holds a run, so a fresh start there is refused...
    again = run_now(out, data)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    # ... and a stale lock (a dead holder) is taken over with a warning
    (out / "run.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "then"}))
    resumed = finish(start(out, data, "ckpt_path=last", "trainer.max_steps=14"))
    assert "taking over the lock of a run that is gone (pid 999999 on gone" in resumed


@pytest.mark.slow
def test_a_resume_with_other_knobs_is_refused_and_changes_nothing(tmp_path, straight):
    _, data = straight
    out = tmp_path / "run"
    finish(start(out, data, "trainer.max_steps=4", "eval.enabled=false"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    refused = run_now(out, data, "ckpt_path=last", "trainer.max_steps=4", "eval.enabled=false",
                      "optim.lr=0.01", "+ablation=lightweight")
    assert refused.returncode == 2, refused.stderr[-2000:]
    said = refused.stderr
    assert f"resuming {out} with other knobs" in said and "optim.lr=0.01 (the run has" in said
    assert "control.branch=lite (the run has copy)" in said and "ablation=lightweight" in said
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == before  # the run's record and checkpoints are untouched
    # training longer is a resume, not another run
    finish(start(out, data, "ckpt_path=last", "trainer.max_steps=6", "eval.enabled=false"))
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_two_first_runs_at_once_share_fresh_caches(tmp_path):
    """Fresh data root and cache: both generate / compute what they need, and both finish."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    extra = ["trainer.max_steps=2", "eval.fid=true", "eval.fid_feature=clip",
             "eval.fid_reference_size=8", "eval.every_n_steps=0"]
    procs = [start(tmp_path / f"run{i}", data, *extra, cache=cache) for i in range(2)]
    for proc in procs:
        finish(proc)
    finals = [_untimed(json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["final"])
              for i in range(2)]
    assert finals[0] == pytest.approx(finals[1], rel=1e-5)  # same data, same statistics
    assert len(list((cache / "fid_reference").glob("*.pt"))) == 1
    assert not list(data.rglob("*.tmp"))


@pytest.mark.slow
def test_under_ddp_every_rank_stops_at_the_same_step(tmp_path, straight):
    """SIGTERM reaches rank zero only: the other rank learns of it at the step's end and both
    stop there (no rank left waiting in an all-reduce), then the run resumes."""
    _, data = straight
    out = tmp_path / "run"
    proc = start_until(out, data, 4, "trainer=ddp_cpu", "trainer.max_steps=100000",
                       "eval.enabled=false", log=tmp_path / "log.txt")
    proc.send_signal(signal.SIGTERM)
    finish(proc, 143)
    state = json.loads((out / "status.json").read_text())
    assert state["status"] == "preempted" and state["step"] >= 4
    assert torch.load(state["checkpoint"], weights_only=False)["global_step"] == state["step"]
    finish(start(out, data, "trainer=ddp_cpu", f"trainer.max_steps={state['step'] + 2}",
                 "eval.enabled=false", "ckpt_path=auto"))
    assert json.loads((out / "metrics.json").read_text())["resumed_at"] == [state["step"]]


def test_a_requeued_slurm_job_continues_its_run_rather_than_being_refused(tmp_path, monkeypatch):
    from cnexp.run.resume import resume_path, wanted_resume

    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "global_step": 3}, tmp_path / "checkpoints" / "last.ckpt")
    assert wanted_resume(None) is None  # a fresh run: starts fresh
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_path(wanted_resume(None), tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert wanted_resume("some.ckpt") == "some.ckpt"  # an explicit choice stands
