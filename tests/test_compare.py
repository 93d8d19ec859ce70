"""compare on fixed synthetic run directories: statistics checked against a hand computation."""
import csv
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cnexp.analysis.compare import compare, main, select_runs, split_key, summarize
from cnexp.analysis.plots import sudden_step
from cnexp.analysis.runs import (BROKEN, DUPLICATE, FAILED, INCOMPLETE, MISSING, OK, UNREADABLE,
                                 RunRecord, load_sweep, load_wandb)
from cnexp.analysis.stats import mean_ci, paired_difference

T_975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (from a table)

# eval/<setting>/shape_iou by ablation and seed; lite = baseline - 0.1 with a little noise.
SHAPE_IOU = {
    "baseline": {"perfect": [0.5, 0.6, 0.7], "none": [0.40, 0.45, 0.50]},
    "lite": {"perfect": [0.41, 0.49, 0.60], "none": [0.10, 0.20, 0.30]},
}


def fake_run(sweep: Path, num: int, ablation: str, seed: int, final: dict | None,
             status: str = "ok", knobs: dict | None = None) -> Path:
    run = sweep / f"{num}_{ablation}-s{seed}"
    (run / ".hydra").mkdir(parents=True)
    config = {"ablation": ablation, "seed": seed, "optim": {"lr": 1e-3, **(knobs or {})}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"+ablation={ablation}", f"seed={seed}"]))
    record = {"status": status, **({"error": "boom: it broke"} if status == "failed" else {}),
              **({"seconds": 60.0, "epoch": 1000.0 + 60 * num, "cpus": 2} if final else {})}
    (run / "status.json").write_text(json.dumps(record))
    if final is not None:
        history = [{"step": 0, **{k: 0.1 for k in final}, "eval/seconds_total": 1.0},
                   {"step": 10, **final, "eval/seconds_total": 2.0}]
        (run / "metrics.json").write_text(json.dumps(
            {"ablation": ablation, "seed": seed, "final": history[-1], "history": history,
             "steps": 10, "fit_seconds": 50.0,
             "sudden_convergence": {"step": 5}}))
        (run / "samples").mkdir()
        for step in (0, 10):
            grid = Image.new("RGB", (20, 40), (step * 20, 0, 0))
            grid.save(run / "samples" / f"step_{step:06d}.png")
    return run


@pytest.fixture
def sweep(tmp_path):
    num = 0
    for ablation, by_setting in SHAPE_IOU.items():
        for seed in range(3):
            final = {f"eval/{s}/shape_iou": v[seed] for s, v in by_setting.items()}
            fake_run(tmp_path, num, ablation, seed, final,
                     knobs={"prompt_dropout": 0.5 if ablation == "baseline" else 0.0})
            num += 1
    fake_run(tmp_path, num, "no_zero_conv", 0, None, status="failed")
    fake_run(tmp_path, num + 1, "no_zero_conv", 1, None, status="running")
    return tmp_path


def test_mean_ci_matches_hand_computation():
    est = mean_ci([0.5, 0.6, 0.7])
    half = T_975_DF2 * 0.1 / math.sqrt(3)  # t * sd / sqrt(n), sd = 0.1
    assert est.n == 3 and est.mean == pytest.approx(0.6) and est.sd == pytest.approx(0.1)
    assert (est.low, est.high) == pytest.approx((0.6 - half, 0.6 + half))
    assert math.isnan(mean_ci([0.3]).half_width) and mean_ci([]).n == 0


def test_paired_difference_uses_only_common_seeds_and_is_tighter_than_unpaired():
    diff = paired_difference({0: 0.41, 1: 0.49, 2: 0.60, 5: 9.0}, {0: 0.5, 1: 0.6, 2: 0.7})
    half = T_975_DF2 * 0.01 / math.sqrt(3)  # differences -0.09, -0.11, -0.10: sd 0.01
    assert diff.n == 3 and diff.mean == pytest.approx(-0.1)
    assert diff.half_width == pytest.approx(half) and diff.excludes_zero


