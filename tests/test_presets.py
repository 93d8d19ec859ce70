"""The ablation presets (conf/ablation/): each is the issue's list of knobs and nothing else, at
every base's scale, and every one runs through run.py."""
import os
import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from cnexp.control import get_branch
from cnexp.metrics.clip import LITERATURE_CLIP
from cnexp.module import ControlNetModule, learning_rates
from cnexp.validate import validate
from conftest import ROOT, TINY, compose_cfg

PRESETS = {  # preset -> the knobs it sets (every other value is the baseline's)
    "baseline": {},
    "no_zero_conv": {"control.connector_init": "gaussian",
                     "control.init_scope": "connectors_and_hint"},
    "no_zero_conv_x10": {"control.connector_init": "gaussian", "control.gaussian_std": 0.2,
                         "control.init_scope": "connectors_and_hint"},
    "no_zero_conv_default": {"control.connector_init": "default",
                             "control.init_scope": "connectors_and_hint"},
    "low_lr": {"optim.lr_factor": 0.1},  # 0.1 x the base's rate: 1e-4 here, 1e-6 on SD
    "low_lr_no_zero_conv": {"optim.lr_factor": 0.1, "control.connector_init": "gaussian",
                            "control.init_scope": "connectors_and_hint"},
    "lightweight": {"control.branch": "lite"},
    "scratch_copy": {"control.branch": "scratch"},
    "controlnet_xs": {"control.branch": "xs"},
    "prompt_dropout_0": {"optim.prompt_dropout": 0.0},
    "prompt_dropout_50": {"optim.prompt_dropout": 0.5},  # the paper's 50%, also the baseline's
    "prompt_dropout_100": {"optim.prompt_dropout": 1.0},
    "sd_unlocked": {"control.sd_locked": False},
    "only_mid_control": {"control.only_mid_control": True},
    "t2i_adapter": {"control.branch": "t2i_adapter"},
    "cross_norm": {"control.connector": "cross_norm", "control.connector_init": "default"},
    "low_lr_cross_norm": {"optim.lr_factor": 0.1, "control.connector": "cross_norm",
                          "control.connector_init": "default"},
    "lora_copy": {"control.branch": "lora_copy"},
}


# ---- presets ------------------------------------------------------------------------------------
def _flat(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, value in node.items()
                for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def test_the_presets_are_the_issues_list():
    assert sorted(p.stem for p in (ROOT / "conf" / "ablation").glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_composes_and_changes_only_its_knobs(name):
    cfg = compose_cfg([f"+ablation={name}"])
    validate(cfg)
    assert cfg.ablation == name
    baseline = _flat(OmegaConf.to_container(compose_cfg(["+ablation=baseline"])))
    composed = _flat(OmegaConf.to_container(cfg))
    changed = {k: v for k, v in composed.items() if baseline.get(k) != v and k != "ablation"}
    assert changed == {k: v for k, v in PRESETS[name].items() if baseline.get(k) != v}
    assert {k: composed.get(k) for k in PRESETS[name]} == PRESETS[name]
    # a knob at the baseline's value is written in the preset itself, so the preset keeps
    # meaning its name when the baseline's default moves
    written = _flat(OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "ablation" /
                                                          f"{name}.yaml")))
    assert {k: written.get(k) for k, v in PRESETS[name].items() if baseline.get(k) == v} == \
        {k: v for k, v in PRESETS[name].items() if baseline.get(k) == v}


# ---- presets at every scale: relative learning rates, evaluation sizes per base ------------------
@pytest.mark.parametrize("base, control, decoder", [
    ("tiny", 1e-4, 2e-5),  # exactly the claims study's lr 1e-4 (experiments/claims_study)
    ("sd15", 1e-6, 2e-7), ("sd21", 1e-6, 2e-7)])  # 0.1 x SD's 1e-5, not 10x above it
def test_low_lr_is_a_tenth_of_each_bases_rate(base, control, decoder, tiny_base):
    cfg = compose_cfg([f"base={base}", "+ablation=low_lr"])
    assert learning_rates(cfg.optim) == {"control": control, "decoder": decoder}
    if base == "tiny":  # what the optimizer is given, bit for bit
        module = ControlNetModule(tiny_base, torch.nn.Linear(1, 1), cfg.optim,
                                  branch=get_branch("copy"))
        assert [g["lr"] for g in module.configure_optimizers().param_groups] == [1e-4]


@pytest.mark.parametrize("base, decoder", [("tiny", 2e-4), ("sd15", 2e-6)])
def test_sd_unlocked_decoder_rate_follows_the_base(base, decoder):
    cfg = compose_cfg([f"base={base}", "+ablation=sd_unlocked"])
    assert learning_rates(cfg.optim)["decoder"] == decoder  # the authors' 2e-6 / 1e-5
    cfg = compose_cfg([f"base={base}", "+ablation=sd_unlocked", "optim.decoder_lr=3e-5"])
    assert learning_rates(cfg.optim)["decoder"] == 3e-5  # an explicit rate stays absolute


def test_sd_bases_evaluate_at_the_studys_sizes_with_the_literatures_clip():
    tiny = compose_cfg([])
    assert (tiny.data.eval_size, tiny.eval.fid_reference_size) == (32, 256)  # unchanged
    for base in ("sd15", "sd21"):
        cfg = compose_cfg([f"base={base}"])
        assert (cfg.data.eval_size, cfg.eval.fid_reference_size) == (500, 5000)
        assert cfg.data.val_fraction * 50_000 >= 5000  # fill50k's cut holds the FID reference
        assert cfg.base.clip_model == LITERATURE_CLIP == "openai/clip-vit-large-patch14"
        assert compose_cfg([f"base={base}", "base.clip_model=/my/clip"]).base.clip_model == \
            "/my/clip"


