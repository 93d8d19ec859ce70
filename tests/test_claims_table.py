"""One claims table over several stages: committed claims.csv files re-judged with Holm over all."""
import csv
import dataclasses
import shutil

import pytest

from cnexp.analysis.claims import (NOT_SHOWN, REPRODUCED, Claim, judge_claims, read_claims_csv,
                                   write_claims_csv)
from cnexp.analysis.claims_table import main, merge_tables
from cnexp.analysis.plots import in_detectable_units
from test_claims_multiplicity import KEY, sweep


def stage_csv(path, diffs_by_arm: dict) -> list:
    claims = [Claim(f"{a} claim", a, KEY, "lower") for a in diffs_by_arm]
    results = judge_claims(claims, sweep(diffs_by_arm))
    write_claims_csv(results, path)
    return results


def test_a_committed_table_reads_back_as_it_was_judged(tmp_path):
    written = stage_csv(tmp_path / "claims.csv", {"marginal": [-0.02, -0.05, -0.01, -0.04],
                                                  "null": [0.03, -0.05, 0.01, -0.02]})
    again = read_claims_csv(tmp_path / "claims.csv")
    for w, r in zip(written, again):
        assert r.claim == w.claim and r.verdict == w.verdict
        assert r.p_value == pytest.approx(w.p_value, rel=1e-9)
        assert r.diff.sd == pytest.approx(w.diff.sd, rel=1e-9)
        assert r.detectable == pytest.approx(w.detectable)
        assert r.seeds_needed == w.seeds_needed


def test_holm_is_taken_over_every_stage(tmp_path):
    # alone, each stage's one marginal claim (p 0.046) survives its own Holm (m = 1) ...
    first = stage_csv(tmp_path / "a.csv", {"marginal": [-0.02, -0.05, -0.01, -0.04]})
    second = stage_csv(tmp_path / "b.csv", {"b: strong": [-0.10, -0.11, -0.09, -0.10],
                                            "null": [0.03, -0.05, 0.01, -0.02]})
    assert first[0].holm_verdict == REPRODUCED and first[0].holm_p == pytest.approx(0.0462,
                                                                                   abs=1e-4)
    # ... but in the study's table of three tested claims it is one hypothesis of three
    merged = merge_tables([("a", tmp_path / "a.csv"), ("b", tmp_path / "b.csv")])
    assert [r.claim.claim for r in merged] == ["a: marginal claim", "b: strong claim",
                                               "b: null claim"]
    marginal, strong, null = merged
    assert strong.holm_p == pytest.approx(3 * second[0].p_value, rel=1e-6)
    assert marginal.holm_p == pytest.approx(2 * 0.0462, abs=2e-4)
    assert (marginal.verdict, marginal.holm_verdict) == (REPRODUCED, NOT_SHOWN)
    assert strong.holm_verdict == REPRODUCED


def test_the_command_writes_the_table_csv_and_forest(tmp_path, capsys):
    stage_csv(tmp_path / "a.csv", {"marginal": [-0.02, -0.05, -0.01, -0.04]})
    stage_csv(tmp_path / "b.csv", {"strong": [-0.10, -0.11, -0.09, -0.10]})
    out = tmp_path / "table"
    assert main([f"a={tmp_path / 'a.csv'}", f"b={tmp_path / 'b.csv'}", "--out", str(out)]) == 0
    assert "2 claims, 2 tested" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "claims.csv").open()))
    assert [r["stage"] for r in rows] == ["a", "b"]
    assert [r["holm_verdict"] for r in rows] == [REPRODUCED, REPRODUCED]  # 0.046 x 1 after 2 p
    text = (out / "claims.md").read_text()
    assert "Holm over all 2: 2 reproduced, 0 opposite, 0 not shown" in text
    assert "| a: marginal claim |" in text
    assert (out / "claims.png").stat().st_size > 0 and (out / "overview.png").stat().st_size > 0


@pytest.mark.parametrize("arg, says", [("a", "name each table"),
                                       ("a=/no/such/claims.csv", "/no/such/claims.csv")])
