"""Bad input (issue 8): each gives one clear error naming the file, field or override and the fix,
and nothing already written is lost. One test per row of the table in docs/reliability.md."""
import errno
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import ROOT, compose_cfg
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_toy import ToyModule

from cnexp.base import BaseModelUnavailable, load_base
from cnexp.config import DataConfig
from cnexp.data.images import DataError
from cnexp.errors import ConfigError
from cnexp.run.checkpoint_io import CheckpointError, SafeCheckpointIO
from cnexp.validate import validate


def run_py(*overrides, env=None, timeout=300):
    """`python run.py ...` as a user runs it: (exit code, everything it printed)."""
    proc = subprocess.run([sys.executable, "run.py", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr


# 1. unknown preset: Hydra's message lists the valid names (before any heavy import)
def test_unknown_preset_lists_the_available_ones():
    code, output = run_py("+ablation=nope")
    assert code == 1, output
    assert "Could not find 'ablation/nope'" in output
    assert "Available options in 'ablation'" in output
    assert "no_zero_conv" in output and "lightweight" in output
    assert "Traceback" not in output


# 2. unknown knob: the typed schema rejects it at composition
def test_unknown_knob_names_the_key_and_its_section():
    code, output = run_py("optim.lrr=1")
    assert code == 1, output
    assert "Could not override 'optim.lrr'" in output
    assert "Key 'lrr' not in 'OptimConfig'" in output
    assert "Traceback" not in output


# 2b. misspelt choice: the schema's Enum rejects it at composition, listing the choices
def test_misspelt_choice_names_the_knob_and_lists_the_choices():
    code, output = run_py("control.branch=lit")
    assert code == 1, output
    from cnexp.knobs import Branch  # the registry's branches, in its order
    choices = ", ".join(b.name for b in Branch)
    assert {"copy", "scratch", "lite", "xs"} <= {b.name for b in Branch}
    assert f"Invalid value 'lit', expected one of [{choices}]" in output
    assert "full_key: control.branch" in output and "Traceback" not in output


# 3. knob out of range: one ConfigError naming the override; run.py exits 2 without a traceback
@pytest.mark.parametrize("override, message", [
    ("optim.prompt_dropout=1.5", r"optim\.prompt_dropout is 1\.5; it is a probability, use a "
                                 r"value in \[0, 1\] \(override it: python run\.py "
                                 r"optim\.prompt_dropout=\.\.\.\)"),
    ("optim.lr=-1", r"optim\.lr is -1\.0; the learning rate must be > 0"),
    ("data.resolution=60", r"data\.resolution is 60; use a positive multiple of 8 \(the VAE's "
                           r"downsampling\), e\.g\. 56"),
])
def test_out_of_range_knob_names_the_override(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg([override]))


def test_run_py_out_of_range_knob_exits_2_with_the_message_only(tmp_path):
    code, output = run_py("optim.prompt_dropout=1.5", f"hydra.run.dir={tmp_path}",
                          "logger.mode=disabled")
    assert code == 2, output
    assert "optim.prompt_dropout is 1.5; it is a probability, use a value in [0, 1]" in output
    assert "Traceback" not in output
    assert (tmp_path / "error.txt").exists()  # the traceback is kept in the run directory


# 4. base: a missing directory, or a hub id while offline
def test_missing_base_path_and_unreachable_hub(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(BaseModelUnavailable, match=r"(?s)no such directory.*base\.pretrained=.*"
                                                   r"python run\.py base=tiny"):
        load_base(compose_cfg([f"base.pretrained={missing}"]).base)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelUnavailable, match=r"'stable-diffusion-v1-5/stable-diffusion-v1-5'"
                                                   r": the hub is unreachable and it is not in "
                                                   r"the local cache"):
        load_base(compose_cfg(["base=sd15"]).base)


# 5. data root missing or malformed (tests/test_data_errors.py covers every layout and file)
def test_missing_or_malformed_data_root(tmp_path):
    from cnexp.data.datamodule import TriplesDataModule

    def setup(root):
        TriplesDataModule(DataConfig(root=str(root), resolution=16)).setup()

    with pytest.raises(DataError, match=r"data\.root '.*absent' does not exist: point data\.root "
                                        r"at a directory holding prompt\.json"):
        setup(tmp_path / "absent")
    (tmp_path / "prompt.json").write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"prompt\.json:1 is not a JSON object"):
        setup(tmp_path)


# 6. output directory that cannot be created (below a file: fails for root too, unlike chmod)
def test_unwritable_output_dir(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    bad = tmp_path / "file.txt" / "run"
    with pytest.raises(ConfigError, match=r"paths\.output_dir='.*file\.txt/run' cannot be "
                                          r"created: .*file\.txt is a file, not a directory"):
        validate(compose_cfg(out_dir=bad))
    code, output = run_py(f"hydra.run.dir={bad}")  # Hydra creates it before run.py's main
    assert code == 2, output
    assert f"hydra.run.dir='{bad}' cannot be created" in output and "Traceback" not in output
    monkeypatch.setattr(os, "access", lambda *args: False)  # a read-only dir, as non-root sees it
    with pytest.raises(ConfigError, match=r"paths\.output_dir='.*' cannot be created: .* is not "
                                          r"writable; choose a writable directory"):
        validate(compose_cfg(out_dir=tmp_path / "run"))


# 7. disk full while saving a checkpoint: the previous one survives, the error says so
def _full_disk_after(monkeypatch, good_step: int):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step", 0) > good_step:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    _full_disk_after(monkeypatch, good_step=1)
    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[SafeCheckpointIO()],
                        callbacks=[ModelCheckpoint(ckpt_dir, save_last=True,
                                                   every_n_train_steps=1)])
    with pytest.raises(CheckpointError, match=r"could not save checkpoint .*step=2\.ckpt: disk "
                                              r"full \(No space left on device\); the previous "
                                              r"checkpoint\(s\) are intact: .*last\.ckpt"):
        trainer.fit(ToyModule())
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    for path in ckpt_dir.iterdir():  # whole, loadable, and the last good step
        assert torch.load(path, weights_only=False)["global_step"] == 1


def test_disk_full_on_last_ckpt_leaves_it_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    _full_disk_after(monkeypatch, good_step=1)
    with pytest.raises(CheckpointError, match="disk full"):
        SafeCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left


# 8. ckpt_path of another architecture: the differing keys, a few of each with counts
def _module(base, *overrides):
    from cnexp.control import build_controlnet
    from cnexp.module import ControlNetModule

    cfg = compose_cfg(list(overrides))
    return ControlNetModule(base, build_controlnet(base.unet, cfg.control), cfg.optim)


def _save(module, path):
    checkpoint = {"state_dict": module.state_dict(), "global_step": 4}
    module.on_save_checkpoint(checkpoint)  # as Lightning does: the trainable part only
    torch.save(checkpoint, path)
    return path


def test_checkpoint_of_another_architecture_names_the_differing_keys(tmp_path, tiny_base):
    lite = _save(_module(tiny_base, "control.branch=lite"), tmp_path / "lite.ckpt")
    copy = _module(tiny_base)
    with pytest.raises(CheckpointError, match=r"ckpt_path '.*lite\.ckpt' was saved by a different "
                                              r"architecture: \d+ missing keys \(e\.g\. controlnet"
                                              r"\..*\); \d+ unexpected keys \(e\.g\. controlnet\."
                                              r".*base=, control\.\*") as err:
        SafeCheckpointIO(copy).load_checkpoint(lite)
    assert str(err.value).count(", controlnet.") <= 4  # a few names, not hundreds
    own = _save(_module(tiny_base), tmp_path / "copy.ckpt")
    assert SafeCheckpointIO(copy).load_checkpoint(own)["global_step"] == 4
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.ckpt' is not a readable checkpoint"):
        SafeCheckpointIO(copy).load_checkpoint(tmp_path / "junk.ckpt")


def test_run_py_resume_from_another_architecture_exits_2(tmp_path, tiny_base):
    lite = _save(_module(tiny_base, "control.branch=lite"), tmp_path / "lite.ckpt")
    # warm_start: a hand-made checkpoint carries no run (issue 34), so only its weights can be
    # taken, and those are refused for their architecture
    code, output = run_py(f"ckpt_path={lite}", "warm_start=true",
                          f"hydra.run.dir={tmp_path / 'run'}",
                          f"data.root={tmp_path / 'data'}", "data.train_size=8",
                          "data.val_size=4", "data.test_size=4", "data.eval_size=2",
                          "eval.enabled=false", "logger.mode=disabled", "trainer.max_steps=2")
    assert code == 2, output  # fails before the first step
    assert "was saved by a different architecture" in output and "Traceback" not in output