def test_summary_table_per_setting_with_paired_differences(sweep):
    records = load_sweep(sweep)
    table = summarize(select_runs(records))
    base, lite = table["shape_iou"]["baseline"], table["shape_iou"]["lite"]
    assert set(base) == {"perfect", "none"} and base["perfect"].diff is None
    assert base["perfect"].estimate.mean == pytest.approx(0.6)
    assert lite["perfect"].diff.mean == pytest.approx(-0.1)
    assert lite["perfect"].diff.half_width == pytest.approx(T_975_DF2 * 0.01 / math.sqrt(3))
    # none: differences -0.30, -0.25, -0.20 -> mean -0.25, sd 0.05
    assert lite["none"].diff.mean == pytest.approx(-0.25)
    assert lite["none"].diff.half_width == pytest.approx(T_975_DF2 * 0.05 / math.sqrt(3))


def test_report_lists_failed_incomplete_and_missing_runs(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main([str(sweep), "--out", str(out)]) == 0
    status = {(r["ablation"], r["seed"]): r for r in csv.DictReader((out / "runs.csv").open())}
    assert status[("no_zero_conv", "0")]["status"] == FAILED
    # paths relative to the sweep (a committed runs.csv names no machine's directories)
    assert status[("no_zero_conv", "0")]["path"] == "6_no_zero_conv-s0"
    assert status[("no_zero_conv", "2")]["path"] == ""  # never ran: no directory
    assert "boom" in status[("no_zero_conv", "0")]["error"]
    assert status[("no_zero_conv", "1")]["status"] == INCOMPLETE
    assert status[("no_zero_conv", "2")]["status"] == MISSING  # the grid ablation x seed
    assert sum(r["status"] == OK for r in status.values()) == 6
    report = (out / "report.md").read_text()
    assert "boom: it broke" in report and "-0.100 ± 0.025 *" in report
    assert "`optim.prompt_dropout=0.0`" in report  # the knob lite changes
    assert "steps per run: 10" in report and "6.0 min" in report  # 6 jobs of 60 s, back to back
    rows = list(csv.DictReader((out / "summary.csv").open()))
    lite_perfect = next(r for r in rows if r["ablation"] == "lite" and r["setting"] == "perfect")
    assert float(lite_perfect["diff_mean"]) == pytest.approx(-0.1)
    for png in ["curves_shape_iou.png", "bars_shape_iou.png", "samples.png"]:
        assert (out / png).stat().st_size > 1000, png


def test_missing_jobs_come_from_the_sweep_definition(tmp_path):
    conf = tmp_path / "conf"
    (conf / "ablation").mkdir(parents=True)
    for name in ["baseline", "lite", "other"]:
        (conf / "ablation" / f"{name}.yaml").write_text("{}")
    sweep = tmp_path / "sweep"
    fake_run(sweep, 0, "baseline", 0, {"eval/shape_iou": 0.5})
    fake_run(sweep, 1, "baseline", 1, {"eval/shape_iou": 0.6})
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"params": {"seed": "0,1"}},
        "overrides": {"task": ["+ablation=glob(*,exclude=other)"]},
        "runtime": {"config_sources": [{"path": str(conf), "schema": "file"}]}}}))
    records = load_sweep(sweep)
    missing = sorted((r.ablation, r.seed) for r in records if r.status == MISSING)
    assert missing == [("lite", 0), ("lite", 1)]


def test_latest_finished_run_per_seed_counts_once(sweep):
    again = fake_run(sweep / "rerun", 0, "baseline", 0, {"eval/perfect/shape_iou": 0.9})
    records = load_sweep(sweep)
    groups = select_runs(records)
    assert [r.seed for r in groups["baseline"]] == [0, 1, 2]
    assert groups["baseline"][0].path == again