def test_a_bad_stage_argument_is_one_clear_error(tmp_path, capsys, arg, says):
    assert main([arg, "--out", str(tmp_path / "out")]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written before the tables are read


def test_a_file_that_is_not_a_claims_table_is_named(tmp_path, capsys):
    (tmp_path / "runs.csv").write_text("run,status\nx,ok\n")
    assert main([f"a={tmp_path / 'runs.csv'}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "runs.csv" in err and "claims.csv written by" in err


def test_the_overview_puts_every_claim_in_units_of_its_detectable_effect(tmp_path):
    # Δ −0.06 in [−0.08, −0.04], the paper expecting lower, detectable 0.03: 2 on the paper's side
    stage_csv(tmp_path / "a.csv", {"arm": [-0.06, -0.05, -0.07, -0.06]})
    (result,) = merge_tables([("a", tmp_path / "a.csv")])
    mean, low, high = in_detectable_units(result)
    assert mean == pytest.approx(-result.diff.mean / result.detectable) and mean > 0
    assert (low, high) == pytest.approx((-result.diff.high / result.detectable,
                                         -result.diff.low / result.detectable))
    higher = dataclasses.replace(result, claim=dataclasses.replace(result.claim, expect="higher"))
    assert in_detectable_units(higher) == pytest.approx((-mean, -high, -low))


def test_side_by_side_pairs_the_same_test_across_stages_and_flags_a_different_verdict(
        tmp_path, capsys):
    # the same arm, reference and metric in both stages (other claim words); one decided in
    # the UNet stage only, one decided in neither
    stage_csv(tmp_path / "unet.csv", {"strong": [-0.10, -0.11, -0.09, -0.10],
                                      "null": [0.03, -0.05, 0.01, -0.02],
                                      "unet only": [-0.1, -0.1, -0.1, -0.11]})
    stage_csv(tmp_path / "dit.csv", {"strong": [0.03, -0.05, 0.01, -0.02],
                                     "null": [0.02, -0.04, 0.02, -0.01],
                                     "dit only": [-0.1, -0.1, -0.1, -0.11]})
    out = tmp_path / "table"
    assert main([f"unet={tmp_path / 'unet.csv'}", f"dit={tmp_path / 'dit.csv'}", "--out",
                 str(out), "--no-figures", "--side-by-side", "unet,dit"]) == 0
    rows = (out / "side_by_side.md").read_text().splitlines()[2:]
    assert len(rows) == 2  # "unet only" and "dit only" have no counterpart
    strong, null = rows
    assert strong.startswith("| strong claim | `strong` vs `baseline` |")
    assert f"**{REPRODUCED}** | " in strong and f"**{NOT_SHOWN}** | **no** |" in strong
    assert null.endswith("| yes |")
    assert main([f"unet={tmp_path / 'unet.csv'}", "--out", str(out), "--side-by-side",
                 "unet,transformer"]) == 2
    assert "no stage 'transformer'" in capsys.readouterr().err


def test_readme_gets_the_compact_table_between_its_markers_and_keeps_the_rest(tmp_path, capsys):
    stage_csv(tmp_path / "unet.csv", {"strong": [-0.10, -0.11, -0.09, -0.10]})
    stage_csv(tmp_path / "dit.csv", {"strong": [0.03, -0.05, 0.01, -0.02]})
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n<!-- side-by-side -->\n| old | table |\n"
                      "<!-- /side-by-side -->\n\nProse after.\n")
    args = [f"unet={tmp_path / 'unet.csv'}", f"dit={tmp_path / 'dit.csv'}", "--out",
            str(tmp_path / "table"), "--no-figures", "--side-by-side", "unet,dit",
            "--readme", str(readme), "--labels", "UNet,transformer"]
    assert main(args) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\n<!-- side-by-side -->\n| claim (arm vs its reference) "
                           "| UNet: Δ, Holm verdict | transformer: Δ, Holm verdict |")
    assert "| old | table |" not in text and text.endswith("<!-- /side-by-side -->\n\n"
                                                          "Prose after.\n")
    row = [line for line in text.splitlines() if line.startswith("| strong claim |")]
    assert len(row) == 1
    unet_cell, dit_cell = [cell.strip() for cell in row[0].strip("|").split("|")[1:]]
    assert unet_cell.endswith(f"**{REPRODUCED}**") and dit_cell.endswith(f"**{NOT_SHOWN}**")
    assert main(args) == 0 and readme.read_text() == text  # rewriting is idempotent
    readme.write_text("no markers\n")
    shutil.rmtree(tmp_path / "table")
    assert main(args) == 2 and not (tmp_path / "table").exists()  # refused before any write
    assert "put a line <!-- side-by-side -->" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"