def test_the_sd_study_preset_is_the_papers_arms_on_slurm():
    from test_sweep import compose_with_hydra

    cfg = compose_with_hydra(["+sweep=sd_paper"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")  # not claims.yaml's joblib
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.base.name == "sd15" and (cfg.data.layout, cfg.data.root) == ("hf", "fusing/fill50k")
    params = cfg.hydra.sweeper.params
    assert params["+ablation"].split(",") == ["baseline", "no_zero_conv", "lightweight",
                                              "prompt_dropout_0"]
    assert params["seed"] == "0,1,2"
    assert cfg.trainer.max_steps == 10000 and cfg.optim.lr == 1e-5  # not claims' 400 steps
    assert (cfg.data.eval_size, cfg.eval.fid_reference_size) == (500, 5000)
    claims = compose_with_hydra(["+sweep=claims"])  # the tiny world's study is left as it was
    assert claims.hydra.launcher._target_.endswith("JoblibLauncher")
    assert claims.trainer.max_steps == 400


def test_the_unet_claims_sweep_has_ten_seeds_and_resumes_with_the_same_command():
    """Issue 33: the claims whose measured effect needs at most 10 seeds get 10; a fixed sweep
    directory and ckpt_path=auto make `python run.py +sweep=claims` continue where it stopped."""
    from test_sweep import compose_with_hydra

    from cnexp.analysis.claims import load_claims

    cfg = compose_with_hydra(["+sweep=claims"])
    assert str(cfg.hydra.sweep.dir) == "multirun/claims_study" and cfg.ckpt_path == "auto"
    assert cfg.hydra.sweeper.params["seed"] == ",".join(map(str, range(10)))
    small = compose_with_hydra(["+sweep=small_data"])  # its claims need 4-8 seeds: 10 too
    assert small.hydra.sweeper.params["seed"] == ",".join(map(str, range(10)))
    long = compose_with_hydra(["+sweep=low_lr_long"])  # its claims need 4-8 seeds: 10 too
    assert long.hydra.sweeper.params["seed"] == ",".join(map(str, range(10)))
    assert (long.hydra.sweep.dir, long.ckpt_path) == ("multirun/low_lr_long_study", "auto")
    assert str(small.hydra.sweep.dir) == "multirun/small_data_study" and small.ckpt_path == "auto"
    arms = set(cfg.hydra.sweeper.params["+ablation"].split(","))
    claims = load_claims(ROOT / "experiments" / "claims_study" / "claims.yaml")
    assert {c.arm for c in claims} | {c.reference for c in claims} <= arms


def test_presets_compose_with_knob_overrides():
    cfg = compose_cfg(["+ablation=no_zero_conv", "optim.prompt_dropout=0"])
    assert cfg.control.connector_init == "gaussian" and cfg.optim.prompt_dropout == 0.0


def test_an_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["+ablation=no_zero_convs"])
    assert all(f"\t{name}\n" in f"{err.value}\n" for name in PRESETS)


@pytest.mark.slow
@pytest.mark.skipif(not (TINY / "model_index.json").exists(), reason="needs assets/tinyworld")
def test_every_preset_runs_fast_dev_run(tmp_path):
    """Every preset through run.py, as one multirun: one interpreter start for all of them."""
    from cnexp.analysis.runs import OK, read_run

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", f"+ablation={','.join(sorted(PRESETS))}",
           "trainer.fast_dev_run=true", f"hydra.sweep.dir={sweep}",
           f"data.root={tmp_path / 'data'}", "data.train_size=32", "data.val_size=8",
           "data.test_size=8", "data.eval_size=4", "sampling.steps=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = {r.ablation: r for r in map(read_run, sorted(p for p in sweep.iterdir()
                                                            if p.is_dir()))}
    assert sorted(records) == sorted(PRESETS)
    for name, record in records.items():
        assert record.status == OK and (record.path / "metrics.json").exists(), record.error
        # cross_norm replaces the zero convolutions too (ControlNeXt: scale 1 from the start)
        assert (record.base_damage > 0) == ("no_zero_conv" in name or "cross_norm" in name), \
            (name, record.base_damage)


def test_the_transformer_claims_sweep_runs_every_arm_its_claims_file_names_on_tiny_dit():
    from test_sweep import compose_with_hydra

    from cnexp.analysis.claims import load_claims

    cfg = compose_with_hydra(["+sweep=claims_dit"])
    assert (cfg.base.name, cfg.base.family) == ("tiny_dit", "sd3")
    assert str(cfg.hydra.sweep.dir) == "multirun/claims_dit_study" and cfg.ckpt_path == "auto"
    arms = set(cfg.hydra.sweeper.params["+ablation"].split(","))
    assert cfg.hydra.sweeper.params["seed"] == "0,1,2,3,4,5,6,7,8,9"
    claims = load_claims(ROOT / "experiments" / "transformer_study" / "claims.yaml")
    assert {c.arm for c in claims} | {c.reference for c in claims} <= arms
    unet = load_claims(ROOT / "experiments" / "claims_study" / "claims.yaml")
    def tested(claims_file):
        return {(c.arm, c.reference, c.metric, c.step, c.expect) for c in claims_file}

    assert tested(claims) == tested(unet)  # the UNet's tests, one for one
