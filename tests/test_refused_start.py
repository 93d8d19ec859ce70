"""A refused start touches nothing of the holder's: every file's bytes and every file's and
directory's mtime are as they were (issue 25, finding 5). No training: the holder is built by hand
and run.py stops in RunDirGuard, before anything heavy is imported."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from cnexp.run.dir import RunDirLock

OLD = 1_600_000_000_000_000_000  # ns: 2020, so that any rewrite shows in the mtimes


def holder(run):
    """A run directory as a finished (or live) run leaves it, its .hydra/ rewritten by a resume
    after .hydra_at_start/ was kept, every time set to 2020."""
    files = {
        ".hydra/config.yaml": "seed: 0\nablation: baseline\ntrainer:\n  max_steps: 8\n",
        ".hydra/hydra.yaml": "hydra:\n  mode: RUN\n",
        ".hydra/overrides.yaml": "- trainer.max_steps=8\n- ckpt_path=last\n",
        ".hydra_at_start/config.yaml": "seed: 0\nablation: baseline\n",
        "metrics.json": json.dumps({"ablation": "baseline", "seed": 0, "steps": 8,
                                    "history": []}),
        "status.json": json.dumps({"status": "ok"}),
        "run.log": "[2020][cnexp][INFO] - the holder's own lines\n",
        "run.lock": json.dumps({"pid": 999999, "host": "gone", "since": "then"}),
        "checkpoints/last.ckpt": "not a real checkpoint",
    }
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    for path in sorted(run.rglob("*"), reverse=True) + [run]:  # files before their directories
        os.utime(path, ns=(OLD, OLD))
    return run


def state(run):
    return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in [run, *run.rglob("*")]}


def start(run, *extra):
    return subprocess.run([sys.executable, "run.py", f"hydra.run.dir={run}",
                           "logger.mode=disabled", *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})


@pytest.mark.parametrize("extra, said", [
    ((), "already holds a run"),  # a fresh start over a finished run
    pytest.param(("ckpt_path=last", "seed=7"), "with other knobs than it trained with: seed=7",
                 marks=pytest.mark.slow),  # the same restore, another refusal: ~20 s loaded
])
def test_a_refused_start_leaves_the_holder_byte_for_byte(tmp_path, extra, said):
    run = holder(tmp_path / "run")
    before = state(run)
    refused = start(run, *extra)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert said in refused.stderr
    assert state(run) == before


def test_a_start_refused_by_a_live_holder_leaves_its_directory_alone(tmp_path):
    run = holder(tmp_path / "run")
    lock = RunDirLock(run).acquire()  # the live holder: this test process
    try:
        for path in (run / "run.lock", run):
            os.utime(path, ns=(OLD, OLD))
        before = state(run)
        refused = start(run, "ckpt_path=last")
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "is in use by another run" in refused.stderr
        assert state(run) == before
    finally:
        lock.release()
