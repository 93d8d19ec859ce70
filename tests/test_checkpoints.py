"""Checkpoints a resume can trust (issue 25, findings 1 and 3) and one write per save (issue 22,
item 6): a resume with a larger max_steps or in a copied run directory keeps `last.ckpt` the
newest step, a truncated `last.ckpt` falls back to the newest intact checkpoint, and `last.ckpt`
is a hard link to the periodic checkpoint rather than a second copy of its bytes.

Tiny-world runs in-process (few steps, no evaluation), as tests/test_encoder_store.py does.
"""
import logging
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg

from cnexp.run.checkpoint_io import CheckpointError
from cnexp.run.resume import resume_path

SMALL = ["data.train_size=16", "data.val_size=4", "data.test_size=4", "data.batch_size=4",
         "eval.enabled=false", "logger.mode=disabled", "logger.csv=false",
         "trainer.enable_progress_bar=false", "export=false"]


def train_run(root: Path, out: Path, *extra) -> dict:
    from cnexp.train import train

    return train(compose_cfg([*SMALL, f"data.root={root / 'data'}", f"paths.cache={root / 'cache'}",
                              *extra], out_dir=out))


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def listing(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """A 4-step run resumed twice with a larger trainer.max_steps (8, then 12, ckpt_path=last):
    the default interval, max_steps // 4, is 1, 2, 3. The first segment's torch.save calls into
    checkpoints/ are recorded as (step, file name)."""
    root = tmp_path_factory.mktemp("extended")
    run, writes, real_save = root / "run", [], torch.save

    def counting_save(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        if "checkpoints" in name:
            writes.append((obj.get("global_step"), Path(name).name))
        return real_save(obj, f, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", counting_save)
        train_run(root, run, "trainer.max_steps=4")
    train_run(root, run, "trainer.max_steps=8", "ckpt_path=last")
    summary = train_run(root, run, "trainer.max_steps=12", "ckpt_path=last")
    return root, run, writes, summary


def test_resumes_with_a_larger_max_steps_keep_last_ckpt_the_newest_step(extended):
    _, run, _, summary = extended
    assert summary["resumed_at"] == [4, 8]  # the second resume started where the first ended
    assert listing(run) == ["last.ckpt", "step-000012.ckpt"]  # no last-v1.ckpt
    assert step_of(run / "checkpoints" / "last.ckpt") == 12


def test_each_save_writes_the_checkpoint_once_and_links_last_ckpt(extended):
    _, run, writes, _ = extended
    assert [s for s, _ in writes] == [1, 2, 3, 4]  # no last.ckpt
    # each through a temporary file beside it (cnexp.fileio.AtomicFile)
    assert all(fnmatch(name, f".step-{s:06d}.ckpt.*.tmp") for s, name in writes), writes
    last, periodic = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "step-000012.ckpt"
    assert os.path.samefile(last, periodic) and os.stat(last).st_nlink == 2
    assert not last.is_symlink()  # a copy of the run directory copies the bytes


def test_a_copied_run_directory_resumes_into_its_own_last_ckpt(extended, tmp_path):
    root, run, _, _ = extended
    before = {p.name: (p.stat().st_ino, step_of(p)) for p in (run / "checkpoints").iterdir()}
    copy = shutil.copytree(run, tmp_path / "copy")
    summary = train_run(root, copy, "trainer.max_steps=15", "ckpt_path=last")  # saves at 15
    assert summary["resumed_at"] == [4, 8, 12]
    assert listing(copy) == ["last.ckpt", "step-000015.ckpt"]
    assert step_of(copy / "checkpoints" / "last.ckpt") == 15
    assert {p.name: (p.stat().st_ino, step_of(p))
            for p in (run / "checkpoints").iterdir()} == before  # the original untouched


def test_a_truncated_last_ckpt_falls_back_to_the_newest_intact_checkpoint(extended, tmp_path,
                                                                           caplog):
    root, run, _, _ = extended
    copy = shutil.copytree(run, tmp_path / "copy")
    last = copy / "checkpoints" / "last.ckpt"
    whole = last.read_bytes()
    last.unlink()  # a new file: the periodic checkpoint (its hard link until now) stays whole
    last.write_bytes(whole[:len(whole) // 2])
    periodic = copy / "checkpoints" / "step-000012.ckpt"
    for wanted in ("last", "auto"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cnexp"):
            assert resume_path(wanted, copy) == str(periodic)
        said = caplog.text
        assert f"{last}: it is not a readable checkpoint" in said
        assert "resuming from step-000012.ckpt (step 12), the newest intact" in said
    summary = train_run(root, copy, "trainer.max_steps=13", "ckpt_path=auto")
    assert summary["resumed_at"] == [4, 8, 12] and step_of(last) == 13


def _fake(path: Path, step: int) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": step}, path)
    return path


def test_the_newest_step_wins_over_a_stale_last_ckpt(tmp_path, caplog):
    """A run that the old state key left with last.ckpt behind last-v1.ckpt resumes from the
    newest step, naming both."""
    from cnexp.run.checkpoints import resume_checkpoint

    last, newer = _fake(tmp_path / "last.ckpt", 4), _fake(tmp_path / "last-v1.ckpt", 8)
    _fake(tmp_path / "epoch=0-step=4.ckpt", 4)
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        assert resume_checkpoint(tmp_path) == newer
    assert f"{last}: it holds step 4; resuming from last-v1.ckpt (step 8)" in caplog.text
    caplog.clear()
    newer.unlink()
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        assert resume_checkpoint(tmp_path) == last  # last.ckpt first among equals, silently
    assert caplog.text == ""


def test_only_broken_checkpoints_is_one_error_naming_each(tmp_path):
    from cnexp.run.checkpoints import resume_checkpoint

    (tmp_path / "last.ckpt").write_bytes(b"")
    (tmp_path / "epoch=0-step=4.ckpt").write_bytes(b"PK\x03\x04 half a zip")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "epoch=0-step=2.ckpt")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume in .*\(last\.ckpt: "
                       r"it is empty; epoch=0-step=2\.ckpt: it is not a Lightning checkpoint .*; "
                       r"epoch=0-step=4\.ckpt: it is not a readable checkpoint .*\)\. Restore"):
        resume_checkpoint(tmp_path)
    assert resume_checkpoint(tmp_path / "absent") is None  # nothing saved: auto starts fresh


def test_a_checkpoint_under_the_old_state_key_still_restores_the_callback(tmp_path):
    """Checkpoints written before the constant key named it after the interval."""
    from cnexp.run.checkpoints import STATE_KEY, RunCheckpoints

    callback = RunCheckpoints(tmp_path / "checkpoints", every=3)
    old_key = "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 6, " \
              "'every_n_epochs': 0, 'train_time_interval': None}"
    state = {"dirpath": "/elsewhere/checkpoints", "best_model_path":
             "/elsewhere/checkpoints/epoch=0-step=6.ckpt", "last_model_path":
             "/elsewhere/checkpoints/last.ckpt", "best_model_score": None, "best_k_models": {},
             "kth_best_model_path": "", "kth_value": torch.tensor(float("inf")),
             "current_score": None, "monitor": None}
    checkpoint = {"callbacks": {old_key: state}}
    callback.on_load_checkpoint(None, None, checkpoint)
    callback.load_state_dict(checkpoint["callbacks"][STATE_KEY])
    here = str(callback.dirpath)
    assert callback.last_model_path == os.path.join(here, "last.ckpt")  # re-rooted by name
    assert callback.best_model_path == os.path.join(here, "epoch=0-step=6.ckpt")