@pytest.mark.parametrize("entry, expected", [
    (120, 120.0), ({"step": 80}, 80.0), ({"eval/perfect/shape_iou": {"step": 40}}, 40.0),
    ({"perfect": 30}, 30.0), (None, None), ({"step": None}, None), ("never", None),
    ({"metric": "eval/none/shape_iou", "step": 7}, None),
    ({"metric": "shape_iou", "step": 7}, 7.0),
    ({"shape_iou": {"step": 300, "threshold": 0.5, "steepest_rise_step": 200}}, 300.0)])
def test_sudden_convergence_entries_of_any_shape(entry, expected):
    assert sudden_step(entry, "eval/perfect/shape_iou") == expected


def test_split_key():
    assert split_key("eval/perfect/shape_iou") == ("perfect", "shape_iou")
    assert split_key("eval/edge_f1") == ("default", "edge_f1")


class FakeWandbRun:
    def __init__(self, name, ablation, seed, value, state="finished"):
        self.name, self.state = name, state
        self.config = {"ablation": ablation, "seed": seed}
        self.summary_metrics = {"eval/perfect/shape_iou": value, "_runtime": 3}

    def scan_history(self):
        return [{"_step": 0, "trainer/global_step": 0, "eval/perfect/shape_iou": 0.1},
                {"_step": 1, "train/loss": 0.3}]


class FakeWandbApi:
    def runs(self, path, filters):
        assert path == "me/cnexp" and filters == {"group": "paper"}
        return [FakeWandbRun("baseline-s0", "baseline", 0, 0.5),
                FakeWandbRun("baseline-s1", "baseline", 1, 0.7),
                FakeWandbRun("lite-s0", "lite", 0, 0.4, state="crashed")]


def test_wandb_runs_become_records():
    """The --wandb path with a stand-in API object (the real one needs a network)."""
    records = load_wandb("me/cnexp", "paper", api=FakeWandbApi())
    assert [r.status for r in records] == [OK, OK, FAILED]
    assert records[0].final == {"eval/perfect/shape_iou": 0.5}
    assert records[0].history == [{"step": 0, "eval/perfect/shape_iou": 0.1}]
    assert isinstance(records[0], RunRecord)


def test_compare_writes_a_report_for_wandb_records(tmp_path):
    records = load_wandb("me/cnexp", "paper", api=FakeWandbApi())
    table = compare(records, tmp_path, "W&B me/cnexp/paper")
    assert table["shape_iou"]["baseline"]["perfect"].estimate.mean == pytest.approx(0.6)
    assert "crashed" in (tmp_path / "report.md").read_text()


def test_compare_cli_reads_a_wandb_group_through_the_wandb_api(monkeypatch, tmp_path, capsys):
    """`--wandb E/P --group G` end to end: wandb.Api() (a stand-in module: no network) -> report."""
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=FakeWandbApi))
    out = tmp_path / "report"
    assert main(["--wandb", "me/cnexp", "--group", "paper", "--out", str(out),
                 "--no-figures"]) == 0
    assert (out / "report.md").read_text().startswith("# Sweep comparison: W&B me/cnexp/paper")
    rows = {r["run"]: r for r in csv.DictReader((out / "runs.csv").open())}
    assert rows["lite-s0"]["status"] == FAILED and rows["baseline-s1"]["status"] == OK
    assert "2 of 3 runs finished" in capsys.readouterr().out


def test_wandb_unreachable_is_one_clear_message(monkeypatch, capsys):
    def offline(path, group):
        raise ConnectionError("no route to host")

    monkeypatch.setattr("cnexp.analysis.compare.load_wandb", offline)
    assert main(["--wandb", "me/cnexp", "--group", "paper"]) == 2
    assert "wandb login" in capsys.readouterr().err


