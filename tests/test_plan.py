"""`python -m cnexp.plan`: the plan of a run or a sweep, printed without training, and what it
refuses. On this CPU: the tiny world, an SD 1.5-shaped random bundle (cnexp.bench) on fill50k-
layout data, and the SD study preset (+sweep=sd_paper) as the SLURM array it submits."""
from __future__ import annotations

import re

import pytest
from conftest import TINY

from cnexp.launch.plan import main

pytestmark = pytest.mark.skipif(not (TINY / "model_index.json").exists(),
                                reason="needs assets/tinyworld")

TINY_RUN = ["data.batch_size=4", "trainer.max_steps=12", "eval.every_n_steps=5",
            "eval.curve_images=2", "data.eval_size=4", "data.train_size=16", "data.val_size=8",
            "data.test_size=4"]


def plan(capsys, *args: str) -> tuple[int, dict[str, str], str]:
    """(exit code, label -> text of the printed plan, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    fields = {}
    for line in out.splitlines()[1:]:
        match = re.match(r"  (\S.{12}) (.*)", line)
        if match:
            fields[match.group(1).strip()] = match.group(2)
    return code, fields, err + out


@pytest.fixture(scope="module")
def sd_shaped(tmp_path_factory):
    """An SD 1.5-shaped random bundle (every depth, 77-token context, 1/20 of the channels) and
    fill50k-layout triples at 64 px: 12 train, 6 validation."""
    from cnexp.bench.sd_shapes import build_bundle, write_triples

    root = tmp_path_factory.mktemp("sd_shaped")
    bundle = build_bundle(root / "bundle", "15", width=0.05)
    data = write_triples(root / "data", {"train": 12, "val": 6, "test": 2}, 64)
    return [f"base.pretrained={bundle}", f"base.clip_model={TINY / 'clip'}", f"data.root={data}",
            "data.resolution=64"]


def test_the_tiny_worlds_plan(capsys, tmp_path, private_cache):
    code, fields, _ = plan(capsys, *TINY_RUN, f"data.root={tmp_path / 'data'}")
    assert code == 0
    assert fields["device"].startswith("cpu x 1")
    assert fields["precision"] == "32-true, frozen base float32"
    assert fields["batch"] == "4 per device x 1 device(s) = 4 global"
    assert fields["steps"] == "12 at lr 0.001"
    assert fields["base"].endswith("local directory") and fields["clip"].endswith("local directory")
    assert fields["data"].endswith("generated on first use (tiny world)")
    # step 0 and the end in full (4 images x 4 settings), the curve at steps 5 and 10 (2 images)
    assert fields["evaluation"].startswith("2 full (4 images x 4 prompt settings = 16 each), "
                                           "2 curve-only (2 images): 36 images x 10 sampling")
    assert fields["caches"].startswith(str(private_cache))  # $CNEXP_CACHE
    # 16 images x 2x4x16x16 latent moments + 17 captions x 32 tokens x 64, fp32
    assert fields["encoder cache"].startswith(f"{(16 * 2048 + 17 * 2048) * 4 / 1024:.1f} KiB")
    assert fields["time"].startswith("not measured")
    assert not (tmp_path / "data").exists()  # a plan generates nothing
    assert fields["fid"].startswith("clip features")
    # eval.metrics picks what is planned: CLIP score alone, no FID
    _, fields, _ = plan(capsys, *TINY_RUN, f"data.root={tmp_path / 'data'}",
                        "eval.metrics=[clip_score]")
    assert "fid" not in fields and fields["clip"].endswith("local directory")
    _, fields, _ = plan(capsys, *TINY_RUN, f"data.root={tmp_path / 'data'}",
                        "eval.metrics=[fid]", "eval.fid_feature=inception")
    assert fields["clip"] == "not used" and fields["fid"].startswith("inception")


def test_an_sd_shaped_plan_reads_the_bundle_and_the_data(capsys, sd_shaped):
    code, fields, _ = plan(capsys, "base=sd15", "data=fill50k", *sd_shaped, "data.eval_size=6",
                           "eval.fid_reference_size=6")
    assert code == 0, fields
    assert fields["steps"] == "1000 at lr 1e-05"
    assert fields["base"].endswith("local directory")
    assert re.search(r"\(fill50k\): 12 train, 6 validation samples$", fields["data"])
    assert fields["evaluation"].startswith("2 full (6 images x 4 prompt settings = 24 each)")
    assert fields["fid"].startswith("inception features, 6 samples against 6 real")
    # the bundle's own shapes: 4 latent channels at 64 / 8 px, 77 tokens of its text width
    assert "latents 12 x 2x4x8x8, text 13 captions x 77x" in fields["encoder cache"]


def test_the_plan_refuses_what_would_fail_later(capsys, sd_shaped, tmp_path):
    # SD's evaluation sizes (500 images, FID against 5000) on 6 validation samples; a base
    # that is not there
    code, _, err = plan(capsys, "base=sd15", "data=fill50k", *sd_shaped,
                        f"base.pretrained={tmp_path / 'no_such_bundle'}")
    assert code == 2
    assert "plan refused (nothing was trained)" in err
    assert f"base.pretrained='{tmp_path / 'no_such_bundle'}' cannot be loaded" in err
    assert "data.eval_size=500 but the validation split holds 6: set data.eval_size=6" in err
    assert "6 real validation images (statistics cached once; eval.fid_reference_size=5000 " \
        "is more than the split holds)" in err  # FID runs, on fewer references: said, not refused
    code, _, err = plan(capsys, "base=sd15", "data=fill50k")  # no data.root
    assert code == 2 and "add data.root=/path/to/data" in err
    code, _, err = plan(capsys, "seed=0,1")  # a sweep without -m: run.py would fail too
    assert code == 2 and "with -m" in err


def test_the_sd_study_plans_its_slurm_array(capsys, sd_shaped):
    code, fields, out = plan(capsys, "--time-steps", "0", "+sweep=sd_paper", "data=fill50k",
                             *sd_shaped, "data.eval_size=6", "eval.fid_reference_size=6")
    assert code == 0, out
    assert fields["launcher"].startswith("SLURM")
    # the job's GPU decides the device (cnexp/run/context.py), whatever this machine has
    assert fields["device"].startswith("gpu x 1")
    assert fields["precision"].endswith("frozen base bfloat16")
    assert fields["steps"] == "10000 at lr 1e-05"
    assert fields["jobs"].startswith("12 in multirun/sd_paper/")
    names = re.findall(r"^    (\d+_\S+)$", out, re.M)
    assert names[:5] == ["0_baseline-s0", "1_no_zero_conv-s0", "2_lightweight-s0",
                         "3_prompt_dropout_0-s0", "4_baseline-s1"] and len(names) == 12


def test_a_multirun_names_its_jobs_as_their_directories(capsys, tmp_path):
    code, fields, out = plan(capsys, "-m", *TINY_RUN, f"data.root={tmp_path / 'data'}",
                             "seed=0,1", "optim.lr_factor=1,0.1")
    assert code == 0, out
    assert fields["jobs"].startswith("4 in multirun/")
    assert re.findall(r"^    (\d+_\S+)$", out, re.M) == [
        "0_baseline-s0_lr_factor=1", "1_baseline-s0_lr_factor=0.1",
        "2_baseline-s1_lr_factor=1", "3_baseline-s1_lr_factor=0.1"]
    from hydra.core.hydra_config import HydraConfig

    assert not HydraConfig.initialized()  # the plan's jobs do not leak into the caller


def test_time_steps_times_the_run_on_this_machine(capsys, tmp_path):
    code, fields, out = plan(capsys, "--time-steps", "1", *TINY_RUN,
                             f"data.root={tmp_path / 'data'}")
    assert code == 0, out
    assert re.match(r"[\d.]+ s per training step \(job 0, timed over 1 steps", fields["time"])
    assert re.search(r"^    baseline-s0: ~\d+ min \d+ s \(12 steps, evaluation ~", out, re.M)
