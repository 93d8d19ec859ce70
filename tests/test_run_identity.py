"""A checkpoint carries its run (issue 34, items 1, 2 and 13): a resume from any path with other
knobs is refused naming each, `warm_start=true` starts a new run from its weights with a fresh
record, a checkpoint whose record or versions are not this cnexp's is migrated or refused in one
line, and the names a run writes pass Hydra's grammar as typed.

One 2-step tiny-world run (in-process, no evaluation) is the checkpoint every test reads.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_cfg
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from cnexp.errors import CnexpError
from cnexp.run.record import read_metrics

SMALL = ["data.train_size=16", "data.val_size=4", "data.test_size=4", "data.batch_size=4",
         "data.eval_size=2", "eval.num_images=2", "eval.curve_images=2", "sampling.steps=2",
         "logger.mode=disabled", "logger.csv=false", "trainer.enable_progress_bar=false",
         "export=false", "trainer.max_steps=2"]
OTHER_KNOBS = ["seed=1", "optim.prompt_dropout=0", "optim.lr=1e-4",
               "control.connector_init=gaussian"]


def overrides(root: Path, *extra) -> list[str]:
    return [*SMALL, f"data.root={root / 'data'}", f"paths.cache={root / 'cache'}", *extra]


def train_run(root: Path, out: Path, *extra) -> dict:
    from cnexp.train import train

    return train(compose_cfg(overrides(root, *extra), out_dir=out))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(root, run directory) of a finished 2-step run without evaluation."""
    root = tmp_path_factory.mktemp("identity")
    train_run(root, root / "run", "eval.enabled=false")
    return root, root / "run"


def periodic(run: Path) -> Path:
    return next(p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")


def edited(source_file: Path, target: Path, edit) -> Path:
    checkpoint = torch.load(source_file, map_location="cpu", weights_only=False)
    edit(checkpoint)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target


@pytest.mark.slow  # python run.py in a subprocess: ~25 s of imports on 2 cores
def test_a_checkpoint_of_another_run_with_other_knobs_is_refused_naming_each(source, tmp_path):
    """Item 1: resumed into a new directory with other knobs, exit 2 and one line; the path is
    the periodic checkpoint's as the run wrote it, typed as is (item 13)."""
    root, run = source
    new = tmp_path / "new"
    proc = subprocess.run(
        [sys.executable, "run.py", f"hydra.run.dir={new}", *overrides(root, "eval.enabled=false"),
         f"ckpt_path={periodic(run)}", *OTHER_KNOBS], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "other knobs" in line]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(said) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for knob in ("control.connector_init=gaussian (the checkpoint has zero)",
                 "optim.lr=0.0001 (the checkpoint has 0.001)",
                 "optim.prompt_dropout=0.0 (the checkpoint has 0.5)",
                 "seed=1 (the checkpoint has 0)", "warm_start=true"):
        assert knob in said[0], said[0]
    assert not (new / "metrics.json").exists() and not (new / "checkpoints").exists()


def test_warm_start_takes_the_weights_and_starts_a_fresh_record(source, tmp_path):
    root, run = source
    last = run / "checkpoints" / "last.ckpt"
    new = tmp_path / "warm"
    summary = train_run(root, new, f"ckpt_path={last}", "warm_start=true", *OTHER_KNOBS)
    warm = summary["warm_start"]
    assert warm["from"] == str(last.resolve()) and warm["step"] == 2
    assert warm["changed"]["seed"] == [0, 1] and warm["changed"]["optim.lr"] == [1e-3, 1e-4]
    assert warm["config_hash"] == torch.load(last, weights_only=False)["cnexp"]["config_hash"]
    # a fresh record from step 0, evaluated on the taken weights (a fresh copy has drift 0)
    assert summary["resumed_at"] == [] and summary["steps"] == 2 and summary["seed"] == 1
    assert summary["history"][0]["step"] == 0 and summary["history"][0]["eval/copy_drift"] > 0
    assert [row["step"] for row in summary["losses"]] == [2]
    assert read_metrics(new / "metrics.json").warm_start == warm
    # its own resume continues it, the warm start still on record
    again = train_run(root, new, "ckpt_path=last", "trainer.max_steps=3", *OTHER_KNOBS)
    assert again["resumed_at"] == [2] and again["warm_start"] == warm


def _rename_loss(checkpoint):
    for row in checkpoint["callbacks"]["RunLog"]["losses"]:
        row["loss"] = row.pop("train/loss")


def _rename_history(checkpoint):
    state = checkpoint["callbacks"]["EvaluationCallback"]
    state["histories"] = state.pop("history")


@pytest.mark.parametrize("edit, said", [
    (_rename_loss, r"RunLog's loss row 0 has fields step, loss \(step, train/loss expected\) "
                   r"\(checkpoint schema 2, cnexp .*\); this cnexp resumes the record it writes, "
                   r"checkpoint schemas 1 to 2"),
    (_rename_history, r"the evaluation state has no 'history' .*checkpoint schema 2"),
    (lambda c: c.pop("pytorch-lightning_version"),
     r"has no 'pytorch-lightning_version' \(checkpoint schema 2, cnexp"),
    (lambda c: c["cnexp"].update(schema=99),
     r"has checkpoint schema 99 \(cnexp .*\); this cnexp \(.*\) reads schemas 1 to 2"),
    (lambda c: c.pop("cnexp"), r"has checkpoint schema 1 .*this cnexp writes schema 2\) and no "
                               r"\.hydra_at_start/config\.yaml"),
], ids=["renamed-loss", "renamed-history", "no-lightning-version", "newer-schema",
        "schema-1-alone"])
def test_a_checkpoint_of_another_record_shape_is_refused_naming_the_versions(
        source, tmp_path, edit, said):
    """Item 2: one CnexpError line (run.py: exit 2), never a mixed record or a KeyError."""
    root, run = source
    bad = edited(run / "checkpoints" / "last.ckpt", tmp_path / "elsewhere" / "bad.ckpt", edit)
    with pytest.raises(CnexpError, match=said) as refused:
        train_run(root, tmp_path / "new", f"ckpt_path={bad}", "eval.enabled=false")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "new" / "metrics.json").exists()


