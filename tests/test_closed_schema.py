"""Issue 34, items 3, 4, 8, 9: the schema is closed (a key it lacks is refused, `+` or not,
naming the nearest knob), and every derived value is the one recorded: a batch or evaluation set
larger than its split is fitted, said and recorded the same way by the run and the plan; count
knobs have ranges; more CPU processes than cores are said."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, compose_cfg

from cnexp.errors import CnexpError, ConfigError
from cnexp.validate import validate

needs_tiny = pytest.mark.skipif(not (TINY / "model_index.json").exists(),
                                reason="needs assets/tinyworld")
CONECTOR = r"control\.conector is not a knob: did you mean control\.connector\?"


def plan(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m cnexp.plan ...` in process: (exit code, stdout, stderr)."""
    from cnexp.launch.plan import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


# ---- 3. a misspelt knob, + or not -------------------------------------------------------------
def test_a_plus_added_unknown_key_is_refused_naming_the_nearest_knob():
    with pytest.raises(ConfigError, match=CONECTOR + r" \(python run\.py "
                                          r"control\.connector=cross_norm\)"):
        validate(compose_cfg(["+control.conector=cross_norm"]))
    # group appends and keys under a dict knob are not unknown keys
    validate(compose_cfg(["+ablation=cross_norm", "+data.annotator_params.low_threshold=100"]))


def test_run_py_names_the_nearest_knob_before_hydras_hint(tmp_path, capsys):
    # trainer.max_steps=0: were the key let through, the run would stop at once, not train
    added = run_py("+control.conector=cross_norm", "trainer.max_steps=0",
                   f"hydra.run.dir={tmp_path / 'a'}")
    assert added.returncode == 2 and re.search(CONECTOR, added.stderr), added.stderr
    assert not (tmp_path / "a").exists()  # refused before Hydra made a run directory
    plain = run_py("control.conector=cross_norm", f"hydra.run.dir={tmp_path / 'b'}")
    assert plain.returncode == 1  # Hydra's own refusal follows, after cnexp's answer to it
    assert re.search(CONECTOR, plain.stderr) and "Traceback" not in plain.stderr
    assert plain.stderr.index("did you mean") < plain.stderr.index("use +control.conector")
    from cnexp.schema import check_command_line  # what run.py calls before Hydra composes

    check_command_line(["+ablation=cross_norm", "+sweep=paper", "hydra.run.dir=x", "seed=0,1",
                        "hydra/launcher=joblib", "--cfg", "job"])  # groups, hydra, options
    assert capsys.readouterr().err == ""


@needs_tiny
@pytest.mark.parametrize("override", ["control.conector=cross_norm",
                                      "+control.conector=cross_norm"])
def test_the_plan_refuses_an_unknown_key_naming_the_nearest_knob(capsys, override):
    code, _, err = plan(capsys, override)
    assert code == 2 and re.search(CONECTOR, err)


# ---- 4. a batch larger than the training split ------------------------------------------------
def small_data(tmp_path, *overrides: str):
    """A setup data module of a 6 / 2 / 1-sample tiny world and its run config."""
    from cnexp.data.datamodule import TriplesDataModule

    cfg = compose_cfg([f"data.root={tmp_path / 'data'}", "data.train_size=6", "data.val_size=2",
                       "data.test_size=1", *overrides])
    data = TriplesDataModule(cfg.data)  # the run's config node, as cnexp/train.py passes it
    data.prepare_data()
    data.setup()
    return cfg, data


def test_a_batch_larger_than_the_split_is_fitted_said_and_recorded(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        cfg, data = small_data(tmp_path, "data.batch_size=64")
    said = ("data.batch_size=64 but the training split holds 6: set data.batch_size=6, or give "
            "the split more samples (data.train_size for the tiny world). This run's batch is 6 "
            "(config.yaml records data.batch_size=6)")
    assert said in caplog.text
    assert cfg.data.batch_size == 6  # the config that config.yaml and W&B record
    assert len(next(iter(data.train_dataloader()))["caption"]) == 6


@needs_tiny
def test_the_plan_shows_and_says_the_batch_the_run_trains_at(capsys, tmp_path):
    code, out, err = plan(capsys, "data.batch_size=64", "data.train_size=30",
                          f"data.root={tmp_path / 'data'}")
    assert code == 0, err
    assert "batch         30 per device x 1 device(s) = 30 global" in out
    assert "data.batch_size=64 but the training split holds 30" in err


# ---- 8. data.eval_size: a range, and one fit for the plan and the run -------------------------
@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_size_below_one_is_refused_by_run_plan_and_evaluate(capsys, value):
    message = f"data.eval_size is {value}; must be > 0"
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_cfg([f"data.eval_size={value}"]))
    from cnexp.evaluate import check_overrides

    with pytest.raises(CnexpError, match=re.escape(message)):
        check_overrides([f"data.eval_size={value}"])
    if (TINY / "model_index.json").exists():
        code, _, err = plan(capsys, f"data.eval_size={value}")
        assert code == 2 and message in err


