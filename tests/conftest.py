"""Shared fixtures: composed configs and the shipped tiny-world bundle."""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from cnexp.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tinyworld"

register_configs()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test`'s workers share the cores: each worker, and every run it starts (which
    # inherits OMP_NUM_THREADS), gets its share, not one thread per core each (oversubscribed,
    # two workers would slow each other many times over)
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)

# Where Hydra puts a run started in the checkout without hydra.run.dir / hydra.sweep.dir.
RUN_DIR_ROOTS = ("outputs", "multirun")
RUN_DIRS_AT_START = pytest.StashKey[set]()


def _run_dirs_in_checkout() -> set[str]:
    """outputs/, multirun/ and their entries two levels down (<date>/<time>_<name>)."""
    found = set()
    for top in RUN_DIR_ROOTS:
        if (ROOT / top).is_dir():
            found.add(top)
            found.update(p.relative_to(ROOT).as_posix() for p in (ROOT / top).glob("*"))
            found.update(p.relative_to(ROOT).as_posix() for p in (ROOT / top).glob("*/*"))
    return found


def pytest_sessionstart(session):
    session.config.stash[RUN_DIRS_AT_START] = _run_dirs_in_checkout()


def pytest_sessionfinish(session, exitstatus):
    """Tests write only under their tmp dirs: a run directory that appeared in the checkout
    during the session fails it (a subprocess's `python run.py` without hydra.run.dir)."""
    gained = sorted(_run_dirs_in_checkout() - session.config.stash.get(RUN_DIRS_AT_START, set()))
    if gained:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = ("tests wrote run directories into the working tree (give each run "
                   f"hydra.run.dir under tmp_path): {', '.join(gained)}")
        if reporter is not None:
            reporter.write("\n")
            reporter.write_line(message, red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """paths.cache (CNEXP_CACHE) in a tmp dir for the whole session, subprocesses included: tests
    never fill the user's ~/.cache/cnexp, their own CNEXP_CACHE or the working tree."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("cnexp-cache")
        patch.setenv("CNEXP_CACHE", str(cache))
        yield cache


def compose_cfg(overrides: list[str] | None = None, out_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml as `python run.py <overrides>` would, without running Hydra's app."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.root={ROOT}", *(overrides or [])],
                      return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir or ROOT / "outputs" / "test")
    return cfg


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory) -> DictConfig:
    """The default config, shrunk for tests: small data, few eval images, no W&B."""
    data_root = tmp_path_factory.mktemp("tinyworld-data")
    return compose_cfg(["data.train_size=64", "data.val_size=16", "data.test_size=16",
                        f"data.root={data_root}", "data.batch_size=4", "data.eval_size=4",
                        "sampling.steps=4", "logger.mode=disabled", "logger.csv=false"],
                       out_dir=tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def tiny_base(tiny_cfg):
    from cnexp.base import load_base

    return load_base(tiny_cfg.base)


@pytest.fixture(scope="session")
def tiny_data(tiny_cfg):
    from cnexp.data.datamodule import TriplesDataModule

    data = TriplesDataModule(tiny_cfg.data)
    data.prepare_data()
    data.setup()
    return data


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """write(name, source) -> a package folder `name` under tmp_path whose toy.py holds `source`,
    importable as <name>.toy (what a contributor's new module looks like to a registry); its
    modules are forgotten afterwards (undoing a registration is the test's own job)."""
    written = []

    def write(name: str, source: str) -> Path:
        package = tmp_path / name
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "toy.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        written.append(name)
        return package

    yield write
    for name in written:
        sys.modules.pop(f"{name}.toy", None)
        sys.modules.pop(name, None)
