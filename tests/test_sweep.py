"""Sweeps: launcher configs compose, a failing job leaves the others and is reported, threads
are split across parallel jobs, and (slow) a real multirun followed by compare."""
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import types

import pytest
import torch
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from cnexp.analysis.compare import main as compare_main
from cnexp.analysis.runs import FAILED, OK, load_sweep
from cnexp.errors import CnexpError
from cnexp.overrides import JOB_DIR_NAME, job_stem, knob_diff, knobs_suffix
from cnexp.run.context import (SlurmSettingsError, apply_slurm_resources, set_threads,
                               split_threads)
from cnexp.run.naming import wandb_identity
from cnexp.run.record import RecordError, read_status
from cnexp.run.resume import wanted_resume


def compose_with_hydra(overrides, conf_dir=ROOT / "conf"):
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.root={ROOT}", *overrides],
                       return_hydra_config=True)


def test_slurm_launcher_composes_with_command_line_values():
    cfg = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                              "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=30"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 4, 30)


def test_slurm_values_come_from_the_untracked_local_config(tmp_path):
    conf = shutil.copytree(ROOT / "conf", tmp_path / "conf",  # leave out a real local file
                           ignore=lambda d, names: ["slurm.yaml"] if d.endswith("local") else [])
    (conf / "local" / "slurm.yaml").write_text("partition: cluster-a\ntimeout_min: 720\n")
    launcher = compose_with_hydra(["hydra/launcher=slurm"], conf).hydra.launcher
    assert (launcher.partition, launcher.timeout_min) == ("cluster-a", 720)
    # without the local file the launcher still composes, with no partition
    (conf / "local" / "slurm.yaml").unlink()
    assert compose_with_hydra(["hydra/launcher=slurm"], conf).hydra.launcher.partition is None


