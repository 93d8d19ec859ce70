"""What a run's directory says about it (issue 34, items 6, 7, 10, 12): a run that learned nothing
ends failed; a refused resume leaves a finished run finished; a resume files an earlier failure's
error.txt under history/; fit and evaluation time cover the same span."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from test_progress import fit

from cnexp.analysis.runs import read_run
from cnexp.finite import NonFiniteError, NonFiniteGuard
from cnexp.progress import StepProgressBar
from cnexp.run.record import HISTORY_DIR, write_status

TINY_RUN = ["data.train_size=32", "data.val_size=8", "data.test_size=8", "data.eval_size=4",
            "sampling.steps=3", "logger.mode=disabled"]


def run_py(out, data, *overrides):
    return subprocess.run([sys.executable, "run.py", f"hydra.run.dir={out}", f"data.root={data}",
                           *TINY_RUN, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})


def errors(done):
    """The run's ERROR lines (Hydra logs to stdout)."""
    return [line for line in (done.stdout + done.stderr).splitlines() if "[ERROR]" in line]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root):
    """A finished 2-step run (status ok, metrics.json, controlnet/, two checkpoints)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = run_py(out, data_root, "trainer.max_steps=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def record_bytes(run):
    """status.json, metrics.json and the export, byte for byte."""
    files = [run / "status.json", run / "metrics.json", *sorted((run / "controlnet").rglob("*"))]
    return {p.relative_to(run): p.read_bytes() for p in files if p.is_file()}


# ---- item 6: a run that learned nothing ends failed and exports nothing ------------------------
@pytest.mark.slow
def test_a_run_whose_every_step_was_skipped_fails_and_exports_nothing(tmp_path, data_root):
    # connectors of std 1e30: every step's loss overflows, so on_nonfinite=skip drops each one
    out = tmp_path / "run"
    done = run_py(out, data_root, "trainer.max_steps=2", "trainer.on_nonfinite=skip", "control.connector_init=gaussian",
                  "control.gaussian_std=1e30", "eval.enabled=false")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    said = errors(done)
    assert len(said) == 1 and "all 2 training steps were skipped" in said[0], said
    assert "Traceback" not in done.stdout + done.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and status["error_type"] == "NonFiniteError"
    assert not (out / "controlnet").exists() and not (out / "metrics.json").exists()


def test_non_finite_trained_weights_fail_the_run_and_frozen_ones_are_not_looked_at():
    module = torch.nn.Module()
    module.trained = torch.nn.Linear(2, 2)
    module.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with torch.no_grad():
        module.frozen.weight[0, 0] = float("nan")  # not trained: not this run's doing
    trainer = SimpleNamespace(global_step=2, max_steps=2)
    guard = NonFiniteGuard("skip")
    guard.check_learned(trainer, module)  # finite: passes
    with torch.no_grad():
        module.trained.bias[1] = float("inf")
    for action in ("skip", "stop"):
        with pytest.raises(NonFiniteError, match=r"after step 2 .*NaN/inf.*trained\.bias"):
            NonFiniteGuard(action).on_train_end(trainer, module)


def test_some_skipped_steps_are_not_a_failure_all_of_them_are():
    module = torch.nn.Linear(2, 2)
    guard = NonFiniteGuard("skip")
    guard.load_state_dict({"skipped": 1})  # one of two steps skipped, in an earlier segment
    guard.check_learned(SimpleNamespace(global_step=2, max_steps=2), module)
    guard.load_state_dict({"skipped": 2})
    with pytest.raises(NonFiniteError, match="all 2 training steps were skipped"):
        guard.check_learned(SimpleNamespace(global_step=2, max_steps=2), module)


# ---- item 7: a refused resume leaves a finished run as it was ---------------------------------
@pytest.mark.slow
def test_a_refused_resume_leaves_a_finished_runs_record_byte_for_byte(tmp_path, finished,
                                                                      data_root):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(b"not a checkpoint")  # both of them unreadable
    before = record_bytes(run)
    refused = run_py(run, data_root, "trainer.max_steps=2", "ckpt_path=last")
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    said = errors(refused)
    assert len(said) == 1 and "no intact checkpoint to resume" in said[0], said
    assert record_bytes(run) == before
    assert not (run / "error.txt").exists()
    assert read_run(run).status == "ok"  # compare still counts it


# ---- items 10 and 12: a resume after a failure; fit and evaluation time alike -----------------
@pytest.mark.slow
def test_a_short_run_spends_less_on_evaluation_than_on_the_whole_fit(finished):
    out, stdout = finished
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["eval_seconds"] <= metrics["fit_seconds"]
    assert metrics["eval_share"] <= 1
    shown = re.search(r"\(evaluation (\d+)% of it\)", stdout)
    assert shown and int(shown[1]) <= 100, stdout[-2000:]


@pytest.mark.slow
def test_a_resume_after_a_failure_files_its_error_under_history(tmp_path, finished, data_root):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    (run / "metrics.json").unlink()  # as a run that failed in its final evaluation leaves it
    shutil.rmtree(run / "controlnet")
    (run / "error.txt").write_text("Traceback ...\nRuntimeError: the earlier attempt\n")
    write_status(run, "failed", error_type="RuntimeError", error="the earlier attempt")
    resumed = run_py(run, data_root, "trainer.max_steps=3", "ckpt_path=last")  # one more step
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["status"] == "ok"
    assert not (run / "error.txt").exists()
    kept = list((run / HISTORY_DIR).glob("error-*.txt"))
    assert len(kept) == 1 and "the earlier attempt" in kept[0].read_text()
    record = read_run(run)
    assert record.status == "ok" and not record.error
    # the resume's figures add its own to the checkpoint's: evaluation stays part of the fit
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_at"] == [2]
    assert 0 < metrics["eval_seconds"] <= metrics["fit_seconds"]
    assert "over all its segments" in resumed.stdout


def test_error_txt_moves_to_history_when_a_new_attempt_starts_and_stays_when_it_fails(tmp_path):
    (tmp_path / "error.txt").write_text("first")
    write_status(tmp_path, "failed", error="first")
    assert (tmp_path / "error.txt").exists()  # a failure's own traceback stays beside it
    write_status(tmp_path, "running")
    (tmp_path / "error.txt").write_text("second")
    write_status(tmp_path, "ok")
    kept = sorted(p.read_text() for p in (tmp_path / HISTORY_DIR).glob("error-*.txt"))
    assert kept == ["first", "second"] and not (tmp_path / "error.txt").exists()


def test_a_resumed_runs_bar_shows_its_own_evaluation_time_beside_its_own_clock(tmp_path):
    import lightning as L

    class Evaluation(L.Callback):
        seconds = 0.0

        def state_dict(self):
            return {"seconds": self.seconds}

        def load_state_dict(self, state):
            self.seconds = state["seconds"]

        def on_train_start(self, trainer, module):
            if trainer.global_step == 0:
                self.seconds += 100.0  # the first segment's evaluations, as reported

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 6:
                time.sleep(0.6)  # this process's one evaluation, in real time as the bar's clock
                self.seconds += 0.6

    first = fit(tmp_path, 4, StepProgressBar(), callbacks=[Evaluation()])
    evaluation = Evaluation()
    bar = StepProgressBar(lambda: evaluation.seconds, plain=False)
    fit(tmp_path, 8, bar, callbacks=[evaluation],
        ckpt_path=first.checkpoint_callback.best_model_path)
    assert evaluation.seconds == pytest.approx(100.6)
    assert bar.train_progress_bar.postfix.endswith("eval=1s")  # not the carried 101 s
