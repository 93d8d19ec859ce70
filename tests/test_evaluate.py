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
    assert "data.eval_size=8" in (out / finished.name / ".hydra" / "overrides.yaml").read_text()


def test_only_evaluation_knobs_and_only_finished_runs(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "optim.lr=1"]) == 2
    assert "only evaluation knobs may change" in capsys.readouterr().err
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "data.eval_size=8"]) == 2
    assert f"no finished run below {tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def usable_run(run, seed=0):
    """What evaluate looks for in a finished run (the model itself is not loaded here)."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n- data.eval_size=4\n")
    (run / "controlnet").mkdir()
    (run / "config.yaml").write_text(f"seed: {seed}\n")
    (run / "status.json").write_text(json.dumps({"status": "ok"}))
    (run / "metrics.json").write_text(json.dumps(
        {"ablation": "baseline", "seed": seed, "steps": 2, "history": [{"step": 2}]}))
    return run


def test_every_usable_run_is_evaluated_and_the_skipped_are_listed(tmp_path, monkeypatch, capsys):
    import cnexp.evaluate as evaluate

    tree = tmp_path / "sweep"
    runs = {name: usable_run(tree / name, seed) for seed, name in
            enumerate(["0_corrupt", "1_failed", "2_truncated", "3_no_config", "4_good"])}
    (runs["1_failed"] / "status.json").write_text(json.dumps({"status": "failed"}))
    (runs["2_truncated"] / "metrics.json").write_text('{"ablation": "base')
    (runs["3_no_config"] / "config.yaml").unlink()
    evaluated = []

    def fake_evaluate(run, target, overrides):  # the model is not the point here
        if run.name == "0_corrupt":
            raise OSError("controlnet/diffusion_pytorch_model.safetensors: truncated")
        evaluated.append(run.name)
        return {"step": 2}

    monkeypatch.setattr(evaluate, "evaluate_run", fake_evaluate)
    assert main([str(tree), "--out", str(tmp_path / "out")]) == 1
    assert evaluated == ["4_good"]
    err = capsys.readouterr().err
    table = err[err.index("skipped 4 of 5 runs"):].splitlines()
    why = {line.split()[0]: line for line in table[2:]}
    assert "OSError: controlnet/diffusion_pytorch_model.safetensors: truncated" in \
        why[str(runs["0_corrupt"])]
    assert "OSError" in (tmp_path / "out" / "0_corrupt" / "error.txt").read_text()
    assert "status 'failed'" in why[str(runs["1_failed"])]
    assert "not valid JSON" in why[str(runs["2_truncated"])]
    assert "no config.yaml" in why[str(runs["3_no_config"])]


@pytest.mark.parametrize("override, said", [
    ("data.eval_sizex=8", "data.eval_sizex is not a knob; did you mean data.eval_size"),
    ("sampling.scheduler=ddmi", "Invalid value 'ddmi', expected one of [ddim, unipc, dpmsolver]"),
    ("eval.prompt_settings=[none,perfet]", "Invalid value 'perfet'"),
    ("eval.fid=maybe", "'maybe' is not a valid bool"),
    ("sampling.steps=0", "sampling.steps is 0; must be > 0"),
])
def test_a_bad_evaluation_knob_is_one_message_naming_it(tmp_path, capsys, override, said):
    usable_run(tmp_path / "run")
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), override]) == 2
    err = capsys.readouterr().err
    assert f"cannot re-evaluate with {override!r}" in err and said in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_the_evaluation_overrides_are_recorded_in_overrides_yaml(tmp_path):
    import yaml
    from omegaconf import OmegaConf

    from cnexp.evaluate import _copy_config

    run = usable_run(tmp_path / "run")
    overrides = ["data.eval_size=256", "eval.fid=false"]
    _copy_config(run, tmp_path / "out", OmegaConf.from_dotlist(overrides), overrides)
    recorded = yaml.safe_load((tmp_path / "out" / ".hydra" / "overrides.yaml").read_text())
    assert recorded == ["seed=0", "data.eval_size=256", "eval.fid=false"]  # 4 replaced by 256