def test_dynamics_table_reads_base_damage_and_sudden_convergence_per_seed():
    from cnexp.analysis.report import dynamics_rows
    from cnexp.analysis.runs import RunRecord

    def run(seed, damage, cross):
        return RunRecord(name=f"x-s{seed}", ablation="no_zero_conv", seed=seed, status="ok",
                         base_damage=damage,
                         history=[{"step": 0, "eval/curve/shape_iou": 0.2}],
                         sudden={"shape_iou": {"step": cross, "steepest_rise_step": 100,
                                               "final": 0.7, "threshold": 0.5}})

    [row] = dynamics_rows({"no_zero_conv": [run(0, 0.009, 200), run(1, 0.0, None)]})
    assert row[:3] == ["no_zero_conv", "0, 1", "0.009; 0.000"]
    assert row[3] == "shape_iou 0.200 → 0.700; shape_iou 0.200 → 0.700"
    assert row[4:] == ["200; never", "100; 100"]


@pytest.mark.parametrize("content,reason", [
    ('{"ablation": "baseline", "seed": 2, "steps"', "not valid JSON"),  # truncated by a kill
    ("null", "must be a JSON object"),
    ('{"final": "x"}', "field 'ablation' is missing"),
    ('{"ablation": "baseline", "seed": 2, "steps": 3, "history": [], "final": "x"}',
     "field 'final' must be an object of numbers"),
    ('{"ablation": "baseline", "seed": 2, "steps": 3, "history": [{"step": "0"}]}',
     "history[0] has no integer 'step'"),
])
def test_a_broken_record_is_listed_with_its_reason_and_the_report_is_written(
        sweep, tmp_path_factory, content, reason):
    broken = fake_run(sweep, 20, "baseline", 2, None)  # overwrites nothing: its own directory
    (broken / "metrics.json").write_text(content)
    out = tmp_path_factory.mktemp("report")
    assert main([str(sweep), "--out", str(out)]) == 0
    rows = {r["run"]: r for r in csv.DictReader((out / "runs.csv").open())}
    assert rows[broken.name]["status"] == BROKEN
    assert reason in rows[broken.name]["error"] and "metrics.json" in rows[broken.name]["error"]
    assert sum(r["status"] == OK for r in rows.values()) == 6  # the others are all there
    assert reason in (out / "report.md").read_text()


def test_a_status_file_of_another_shape_makes_the_run_broken(sweep):
    (sweep / "0_baseline-s0" / "status.json").write_text('{"status": "great"}')
    run = next(r for r in load_sweep(sweep) if r.name == "0_baseline-s0")
    assert run.status == BROKEN and "'status' must be one of" in run.error


def test_a_preempted_run_says_where_it_stopped_and_how_to_resume(sweep):
    run_dir = fake_run(sweep, 21, "lite", 3, None, status="preempted")
    status = json.loads((run_dir / "status.json").read_text())
    status.update(step=163, resume="python run.py hydra.run.dir=x ckpt_path=last")
    (run_dir / "status.json").write_text(json.dumps(status))
    run = next(r for r in load_sweep(sweep) if r.name == run_dir.name)
    assert run.status == INCOMPLETE
    assert "preempted at step 163" in run.error and "ckpt_path=last" in run.error


def test_a_resumed_run_stays_in_its_ablation_group(sweep):
    """Resuming adds ckpt_path=last to a run's overrides; that is not a knob of the ablation."""
    resumed = sweep / "1_baseline-s1" / ".hydra" / "overrides.yaml"
    resumed.write_text(yaml.safe_dump(["+ablation=baseline", "seed=1", "ckpt_path=last",
                                       "hydra.run.dir=x"]))
    records = [r for r in load_sweep(sweep) if r.status == OK]
    assert {r.label for r in records} == {"baseline", "lite"}
    assert len(select_runs(records)["baseline"]) == 3


@pytest.mark.parametrize("value, said", [(math.nan, "= nan"), (math.inf, "= inf"),
                                         (None, "= null")])
