"""Evaluating a finished run again: the same settings give the same numbers; others only add."""
import json
import subprocess
import sys

import pytest

from cnexp.analysis.runs import load_sweep
from cnexp.evaluate import main
from conftest import ROOT, TINY

SMALL = ["data.train_size=32", "data.val_size=8", "data.test_size=8", "data.batch_size=4",
         "data.eval_size=4", "eval.every_n_steps=0", "eval.fid=false", "sampling.steps=2",
         "eval.prompt_settings=[none,perfect]", "logger.mode=disabled", "trainer.max_steps=2",
         "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    if not (TINY / "model_index.json").exists():
        pytest.skip("needs assets/tinyworld")
    root = tmp_path_factory.mktemp("evaluate")
    run = root / "sweep" / "0_baseline-s0"
    proc = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={run}",
                           f"data.root={root / 'data'}", *SMALL], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def files(run):
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}


@pytest.mark.slow
def test_the_same_settings_reproduce_the_final_evaluation(finished, tmp_path):
    before = files(finished)
    assert main([str(finished), "--out", str(tmp_path / "same")]) == 0
    old = json.loads((finished / "metrics.json").read_text())
    new = json.loads((tmp_path / "same" / "metrics.json").read_text())
    untimed = lambda row: {k: v for k, v in row.items() if "seconds" not in k}  # noqa: E731
    assert untimed(new["final"]) == untimed(old["final"])
    assert new["final_images"] == old["final_images"] and new["history"][:-1] == old["history"][:-1]
    assert files(finished) == before  # the run is only read


@pytest.mark.slow
def test_a_larger_evaluation_set_and_the_record_compare_reads(finished, tmp_path):
    out = tmp_path / "eval8"
    assert main([str(finished.parent), "--out", str(out), "data.eval_size=8"]) == 0
    record = json.loads((out / finished.name / "metrics.json").read_text())
    assert {len(v) for v in record["final_images"].values()} == {8}
    status = json.loads((out / finished.name / "status.json").read_text())
    assert status["evaluated_from"] == str(finished) and status["status"] == "ok"
    (run,) = load_sweep(out)
    assert run.status == "ok" and run.ablation == "baseline" and run.seed == 0
    assert run.config["data"]["eval_size"] == 8


def test_only_evaluation_knobs_and_only_finished_runs(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "optim.lr=1"]) == 2
    assert "only evaluation knobs may change" in capsys.readouterr().err
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "data.eval_size=8"]) == 2
    assert f"no finished run below {tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