@needs_tiny
def test_plan_and_run_fit_an_evaluation_set_larger_than_the_split_alike(capsys, tmp_path,
                                                                           caplog):
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        cfg, data = small_data(tmp_path, "data.eval_size=500")
    said = ("data.eval_size=500 but the validation split holds 2: set data.eval_size=2, or give "
            "the split more samples (data.val_fraction, or data.val_size for the tiny world). "
            "This run's evaluation set has 2 image(s) (config.yaml records data.eval_size=2)")
    assert said in caplog.text
    assert cfg.data.eval_size == 2 and len(data.eval_batch()["caption"]) == 2
    code, out, err = plan(capsys, "data.eval_size=500", "data.train_size=6", "data.val_size=2",
                          "data.test_size=1", f"data.root={tmp_path / 'data'}")
    assert code == 0, err  # the run evaluates on the 2 it has: the plan no longer refuses that
    assert said in err and "(2 images x" in out


@pytest.mark.parametrize("override", [
    "data.train_size=0", "data.val_size=0", "data.test_size=-1", "eval.fid_reference_size=0",
    "eval.grid_rows=0", "trainer.devices=0", "trainer.devices=-3", "trainer.num_nodes=0",
    "trainer.accumulate_grad_batches=0", "trainer.log_every_n_steps=0",
    "trainer.checkpoint_every_n_steps=-1", "control.conditioning_channels=0",
    "base.resolution=0"])
def test_every_count_knob_has_a_range(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} is "):
        validate(compose_cfg([override]))


# ---- 9. more CPU processes than cores ----------------------------------------------------------
DDP_CPU = ["trainer=cpu", "trainer.strategy=ddp"]


@needs_tiny
def test_more_cpu_processes_than_cores_are_said_by_plan_and_run(capsys, monkeypatch, caplog,
                                                                tmp_path):
    from cnexp.validate import config_warnings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine
    for slurm in ("SLURM_CPUS_PER_TASK", "SLURM_NTASKS"):  # not a SLURM job's share
        monkeypatch.delenv(slurm, raising=False)
    said = "trainer.devices=4 starts 4 CPU training processes on this machine's 2 core(s)"
    assert not config_warnings(compose_cfg([*DDP_CPU, "trainer.devices=2"]))  # trainer=ddp_cpu
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        validate(compose_cfg([*DDP_CPU, "trainer.devices=4"], out_dir=tmp_path / "run"))
    assert said in caplog.text
    code, _, err = plan(capsys, *DDP_CPU, "trainer.devices=4", "data.batch_size=4",
                        f"data.root={tmp_path / 'data'}")
    assert code == 0 and said in err and "set trainer.devices=2 or fewer" in err


def test_an_item_of_a_list_knob_is_a_key_hydra_takes():
    from cnexp.schema import command_line_unknowns, is_knob

    assert is_knob("eval.prompt_settings.0")
    assert command_line_unknowns(["eval.prompt_settings.0=none"]) == []
    assert not is_knob("eval.prompt_settings.first")


def test_the_nearest_knob_prefers_the_right_name_in_another_section():
    from cnexp.schema import not_a_knob

    assert "did you mean data.eval_size?" in not_a_knob("eval.eval_size", 8)
    assert "did you mean control.connector?" in not_a_knob("control.conector", "cross_norm")
    message = not_a_knob("data.annotator_param.low", 50)  # a misspelt dict knob
    assert "data.annotator_param is no section either (the nearest: data.annotator_params)" \
        in message



def test_the_plan_counts_devices_given_as_ids():
    from omegaconf import OmegaConf

    from cnexp.launch.plan_checks import world_size

    def world(devices):
        return world_size(OmegaConf.create({"trainer": {"devices": devices, "num_nodes": 1}}))

    assert [world("0,1"), world([0, 1, 2]), world(4), world("auto")] == [2, 3, 4, 1]
