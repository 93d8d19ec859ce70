"""The claims table: verdicts, the detectable effect and the image share, checked by hand."""
import math

import pytest
from scipy import stats
from test_compare import fake_run

from cnexp.analysis.claims import (NOT_RUN, NOT_SHOWN, OPPOSITE, REPRODUCED, Claim, ClaimsError,
                                   detectable_effect, judge_claim, load_claims, seeds_needed)
from cnexp.analysis.compare import main
from cnexp.analysis.runs import OK, RunRecord


def run(label: str, seed: int, final: dict, history=(), images=None) -> RunRecord:
    return RunRecord(f"{label}-s{seed}", label, seed, OK, final=final, history=list(history),
                     images=images or {})


def groups(base: list[float], arm: list[float], key="eval/none/kind_acc", **kw) -> dict:
    return {"baseline": [run("baseline", s, {key: v}, **kw) for s, v in enumerate(base)],
            "arm": [run("arm", s, {key: v}, **kw) for s, v in enumerate(arm)]}


def claim(expect="lower", **kw) -> Claim:
    return Claim(**{"claim": "c", "arm": "arm", "metric": "eval/none/kind_acc",
                    "expect": expect, **kw})


def test_verdicts_follow_the_paired_interval_and_the_papers_direction():
    lower = groups([0.5, 0.6, 0.7, 0.6], [0.41, 0.49, 0.60, 0.50])  # about -0.1 each seed
    assert judge_claim(claim("lower"), lower).verdict == REPRODUCED
    assert judge_claim(claim("higher"), lower).verdict == OPPOSITE
    noisy = groups([0.5, 0.6, 0.7, 0.6], [0.55, 0.52, 0.71, 0.60])
    result = judge_claim(claim("lower"), noisy)
    assert result.verdict == NOT_SHOWN and result.diff.n == 4
    assert judge_claim(claim(arm="absent"), lower).verdict == NOT_RUN


def test_detectable_effect_is_the_t_test_power_formula():
    sd, n = 0.02, 5
    expected = (stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * sd / math.sqrt(n)
    assert detectable_effect(sd, n) == pytest.approx(expected)
    assert math.isnan(detectable_effect(sd, 1))
    # more seeds, smaller detectable effect; the seeds a measured effect needs
    assert detectable_effect(sd, 10) < detectable_effect(sd, 5)
    needed = seeds_needed(sd, 0.03)
    assert detectable_effect(sd, needed) <= 0.03 < detectable_effect(sd, needed - 1)
    assert seeds_needed(sd, 0.0) is None


def test_a_claim_at_a_step_reads_the_history_not_the_end():
    key = "eval/copy_drift"
    base = {"baseline": [run("baseline", s, {key: 9.0}, history=[{"step": 100, key: 0.10 + s}])
                         for s in range(3)],
            "arm": [run("arm", s, {key: 0.0}, history=[{"step": 100, key: 0.30 + s}])
                    for s in range(3)]}
    result = judge_claim(claim("higher", metric=key, step=100), base)
    assert result.diff.mean == pytest.approx(0.2) and result.verdict == REPRODUCED
    assert result.image_share is None  # no per-image scores behind a history value


def test_image_share_is_the_image_variance_over_the_seed_variance():
    key = "eval/none/kind_acc"
    images_base = [0.0, 1.0, 0.0, 1.0]
    images_arm = [[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    g = {"baseline": [run("baseline", s, {key: 0.5}, images={key: images_base})
                      for s in range(3)],
         "arm": [run("arm", s, {key: sum(im) / 4}, images={key: im})
                 for s, im in enumerate(images_arm)]}
    result = judge_claim(claim(), g)
    d = [[a - b for a, b in zip(im, images_base)] for im in images_arm]  # 3 seeds x 4 images
    seed_mean = [sum(row) / 4 for row in d]
    image_mean = [sum(d[s][i] for s in range(3)) / 3 for i in range(4)]
    grand = sum(seed_mean) / 3
    interaction = sum((d[s][i] - seed_mean[s] - image_mean[i] + grand) ** 2
                      for s in range(3) for i in range(4)) / (2 * 3)
    assert result.image_share == pytest.approx(min(1.0, interaction / 4 / result.diff.sd ** 2))
    # the same image differences in every seed: no image-level noise between seeds
    same = {"baseline": g["baseline"],
            "arm": [run("arm", s, {key: 0.25 + s / 10}, images={key: images_arm[0]})
                    for s in range(3)]}
    assert judge_claim(claim(), same).image_share == pytest.approx(0.0)


@pytest.mark.parametrize("text, field", [
    ("claims: [{claim: c, arm: a, metric: m}]", "expect"),
    ("claims: [{claim: c, arm: a, metric: m, expect: up}]", "expect is 'up'"),
    ("claims: [{claim: c, arm: a, metric: m, expect: lower, stp: 3}]", "'stp' is unknown"),
    ("claims: [{claim: c, arm: a, metric: m, expect: lower, step: -1}]", "step is -1"),
    ("reference: baseline", "'claims:' list"),
])
def test_a_bad_claims_file_names_the_file_and_the_field(tmp_path, text, field):
    path = tmp_path / "claims.yaml"
    path.write_text(text)
    with pytest.raises(ClaimsError) as err:
        load_claims(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_compare_puts_the_claims_table_first(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed, (b, a) in enumerate([(0.5, 0.41), (0.6, 0.49), (0.7, 0.60)]):
        fake_run(sweep, 2 * seed, "baseline", seed, {"eval/none/shape_iou": b})
        fake_run(sweep, 2 * seed + 1, "lite", seed, {"eval/none/shape_iou": a})
    claims = tmp_path / "claims.yaml"
    claims.write_text("claims:\n  - {claim: lite fails with no prompt, arm: lite, "
                      "metric: eval/none/shape_iou, expect: lower}\n")
    assert main([str(sweep), "--claims", str(claims), "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.index("## Claims") < report.index("## Ablations")
    assert "lite fails with no prompt" in report and "**reproduced**" in report
    assert (tmp_path / "out" / "claims.csv").exists() and (tmp_path / "out" / "claims.png").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("claims: 3")
    assert main([str(sweep), "--claims", str(bad), "--out", str(tmp_path / "out2")]) == 2
    assert "bad.yaml" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_the_analysis_program_imports_no_training_code():
    """cnexp/analysis reads records only: a laptop without torch can compare a cluster's sweep."""
    import subprocess
    import sys

    code = ("import sys, cnexp.analysis.compare; print(sorted(m for m in ('torch', 'lightning', "
            "'diffusers', 'cnexp.train', 'cnexp.module', 'cnexp.launch.sweep') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
