"""Many claims, one error rate: Holm-adjusted verdicts beside the raw ones, checked by hand."""
import math

import pytest
from scipy import stats

from cnexp.analysis.claims import (NOT_RUN, NOT_SHOWN, REPRODUCED, Claim, claims_markdown,
                                   holm_adjust, holm_from_csv, judge_claims, paired_p_value,
                                   write_claims_csv)
from cnexp.analysis.stats import mean_ci
from test_claims import run

KEY = "eval/none/kind_acc"


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # a claim that could not be tested is no hypothesis: m = 2 here
    adjusted = holm_adjust([math.nan, 0.02, 0.5])
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.04, 0.5])
    assert holm_adjust([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([]) == []


def test_the_p_value_is_the_test_behind_the_raw_verdict():
    # p < 0.05 exactly when the 95% paired t-interval excludes 0, and it is scipy's t-test
    for diffs in ([-0.02, -0.05, -0.01, -0.04], [0.03, -0.05, 0.01, -0.02], [0.1, 0.12, 0.09],
                  [0.01, 0.03, -0.005, 0.02, 0.015]):
        diff = mean_ci(diffs)
        p = paired_p_value(diff)
        assert p == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
        assert (p < 0.05) == diff.excludes_zero
    assert paired_p_value(mean_ci([0.1, 0.1])) == 0.0  # no spread, off 0
    assert math.isnan(paired_p_value(mean_ci([0.1])))


def sweep(diffs_by_arm: dict[str, list[float]]) -> dict:
    groups = {"baseline": [run("baseline", s, {KEY: 0.5}) for s in range(4)]}
    for arm, diffs in diffs_by_arm.items():
        groups[arm] = [run(arm, s, {KEY: 0.5 + d}) for s, d in enumerate(diffs)]
    return groups


def test_holm_turns_the_marginal_claim_into_not_shown(tmp_path):
    groups = sweep({"strong": [-0.10, -0.11, -0.09, -0.10],
                    # mean -0.03, sd sqrt(0.001 / 3) = 0.01826, t = -3.286 with 3 df: p = 0.0462
                    "marginal": [-0.02, -0.05, -0.01, -0.04],
                    "null": [0.03, -0.05, 0.01, -0.02]})  # p = 0.697
    claims = [Claim(f"{a} claim", a, KEY, "lower") for a in ("strong", "marginal", "null")]
    claims.append(Claim("never ran", "absent", KEY, "lower"))
    strong, marginal, null, absent = judge_claims(claims, groups)
    assert marginal.p_value == pytest.approx(0.0462, abs=1e-4)
    assert strong.p_value == pytest.approx(1.49e-4, rel=0.01)
    # m = 3 (the claim that never ran does not count): 3 p1, 2 p2, max(2 p2, p3)
    assert strong.holm_p == pytest.approx(3 * strong.p_value)
    assert marginal.holm_p == pytest.approx(2 * 0.0462, abs=2e-4)
    assert null.holm_p == pytest.approx(null.p_value)
    assert (strong.verdict, strong.holm_verdict) == (REPRODUCED, REPRODUCED)
    assert (marginal.verdict, marginal.holm_verdict) == (REPRODUCED, NOT_SHOWN)
    assert (null.verdict, null.holm_verdict) == (NOT_SHOWN, NOT_SHOWN)
    assert absent.verdict == absent.holm_verdict == NOT_RUN and math.isnan(absent.holm_p)

    table = "\n".join(claims_markdown([strong, marginal, null, absent]))
    assert "| Holm verdict |" in table and "over the 3 tested claims (Holm)" in table
    assert "| **reproduced** | 0.046 (0.092) | **not shown** |" in table
    write_claims_csv([strong, marginal, null, absent], tmp_path / "claims.csv")
    header, _, row, *_ = (tmp_path / "claims.csv").read_text().splitlines()
    assert header.endswith("p_value,holm_p,holm_verdict") and row.endswith(",not shown")
    # a committed claims.csv is re-judged from its mean and interval alone (no run records)
    again = holm_from_csv(tmp_path / "claims.csv")
    assert [r["holm_verdict"] for r in again] == [REPRODUCED, NOT_SHOWN, NOT_SHOWN, NOT_RUN]
    assert [r["holm_p"] for r in again[:3]] == pytest.approx(
        [strong.holm_p, marginal.holm_p, null.holm_p], rel=1e-6)
