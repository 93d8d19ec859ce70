"""paths.cache where the ecosystem puts caches: $CNEXP_CACHE, else $XDG_CACHE_HOME/cnexp, else
~/.cache/cnexp, whatever directory a job starts in; the test session keeps its own."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnexp.config import default_cache_dir
from conftest import ROOT, compose_cfg


@pytest.fixture
def no_cache_variables(monkeypatch, tmp_path):
    monkeypatch.delenv("CNEXP_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_cache_defaults_to_the_users_cache_not_the_working_directory(no_cache_variables):
    expected = str(no_cache_variables / ".cache" / "cnexp")
    assert default_cache_dir() == expected
    cfg = compose_cfg()  # as `python run.py` composes it, started in the checkout
    assert cfg.paths.cache == expected
    assert cfg.data.root == f"{expected}/tinyworld-data/4000-256-256"  # the caches follow


def test_xdg_cache_home_then_cnexp_cache_take_precedence(no_cache_variables, monkeypatch,
                                                         tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute only
    assert default_cache_dir() == str(no_cache_variables / ".cache" / "cnexp")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compose_cfg().paths.cache == str(tmp_path / "xdg" / "cnexp")
    monkeypatch.setenv("CNEXP_CACHE", str(tmp_path / "shared"))
    assert compose_cfg().paths.cache == str(tmp_path / "shared")
    assert compose_cfg([f"paths.cache={tmp_path / 'given'}"]).paths.cache == str(tmp_path / "given")


def test_each_set_of_tiny_world_sizes_has_its_own_folder(tmp_path):
    """A data-size sweep never rewrites the split a concurrent run of another size reads, and
    its smaller split is the larger one's first samples (a sample is a function of its index)."""
    from cnexp.tinyworld.shapes import ensure_tiny_dataset

    small, large = (compose_cfg([f"paths.cache={tmp_path}", f"data.train_size={n}"]).data.root
                    for n in (3, 5))
    assert small != large
    for root, n in ((large, 5), (small, 3)):
        ensure_tiny_dataset(Path(root), {"train": n, "val": 1, "test": 1})
    assert (Path(large) / "train" / "prompt.json").read_text().splitlines()[:3] == \
        (Path(small) / "train" / "prompt.json").read_text().splitlines()
    assert len((Path(large) / "train" / "prompt.json").read_text().splitlines()) == 5


def test_the_test_session_keeps_its_own_cache(private_cache):
    cache = Path(os.environ["CNEXP_CACHE"])
    assert cache == private_cache and cache.is_dir()
    assert ROOT not in cache.parents and Path.home() / ".cache" not in cache.parents


@pytest.mark.slow
def test_a_fresh_clone_runs_the_tiny_world_with_nothing_set(tmp_path):
    """No CNEXP_CACHE, no XDG_CACHE_HOME: the data lands in ~/.cache/cnexp (HOME is a tmp dir)."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("CNEXP_CACHE", "XDG_CACHE_HOME")}
    cmd = [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=2",
           "data.train_size=16", "data.val_size=4", "data.test_size=4", "data.eval_size=4",
           "data.batch_size=4", "eval.enabled=false", "logger.mode=disabled", "export=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**env, "HOME": str(home), "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (home / ".cache" / "cnexp" / "tinyworld-data" / "16-4-4" / "train").is_dir()
    assert (tmp_path / "run" / "metrics.json").exists()
