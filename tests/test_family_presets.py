"""Every ablation preset on every family's tiny random bundle: the ones that apply run through
run.py (one multirun), the others are refused before anything runs, naming the family."""
import os
import subprocess
import sys

import pytest
from test_presets import PRESETS

from cnexp.errors import ConfigError
from cnexp.validate import validate
from conftest import ROOT, compose_cfg

# base -> the presets its family refuses (docs/ablations.md, "Families": why each)
REFUSED = {
    "tiny_sdxl": {"controlnet_xs", "t2i_adapter"},
    "tiny_sd3": {"controlnet_xs", "t2i_adapter", "lora_copy", "sd_unlocked", "only_mid_control",
                 "cross_norm", "low_lr_cross_norm"},
    "tiny_flux": {"controlnet_xs", "t2i_adapter", "lora_copy", "sd_unlocked", "only_mid_control",
                  "cross_norm", "low_lr_cross_norm"},
}


def applicable(base: str) -> list[str]:
    return sorted(set(PRESETS) - REFUSED[base])


@pytest.mark.parametrize("base,preset", [(b, p) for b in REFUSED for p in sorted(REFUSED[b])])
def test_a_preset_the_family_cannot_run_is_refused_by_name(base, preset, tmp_path):
    cfg = compose_cfg([f"base={base}", f"+ablation={preset}"], out_dir=tmp_path)
    family = cfg.base.family
    with pytest.raises(ConfigError, match=f"base.family={family}"):
        validate(cfg, warn=False)


@pytest.mark.slow
@pytest.mark.parametrize("base", sorted(REFUSED))
def test_every_applicable_preset_runs_on_the_family(base, tmp_path):
    """One multirun per family (one interpreter start for all of its presets)."""
    from cnexp.analysis.runs import OK, read_run

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", f"base={base}",
           f"+ablation={','.join(applicable(base))}", "trainer.fast_dev_run=true",
           f"hydra.sweep.dir={sweep}", f"data.root={tmp_path / 'data'}", "data.train_size=16",
           "data.val_size=4", "data.test_size=4", "data.eval_size=2", "sampling.steps=2",
           "eval.prompt_settings=[perfect]", "logger.mode=disabled"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = {r.ablation: r for r in map(read_run, sorted(p for p in sweep.iterdir()
                                                            if p.is_dir()))}
    assert sorted(records) == applicable(base)
    for name, record in records.items():
        assert record.status == OK, (name, record.error)
        assert (record.base_damage > 0) == ("no_zero_conv" in name or "cross_norm" in name), \
            (name, record.base_damage)