def test_a_schema_1_checkpoint_is_migrated_from_its_run_directory(source, tmp_path):
    """A checkpoint from before run identities resumes in its run directory (the knobs from
    .hydra_at_start/, as the run kept them) and its resume writes schema 2."""
    root, run = source
    copy = shutil.copytree(run, tmp_path / "copy")
    periodic(copy).unlink()
    edited(run / "checkpoints" / "last.ckpt", copy / "checkpoints" / "last.ckpt",
           lambda c: c.pop("cnexp"))
    cfg = compose_cfg(overrides(root, "eval.enabled=false"), out_dir=copy)
    (copy / ".hydra_at_start").mkdir()
    OmegaConf.save(cfg, copy / ".hydra_at_start" / "config.yaml")
    summary = train_run(root, copy, "eval.enabled=false", "ckpt_path=last", "trainer.max_steps=3")
    assert summary["resumed_at"] == [2] and summary["warm_start"] is None
    stamp = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=False)["cnexp"]
    assert stamp["schema"] == 2 and stamp["knobs"]["seed"] == 0


def test_checkpoint_names_pass_hydra_grammar_as_typed_and_old_names_still_resume(source,
                                                                                  tmp_path):
    """Item 13: every file a run writes is `ckpt_path=<path>` without quotes; a run of an older
    cnexp (epoch=0-step=2.ckpt) still resumes by its quoted path."""
    root, run = source
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step-000002.ckpt"]
    for name in names:
        path = run / "checkpoints" / name
        parsed = OverridesParser.create().parse_overrides([f"ckpt_path={path}"])
        assert parsed[0].value() == str(path)
    copy = shutil.copytree(run, tmp_path / "copy")
    old = copy / "checkpoints" / "epoch=0-step=2.ckpt"
    periodic(copy).rename(old)
    (copy / "checkpoints" / "last.ckpt").unlink()
    summary = train_run(root, copy, "eval.enabled=false", f"ckpt_path='{old}'",
                        "trainer.max_steps=3")
    assert summary["resumed_at"] == [2]