def test_parallel_launcher_gives_each_job_its_share_of_the_cores():
    cfg = compose_with_hydra(["hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                              "hydra.mode=MULTIRUN"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    before = torch.get_num_threads()
    HydraConfig.instance().set_config(cfg)
    try:
        threads = split_threads()
        assert threads == max(1, len(os.sched_getaffinity(0)) // 2) == torch.get_num_threads()
    finally:
        HydraConfig.instance().cfg = None
        torch.set_num_threads(before)


def test_threads_are_set_only_where_the_count_changes(monkeypatch):
    """Setting torch's thread count at all slows this CPU build's attention (docs/performance.md):
    a run whose count is already right leaves it alone."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    set_threads(torch.get_num_threads())
    assert calls == []
    set_threads(torch.get_num_threads() + 1)
    assert calls == [torch.get_num_threads() + 1]


@pytest.mark.parametrize("ablation, seed, overrides, knobs", [
    ("baseline", 0, ["seed=0"], None), ("no_zero_conv", 12, ["control.branch=lite"], "branch=lite"),
    ("low_lr", 3, ["optim.lr=1e-4", "data.root=/d/x y"], "lr=0.0001_root=-d-x--y~")])  # unsafe: hashed
def test_a_job_name_reads_back_as_its_ablation_and_seed(ablation, seed, overrides, knobs):
    """The name the sweep writes (cnexp.overrides) is the one compare parses (the same module)."""
    name = f"7_{job_stem(ablation, seed)}{knobs_suffix(overrides, None)}"
    parsed = JOB_DIR_NAME.match(name)
    assert (parsed["ablation"], int(parsed["seed"])) == (ablation, seed), name
    assert (parsed["knobs"] or "").startswith(knobs or "") and bool(parsed["knobs"]) == bool(knobs)


def test_a_status_file_no_run_wrote_is_refused_or_skipped(tmp_path):
    assert read_status(tmp_path) is None  # no job ran here
    (tmp_path / "status.json").write_text('{"status": "fine"}')
    with pytest.raises(RecordError, match="'status' must be one of"):
        read_status(tmp_path)
    assert read_status(tmp_path, strict=False) is None  # the sweep's summary goes on
    (tmp_path / "status.json").write_text('{"status": "ok"')  # cut short by a kill
    assert read_status(tmp_path, strict=False) is None


def test_knob_diff_names_what_an_ablation_changes():
    base = {"ablation": "baseline", "seed": 0, "optim": {"prompt_dropout": 0.5, "lr": 1e-3}}
    lite = {"ablation": "lite", "seed": 0, "optim": {"prompt_dropout": 0.5, "lr": 1e-3},
            "control": {"branch": "lite"}, "logger": {"name": "lite-s0"}}
    assert knob_diff(lite, base) == {"control.branch": "lite"}


def fake_train(cfg, signals=None):
    """Stands in for cnexp.train.train: seed 1 crashes, seed 2 is a user error, others finish."""
    if cfg.seed == 1:
        raise RuntimeError("deliberate crash in job with seed 1")
    if cfg.seed == 2:
        raise CnexpError("data.root /nowhere does not exist (deliberate)")
    out = cfg.paths.output_dir
    final = {"step": 3, "eval/perfect/shape_iou": 0.5 + cfg.seed}
    summary = {"ablation": cfg.ablation, "seed": cfg.seed, "steps": 3, "final": final,
               "history": [{"step": 0, "eval/perfect/shape_iou": 0.1}, final],
               "wandb": wandb_identity(cfg)}  # what build_loggers would pass to W&B
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(summary, f)
    return summary


@pytest.fixture
def run_main(monkeypatch):
    """run.py's main in this process, with a stand-in cnexp.train module (fake_train)."""
    monkeypatch.setitem(sys.modules, "cnexp.train", types.SimpleNamespace(train=fake_train))

    def call(*args):  # as `python run.py ARGS`, in this process
        monkeypatch.setattr(sys, "argv", [str(ROOT / "run.py"), *args, "logger.mode=disabled"])
        try:
            runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
        finally:  # Hydra leaves its singletons set after main returns
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None

    return call


def test_failing_jobs_leave_the_others_and_are_reported(run_main, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # the sweep summary: failures -> non-zero
        run_main("-m", "seed=0,1,2,3", f"hydra.sweep.dir={tmp_path}")
    assert exit_info.value.code == 1
    dirs = {d.name: d for d in tmp_path.iterdir() if d.is_dir()}
    assert sorted(dirs) == ["0_baseline-s0", "1_baseline-s1", "2_baseline-s2", "3_baseline-s3"]
    assert read_status(dirs["3_baseline-s3"])["status"] == "ok"  # ran after the failures
    assert (dirs["3_baseline-s3"] / "metrics.json").exists()
    assert "RuntimeError: deliberate crash" in (dirs["1_baseline-s1"] / "error.txt").read_text()
    assert read_status(dirs["2_baseline-s2"])["error_type"] == "CnexpError"

    records = {r.seed: r for r in load_sweep(tmp_path)}
    assert [records[s].status for s in range(4)] == [OK, FAILED, FAILED, OK]
    assert "deliberate crash" in records[1].error
    assert compare_main([str(tmp_path)]) == 0
    report = (tmp_path / "compare" / "report.md").read_text()
    assert "1_baseline-s1" in report and "data.root /nowhere" in report
    assert "failed" in capsys.readouterr().out


def test_wandb_runs_are_named_grouped_by_sweep_and_tagged_with_changed_knobs(run_main, tmp_path):
    run_main("-m", "+ablation=baseline,lightweight", "seed=0", "trainer.max_steps=7",
             f"hydra.sweep.dir={tmp_path / 'day' / 'time'}")
    ident = {d.name: json.loads((d / "metrics.json").read_text())["wandb"]
             for d in (tmp_path / "day" / "time").iterdir() if d.is_dir()}
    lite = ident["1_lightweight-s0"]
    assert (lite["name"], lite["group"]) == ("lightweight-s0", "day_time")  # group: the sweep
    assert lite["job_type"] == "train"
    assert "control.branch=lite" in lite["tags"] and "ablation:lightweight" in lite["tags"]
    assert not any(tag.startswith("trainer.") for tag in lite["tags"])  # same in baseline
    assert ident["0_baseline-s0"]["tags"] == ["ablation:baseline", "seed:0"]


def test_single_run_user_error_exits_2_and_is_recorded(run_main, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_main(f"hydra.run.dir={tmp_path}", "seed=2")
    assert exit_info.value.code == 2
    assert read_status(tmp_path)["status"] == "failed" and (tmp_path / "error.txt").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (TINY / "model_index.json").exists(), reason="needs assets/tinyworld")
def test_real_multirun_then_compare(tmp_path):
    sweep, data = tmp_path / "sweep", tmp_path / "data"
    cmd = [sys.executable, "run.py", "-m", "seed=0,1", "trainer.fast_dev_run=true",
           f"hydra.sweep.dir={sweep}", f"data.root={data}", "data.train_size=32",
           "data.val_size=8", "data.test_size=8", "data.eval_size=4", "sampling.steps=3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job in ["0_baseline-s0", "1_baseline-s1"]:
        for path in ["config.yaml", "metrics.json", "status.json", "controlnet/config.json",
                     ".hydra/overrides.yaml"]:
            assert (sweep / job / path).exists(), f"{job}/{path}"
        assert list((sweep / job / "samples").rglob("*.png"))
    assert compare_main([str(sweep)]) == 0
    out = sweep / "compare"
    report = (out / "report.md").read_text()
    assert "2 ok · 0 failed · 0 incomplete · 0 broken · 0 missing" in report
    assert (out / "summary.csv").read_text().count("baseline") >= 2
    assert (out / "samples.png").exists()


# --- the SLURM preset: the job's resources drive the trainer (cnexp/run/context.py) ---

@pytest.fixture(scope="module")
def conf_without_local(tmp_path_factory):
    """conf/ without a developer's untracked conf/local/slurm.yaml (their real cluster's)."""
    return shutil.copytree(ROOT / "conf", tmp_path_factory.mktemp("conf") / "conf",
                           ignore=lambda d, names: ["slurm.yaml"] if d.endswith("local") else [])


@pytest.fixture
def slurm_job(conf_without_local):
    """Compose a job of `python run.py -m hydra/launcher=slurm ARGS` and make it the running
    Hydra job, as the submitit worker does; returns its config (hydra node included)."""
    def compose_job(*overrides, launcher="slurm"):
        cfg = compose_with_hydra([f"hydra/launcher={launcher}", "hydra.mode=MULTIRUN",
                                  *overrides], conf_without_local)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield compose_job
    HydraConfig.instance().cfg = None


def test_slurm_gpus_per_node_drive_devices_accelerator_tasks_and_resume(slurm_job):
    cfg = slurm_job("hydra.launcher.gpus_per_node=4")
    assert cfg.hydra.launcher.tasks_per_node == 4  # one rank per GPU, without saying so
    assert cfg.hydra.launcher.timeout_min == 240 and cfg.hydra.launcher.max_num_timeout == 10
    apply_slurm_resources(cfg)
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes) == ("gpu", 4, 1)
    # a job requeued after its time limit resumes: ckpt_path=auto without being told
    assert wanted_resume(None) == "auto" and wanted_resume("last") == "last"


def test_a_cpu_slurm_job_stays_on_the_cpu_and_cpu_ddp_needs_its_tasks(slurm_job):
    cfg = slurm_job("hydra.launcher.gpus_per_node=0", "trainer=auto")
    assert cfg.hydra.launcher.tasks_per_node == 1
    apply_slurm_resources(cfg)
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("cpu", 1)
    with pytest.raises(SlurmSettingsError, match="hydra.launcher.tasks_per_node=2"):
        apply_slurm_resources(slurm_job("hydra.launcher.gpus_per_node=0", "trainer=ddp_cpu"))
    cfg = slurm_job("hydra.launcher.gpus_per_node=0", "trainer=ddp_cpu",
                    "hydra.launcher.tasks_per_node=2")
    apply_slurm_resources(cfg)
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("cpu", 2)


@pytest.mark.parametrize("overrides, named", [
    (["hydra.launcher.gpus_per_node=2", "trainer=cpu"], "trainer=cpu trains on the cpu"),
    (["hydra.launcher.gpus_per_node=2", "trainer.devices=1"], "trainer.devices=1 but the SLURM"),
    (["hydra.launcher.gpus_per_node=0", "trainer=gpu"], "holds none (hydra.launcher.gpus_per"),
    (["hydra.launcher.gpus_per_node=2", "hydra.launcher.tasks_per_node=1"],
     "hydra.launcher.tasks_per_node=1"),
    (["hydra.launcher.nodes=2", "trainer.num_nodes=1"], "hydra.launcher.nodes=2"),
])
def test_slurm_settings_that_contradict_the_job_are_refused(slurm_job, overrides, named):
    with pytest.raises(SlurmSettingsError, match=re.escape(named)):
        apply_slurm_resources(slurm_job(*overrides))


def test_outside_the_slurm_launcher_nothing_changes(slurm_job):
    cfg = slurm_job("trainer=cpu", launcher="parallel")
    apply_slurm_resources(cfg)
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("cpu", 1)
    assert wanted_resume(None) is None
