"""SLURM for real: `hydra/launcher=slurm` sweeps on a throwaway one-node cluster started here
(tools/localslurm.py) — a grid whose failing jobs are listed while the others finish, compare on
it, a job pre-empted as a cluster does it (requeued, resumed, the same record and weights as an
uninterrupted one), and a 2-task DDP job that agrees with one process.

Two sweeps share the cluster and are submitted together, so SLURM keeps both CPUs busy:
  main  optim.lr=-1,1e-3 x logger.name=reference,preempted: two jobs that fail validation
        (lr -1), then two identical tiny runs; `preempted` gets SIGUSR2 once it has saved a
        checkpoint;
  ddp   the same run as `reference` with trainer=ddp_cpu, tasks_per_node=2.
Skipped, with the reason, where no cluster can start (no slurm-wlm/munge/slurmdbd/mariadb-server
packages, not root); CNEXP_REQUIRE_SLURM=1 (set by .ci/run) turns that skip into a failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnexp.analysis.compare import main as compare_main
from tools.localslurm import LocalSlurm, accounting_unavailable_reason, unavailable_reason
from cnexp.analysis.runs import DUPLICATE, FAILED, OK, load_sweep
from cnexp.tinyworld.shapes import ensure_tiny_dataset
from conftest import ROOT, TINY
from test_ddp import assert_ddp_matches_one_process
from test_integrity import assert_same_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not (TINY / "model_index.json").exists(),
                                 reason="needs assets/tinyworld")]

SIZES = {"train": 40, "val": 8, "test": 8}
# long enough that SIGUSR2, sent once the first checkpoint is seen (polled every 0.5 s, then
# squeue and scancel), lands before the last step even on a fast CPU (6 steps took 1.6 s on an
# AVX-512 EPYC and the signal came after the run had finished)
STEPS = 24
RUN = [f"data.train_size={SIZES['train']}", f"data.val_size={SIZES['val']}",
       f"data.test_size={SIZES['test']}", "data.batch_size=4", "data.eval_size=4",
       f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1",
       "trainer.checkpoint_every_n_steps=1", "trainer.enable_progress_bar=false",
       "eval.every_n_steps=8", "eval.curve_images=2", "eval.prompt_settings=[conflicting,perfect]",
       "eval.fid=false", "eval.clip_score=false", "sampling.steps=2", "logger.mode=disabled",
       "ckpt_path=auto"]  # what a requeued job needs: resume if there is a checkpoint
# conf/local/slurm.yaml's job: what a cluster's local file says, given on the command line so a
# developer's own file does not leak in (account, qos, GPUs of their real cluster)
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug",
            "hydra.launcher.account=null", "hydra.launcher.qos=null",
            "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=30",
            "hydra.launcher.array_parallelism=4", "hydra.launcher.setup=[]"]
SWEEP_TIMEOUT_S = 1500  # slow on a shared 2-core machine; minutes on an idle one


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason() or accounting_unavailable_reason()
    cluster = None
    if reason is None:
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), accounting=True)
        try:
            cluster.start()
        except RuntimeError as err:
            reason, cluster = f"the local SLURM did not start: {err}", None
    if reason:
        if os.environ.get("CNEXP_REQUIRE_SLURM"):
            pytest.fail(reason)
        pytest.skip(reason)
    yield cluster
    cluster.stop()


class Sweep:
    """`python run.py -m ...` in the background; `finish()` waits for it (once)."""

    def __init__(self, sweep_dir: Path, args: list[str]):
        self.dir = sweep_dir
        env = {**os.environ, "WANDB_MODE": "disabled",  # the jobs import this checkout's cnexp
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "run.py", "-m", f"hydra.sweep.dir={sweep_dir}", *args], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out = self.err = None

    def finish(self) -> "Sweep":
        if self.out is None:
            try:
                self.out, self.err = self.proc.communicate(timeout=SWEEP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.out, self.err = self.proc.communicate()
                pytest.fail(f"sweep {self.dir} still running after {SWEEP_TIMEOUT_S}s\n"
                            + self.tail())
        return self

    @property
    def log(self) -> str:  # Hydra logs to stdout, submitit's warnings go to stderr
        return (self.out or "") + (self.err or "")

    def tail(self) -> str:
        return f"stdout:\n{(self.out or '')[-3000:]}\nstderr:\n{(self.err or '')[-4000:]}"


def job_dirs(sweep_dir: Path) -> dict[int, Path]:
    """Run directories by Hydra job number (<n>_<ablation>-s<seed>[_<swept knobs>])."""
    return {int(d.name.split("_")[0]): d for d in sweep_dir.iterdir()
            if d.is_dir() and d.name.split("_")[0].isdigit()}


@pytest.fixture(scope="module")
def sweeps(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-sweeps")
    data = ensure_tiny_dataset(root / "data", SIZES)  # once, before jobs could race to write it
    common = [*LAUNCHER, f"data.root={data}", *RUN]
    main = Sweep(root / "main", [*common, "optim.lr=-1,1e-3", "logger.name=reference,preempted"])
    ddp = Sweep(root / "ddp", [*common, "trainer=ddp_cpu", "hydra.launcher.tasks_per_node=2",
                               "logger.name=ddp"])
    try:
        preempted = preempt_after_first_checkpoint(main, cluster, 3)
        yield {"main": main, "ddp": ddp, "preempted": preempted}
    finally:
        for sweep in (main, ddp):
            if sweep.proc.poll() is None:
                sweep.proc.kill()
                sweep.proc.wait()


def preempt_after_first_checkpoint(sweep: Sweep, cluster: LocalSlurm, index: int) -> str:
    """Send SIGUSR2 (submitit's pre-emption/time-limit signal, as `sbatch --signal` delivers it)
    to job `index` of the sweep once it has saved a checkpoint; returns its SLURM id."""
    deadline = time.monotonic() + SWEEP_TIMEOUT_S

    def pending(task: str) -> bool:  # any task of the array still waiting to start
        array = task.split("_")[0]
        return bool(cluster.run("squeue", "-h", "-r", "-t", "PENDING", "-j", array).strip())

    # 22.05 answers a non-KILL signal to one array task while others are pending with "try
    # again later" (for the pending ones) and scancel repeats it: wait until all have started
    task = None
    while task is None or pending(task):
        if sweep.proc.poll() is not None or time.monotonic() > deadline:
            sweep.finish()
            pytest.fail(f"job {index} never saved a checkpoint\n{sweep.tail()}")
        time.sleep(0.5)
        job_dir = job_dirs(sweep.dir).get(index) if sweep.dir.exists() else None
        if job_dir and (job_dir / "checkpoints" / "last.ckpt").exists():
            # the Hydra job number is the array index
            (folder,) = [d for d in (sweep.dir / ".submitit").glob(f"*_{index}") if d.is_dir()]
            task = folder.name
    cluster.run("scancel", "--signal=USR2", task)
    return task


def test_sweep_through_slurm_lists_failures_and_compares(sweeps, cluster):
    main = sweeps["main"].finish()
    assert main.proc.returncode == 1, main.tail()  # failed jobs -> non-zero, after all finished
    jobs = job_dirs(main.dir)
    assert sorted(jobs) == [0, 1, 2, 3]
    records = {r.name: r for r in load_sweep(main.dir)}
    statuses = [records[jobs[n].name].status for n in range(4)]
    # jobs 2 and 3 are the same run by design (one pre-empted, one not): compare counts one of
    # them, the record written last, and names it in the other's line
    assert statuses[:2] == [FAILED, FAILED] and sorted(statuses[2:]) == sorted([OK, DUPLICATE])
    (duplicate,) = [jobs[n] for n in (2, 3) if records[jobs[n].name].status == DUPLICATE]
    (counted,) = [jobs[n] for n in (2, 3) if jobs[n] != duplicate]
    assert counted.name in records[duplicate.name].error
    for n in (0, 1):
        assert "optim.lr" in records[jobs[n].name].error
        assert f"failed: {jobs[n].name}" in main.log  # the sweep summary names them
    for n in (2, 3):
        assert (jobs[n] / "controlnet" / "config.json").exists()
        assert records[jobs[n].name].history[-1]["step"] == STEPS

    # they ran as SLURM jobs: submitit's files and logs under .submitit/<array>_<index>/
    logs = sorted((main.dir / ".submitit").glob("*_*/*_0_log.out"))
    assert len(logs) == 4, sorted((main.dir / ".submitit").rglob("*"))
    array = logs[0].parent.name.split("_")[0]
    # SLURM's accounting knows the four array tasks (a task may still be finishing: submitit
    # returns once the result file is written)
    tasks = cluster.run("sacct", "-j", array, "-X", "-n", "-P", "-o", "JobID")
    assert sorted(tasks.split()) == [f"{array}_{i}" for i in range(4)], tasks
    # job accounting answers, so submitit's polls log nothing about sacct
    assert "sacct" not in main.log, main.tail()

    assert compare_main([str(main.dir)]) == 0
    report = (main.dir / "compare" / "report.md").read_text()
    assert "1 ok · 2 failed · 0 incomplete" in report and "1 duplicate" in report, report


def test_preempted_job_is_requeued_and_matches_an_uninterrupted_one(sweeps, cluster):
    main, job_id = sweeps["main"].finish(), sweeps["preempted"]
    reference, preempted = job_dirs(main.dir)[2], job_dirs(main.dir)[3]
    log = "".join(p.read_text() for p in (main.dir / ".submitit" / job_id).glob("*_log.*"))
    # cnexp stopped at a step end and saved; submitit's handler (called after) requeued the job
    assert "SIGUSR2 received: finishing this step" in log, log[-3000:]
    assert f"Requeued job {job_id}" in log, log[-3000:]
    states = cluster.run("sacct", "--duplicates", "-X", "-n", "-P", "-o", "State", "-j", job_id)
    assert states.split()[0] == "REQUEUED", states
    record = json.loads((preempted / "metrics.json").read_text())
    assert len(record["resumed_at"]) == 1 and 0 < record["resumed_at"][0] < STEPS, record
    assert json.loads((preempted / "status.json").read_text())["status"] == "ok"
    # the same evaluations from step 0, losses, CSV and bitwise the same ControlNet
    assert_same_run(reference, preempted)


def test_two_task_ddp_job_through_slurm_matches_one_process(sweeps, cluster):
    ddp, main = sweeps["ddp"].finish(), sweeps["main"].finish()
    assert ddp.proc.returncode == 0, ddp.tail()
    (ddp_dir,) = job_dirs(ddp.dir).values()
    logs = sorted((ddp.dir / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, logs  # one log per SLURM task: two ranks
    assert_ddp_matches_one_process(job_dirs(main.dir)[2], ddp_dir, STEPS)