def test_a_non_finite_final_metric_fails_its_run_with_the_reason(sweep, tmp_path_factory,
                                                                 value, said):
    bad = fake_run(sweep, 22, "lite", 3, {"eval/perfect/shape_iou": 0.5,
                                          "eval/none/shape_iou": 0.4})
    record = json.loads((bad / "metrics.json").read_text())
    record["final"]["eval/none/shape_iou"] = value  # json writes NaN / Infinity / null
    (bad / "metrics.json").write_text(json.dumps(record))
    out = tmp_path_factory.mktemp("report")
    assert main([str(sweep), "--out", str(out)]) == 0
    rows = {r["run"]: r for r in csv.DictReader((out / "runs.csv").open())}
    assert rows[bad.name]["status"] == FAILED
    assert f"non-finite eval/none/shape_iou {said}" in rows[bad.name]["error"]
    report = (out / "report.md").read_text()
    assert f"non-finite eval/none/shape_iou {said}" in report.split("## Runs not in the tables")[1]
    table = summarize(select_runs(load_sweep(sweep)))
    assert table["shape_iou"]["lite"]["none"].estimate.n == 3  # seeds 0-2; not the failed one


def test_a_run_without_its_config_is_unreadable_not_a_group(sweep, tmp_path_factory):
    for run in sweep.iterdir():  # every job had one more override in common
        overrides = run / ".hydra" / "overrides.yaml"
        overrides.write_text(yaml.safe_dump(yaml.safe_load(overrides.read_text())
                                            + ["trainer.max_steps=10"]))
    lost = fake_run(sweep, 23, "baseline", 3, {"eval/perfect/shape_iou": 0.9})
    for name in ("config.yaml", "overrides.yaml"):
        (lost / ".hydra" / name).unlink()
    (lost / ".hydra").rmdir()
    records = load_sweep(sweep)
    (unreadable,) = [r for r in records if r.path == lost]
    assert unreadable.status == UNREADABLE and "no .hydra/ and no config.yaml" in unreadable.error
    assert {r.label for r in records if r.status == OK} == {"baseline", "lite"}
    assert not [r for r in records if r.status == MISSING and r.seed != 2]  # no invented jobs
    out = tmp_path_factory.mktemp("report")
    assert main([str(sweep), "--out", str(out)]) == 0
    row = next(line for line in (out / "report.md").read_text().splitlines()
               if line.startswith(f"| {lost.name} |"))
    assert "unreadable" in row and f"| {lost.name} |" in row  # its path, relative to the sweep


def test_duplicates_are_listed_with_their_paths_and_counted_once(sweep, tmp_path_factory):
    """The same seed twice, and a re-evaluation nested inside a run of the sweep."""
    twice = fake_run(sweep, 24, "lite", 1, {"eval/perfect/shape_iou": 0.9,
                                            "eval/none/shape_iou": 0.9})
    nested = fake_run(sweep / "0_baseline-s0" / "again", 0, "baseline", 0,
                      {"eval/perfect/shape_iou": 0.5, "eval/none/shape_iou": 0.4})
    old = 1_000_000_000  # the copies counted are the ones written last: make that explicit
    for first in (sweep / "4_lite-s1", sweep / "0_baseline-s0"):
        os.utime(first / "metrics.json", (old, old))
    records = load_sweep(sweep)
    dups = {r.path: r for r in records if r.status == DUPLICATE}
    assert set(dups) == {sweep / "0_baseline-s0", sweep / "4_lite-s1"}
    assert dups[sweep / "4_lite-s1"].error == f"duplicate of {twice.name}, which counts"
    groups = select_runs(records)
    assert [r.seed for r in groups["lite"]] == [0, 1, 2] and groups["lite"][1].path == twice
    assert nested in [r.path for r in groups["baseline"]]
    out = tmp_path_factory.mktemp("report")
    assert main([str(sweep), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "the one whose metrics.json was written last counts" in report
    assert "duplicate of 0_baseline-s0/again/0_baseline-s0, which counts | 0_baseline-s0 |" \
        in report  # paths relative to the compared directory
