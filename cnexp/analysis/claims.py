"""The claims table: each of the paper's claims, the metric that tests it, the paired effect with
its interval, a verdict, and the smallest effect the design could have detected.

A claims file (YAML) names what to test; `python -m cnexp.analysis.compare <sweep> --claims FILE`
reads it:

    reference: baseline                 # default reference arm for every claim
    claims:
      - claim: zero convolutions protect the copy's pretrained weights early in training
        arm: no_zero_conv               # the runs that test it (a compare label)
        metric: eval/copy_drift         # a key of metrics.json's final (or history) rows
        step: 100                       # optional: read it at this step instead of the end
        expect: higher                  # the paper's direction of arm - reference
        reference: baseline             # optional, per claim

Verdicts: `reproduced` (the paired interval excludes 0 on the paper's side), `opposite` (it
excludes 0 on the other side), `not shown` (it includes 0; the detectable column then says how
large an effect the design would have caught). The detectable effect is the paired difference
that a two-sided t-test at the report's level finds with 80% power, from the measured
seed-to-seed spread of the differences. Every run samples the same images from the same noise,
so the intervals are about training (seeds), given this evaluation set. The image share is how
much of the seed-to-seed spread is image-level noise that averaging over more images would
remove: with d[s, i] the paired difference on image i for seed s (metrics.json's final_images),
the seed x image interaction mean square over n images, divided by the spread. Near 1, more
images would sharpen the test; near 0, only more seeds would.

Many claims, one error rate: each verdict alone errs 5 % of the time, so a table of 17 claims
expects nearly one lucky verdict. Beside the raw verdict stands Holm's (`holm_adjust`): the same
two-sided paired t-test (p from t = mean / (sd / sqrt(n)), df n - 1: the test whose interval gives
the raw verdict, so p < 1 - level exactly when the interval excludes 0), with p-values adjusted
by Holm's step-down over every claim the table could test. Holm, not Benjamini-Hochberg: the
claims are a handful of confirmatory hypotheses, each one a statement about the paper, so the
guarantee wanted is that *no* verdict in the table is luck (the family-wise error rate), not that
few of many discoveries are (BH's false discovery rate); and Holm needs no assumption on how the
tests depend on each other, while these share reference runs and seeds (BH needs positive
dependence). It is uniformly more powerful than Bonferroni.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
from scipy import stats

from cnexp.errors import CnexpError
from cnexp.analysis.runs import RunRecord
from cnexp.analysis.stats import Estimate, finite, mean_ci

EXPECT = ("higher", "lower")
POWER = 0.8
REPRODUCED, OPPOSITE, NOT_SHOWN, NOT_RUN, TOO_FEW = (
    "reproduced", "opposite", "not shown", "not run", "too few seeds")


class ClaimsError(CnexpError):
    """A claims file that cannot be read as one."""


@dataclass(frozen=True)
class Claim:
    claim: str  # the paper's claim, in a few words
    arm: str  # compare label of the runs that test it
    metric: str  # eval/<setting>/<metric> or eval/<metric>
    expect: str  # the paper's direction of arm - reference: higher | lower
    reference: str = "baseline"
    step: Optional[int] = None  # None: the run's final value


@dataclass
class ClaimResult:
    claim: Claim
    diff: Estimate  # arm - reference, paired by seed
    arm_mean: float
    reference_mean: float
    verdict: str
    detectable: float  # smallest |difference| found with 80% power (NaN below 2 pairs)
    image_share: Optional[float]  # share of the differences' variance from the image sample
    seeds_needed: Optional[int] = None  # seeds that would find the measured Δ with 80% power
    p_value: float = math.nan  # two-sided paired t-test of Δ = 0 (NaN below 2 pairs)
    holm_p: float = math.nan  # p adjusted over the table's tested claims (Holm)
    holm_verdict: str = ""  # the verdict at that adjusted p (judge_claims sets it)
    stage: str = ""  # the study stage it came from, in a table over several (claims_table.py)


def load_claims(path: Path) -> list[Claim]:
    """The claims of a YAML file, or ClaimsError naming the file, the claim and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ClaimsError(f"{path}: cannot be read as YAML ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("claims"), list):
        raise ClaimsError(f"{path}: needs a top-level 'claims:' list (see "
                          "cnexp/analysis/claims.py)")
    reference = data.get("reference", "baseline")
    allowed = {f.name for f in fields(Claim)}
    claims = []
    for i, entry in enumerate(data["claims"]):
        where = f"{path}: claims[{i}]"
        if not isinstance(entry, dict):
            raise ClaimsError(f"{where} must be a mapping of {sorted(allowed)}")
        unknown = sorted(set(entry) - allowed)
        missing = [k for k in ("claim", "arm", "metric", "expect") if k not in entry]
        if unknown or missing:
            raise ClaimsError(f"{where}: field '{(unknown or missing)[0]}' is "
                              f"{'unknown' if unknown else 'missing'}; fields: {sorted(allowed)}")
        if entry["expect"] not in EXPECT:
            raise ClaimsError(f"{where}: expect is {entry['expect']!r}; use higher or lower")
        step = entry.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ClaimsError(f"{where}: step is {step!r}; use a training step (an integer >= 0)")
        claims.append(Claim(**{"reference": reference, **{k: v for k, v in entry.items()}}))
    return claims


def value_of(run: RunRecord, metric: str, step: Optional[int]) -> Optional[float]:
    """The run's final value of metric, or its value at `step` of the history."""
    if step is None:
        return run.final.get(metric)
    rows = [row for row in run.history if row.get("step") == step and metric in row]
    return rows[-1][metric] if rows else None


def detectable_effect(sd: float, pairs: int, level: float = 0.95, power: float = POWER) -> float:
    """The mean paired difference a two-sided t-test at `level` detects with `power`."""
    if pairs < 2 or not math.isfinite(sd):
        return math.nan
    df = pairs - 1
    return float((stats.t.ppf(0.5 + level / 2, df) + stats.t.ppf(power, df)) * sd
                 / math.sqrt(pairs))


def seeds_needed(sd: float, effect: float, level: float = 0.95, power: float = POWER,
                 most: int = 1000) -> Optional[int]:
    """The fewest seeds whose detectable effect is at most |effect| (None past `most`)."""
    if not (math.isfinite(sd) and math.isfinite(effect)) or effect == 0:
        return None
    return next((k for k in range(2, most + 1)
                 if detectable_effect(sd, k, level, power) <= abs(effect)), None)


def image_share(arm: dict[int, RunRecord], ref: dict[int, RunRecord], metric: str,
                sd: float) -> Optional[float]:
    """Share of the seed-to-seed variance of the paired differences (sd^2) that is image-level
    noise: the seed x image interaction mean square of d[s, i] over the number of images (the
    part of var(mean_i d[s, i]) that more images would average away)."""
    rows = []
    for seed in sorted(arm.keys() & ref.keys()):
        a, b = arm[seed].images.get(metric), ref[seed].images.get(metric)
        if a and b and len(a) == len(b):
            rows.append(np.asarray(a, float) - np.asarray(b, float))
    if len(rows) < 2 or len({len(r) for r in rows}) != 1 or not math.isfinite(sd) or sd <= 0:
        return None
    d = np.stack(rows)
    d = d[:, np.isfinite(d).all(axis=0)]  # images every seed scored
    seeds, images = d.shape
    if images < 2:
        return None
    residual = d - d.mean(axis=1, keepdims=True) - d.mean(axis=0, keepdims=True) + d.mean()
    interaction = (residual ** 2).sum() / ((seeds - 1) * (images - 1))
    return float(min(1.0, interaction / images / sd ** 2))


def paired_p_value(diff: Estimate) -> float:
    """Two-sided p of the paired t-test of mean Δ = 0: the test whose interval (mean_ci) gives
    the raw verdict. sd = 0: 0 when Δ is not 0 (the interval is a point off 0), else 1."""
    if diff.n < 2 or not (finite(diff.mean) and finite(diff.sd)):
        return math.nan
    if diff.sd == 0:
        return 0.0 if diff.mean != 0 else 1.0
    t = diff.mean / (diff.sd / math.sqrt(diff.n))
    return float(2 * stats.t.sf(abs(t), diff.n - 1))


def holm_adjust(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count): the i-th smallest
    of m finite p's becomes max over j <= i of min(1, (m - j + 1) p_(j)). Rejecting where the
    adjusted p < alpha keeps the chance of any false rejection at most alpha."""
    order = sorted((p, i) for i, p in enumerate(p_values) if finite(p))
    adjusted, running, m = [math.nan] * len(p_values), 0.0, len(order)
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _verdict(diff: Estimate, p: float, alpha: float, expect: str) -> str:
    """The verdict of a tested claim (2+ pairs) at p-value p."""
    if not p < alpha:
        return NOT_SHOWN
    return REPRODUCED if diff.mean * (1 if expect == "higher" else -1) > 0 else OPPOSITE


def judge_claim(claim: Claim, groups: dict[str, list[RunRecord]],
               level: float = 0.95) -> ClaimResult:
    if claim.arm not in groups or claim.reference not in groups:
        nan = Estimate(0, math.nan, math.nan, math.nan, math.nan)
        return ClaimResult(claim, nan, math.nan, math.nan, NOT_RUN, math.nan, None)
    arm = {r.seed: r for r in groups[claim.arm]}
    ref = {r.seed: r for r in groups[claim.reference]}
    values = {s: value_of(r, claim.metric, claim.step) for s, r in arm.items()}
    base = {s: value_of(r, claim.metric, claim.step) for s, r in ref.items()}
    seeds = sorted(s for s in values.keys() & base.keys()
                   if finite(values[s]) and finite(base[s]))
    diff = mean_ci([values[s] - base[s] for s in seeds], level)
    side = 1 if claim.expect == "higher" else -1
    if diff.n < 2:
        verdict = TOO_FEW
    elif diff.excludes_zero:
        verdict = REPRODUCED if diff.mean * side > 0 else OPPOSITE
    else:
        verdict = NOT_SHOWN
    share = image_share(arm, ref, claim.metric, diff.sd) if claim.step is None else None
    return ClaimResult(claim, diff, _mean(values, seeds), _mean(base, seeds), verdict,
                       detectable_effect(diff.sd, diff.n, level), share,
                       seeds_needed(diff.sd, diff.mean, level), paired_p_value(diff))


def _mean(values: dict, seeds: list) -> float:
    return float(np.mean([values[s] for s in seeds])) if seeds else math.nan


def judge_claims(claims: list[Claim], groups: dict[str, list[RunRecord]],
                level: float = 0.95) -> list[ClaimResult]:
    """Every claim's raw verdict, and its Holm-adjusted one over the claims the table tests
    (those with 2+ pairs; "not run" and "too few seeds" keep their verdict and do not count)."""
    return adjust_over_table([judge_claim(c, groups, level) for c in claims], level)


def adjust_over_table(results: list[ClaimResult], level: float = 0.95) -> list[ClaimResult]:
    """Set every result's Holm p and verdict, adjusted over the results given (the table)."""
    for r, p in zip(results, holm_adjust([r.p_value for r in results])):
        r.holm_p = p
        r.holm_verdict = (_verdict(r.diff, p, 1 - level, r.claim.expect) if finite(p)
                          else r.verdict)
    return results


def number(x: Optional[float], signed: bool = False) -> str:
    """A figure as the tables print it: 3 decimals, "–" for NaN or None."""
    if not finite(x):
        return "–"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def interval(r: "ClaimResult") -> str:
    """Δ ± the half-width of its interval, or – below two pairs."""
    return "–" if r.diff.n < 2 else f"{number(r.diff.mean, True)} ± {number(r.diff.half_width)}"


def _p(p: float) -> str:
    return "–" if not finite(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def claims_markdown(results: list[ClaimResult], level: float = 0.95) -> list[str]:
    """The claims table as markdown lines."""
    pct = f"{level:.0%}"
    lines = [f"Δ = arm − reference, paired by seed, mean ± half-width of its {pct} t-interval. "
             f"Detectable: the smallest |Δ| this design finds with {POWER:.0%} power at "
             f"{pct}. Seeds for Δ: how many seeds would find the measured Δ with that power. "
             "Image share: how much of the seed-to-seed spread of Δ the evaluation set's size "
             "explains (– where no per-image scores exist). p: the paired t-test's; Holm: the "
             f"verdict at p adjusted over the {sum(finite(r.p_value) for r in results)} tested "
             f"claims (Holm), so that the chance of any false verdict in the table is at most "
             f"{1 - level:.0%}.", "",
             "| paper's claim | arm vs reference | metric | arm / reference | Δ ± CI | verdict "
             "| p (Holm p) | Holm verdict | detectable | seeds for Δ | image share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.claim
        metric = f"`{c.metric}`" + (f" at step {c.step}" if c.step is not None else "") + \
            f" ({c.expect} expected)"
        row = [c.claim, f"`{c.arm}` vs `{c.reference}`", metric,
               f"{number(r.arm_mean)} / {number(r.reference_mean)}",
               f"{interval(r)} (n={r.diff.n})",
               f"**{r.verdict}**", f"{_p(r.p_value)} ({_p(r.holm_p)})",
               f"**{r.holm_verdict or r.verdict}**", number(r.detectable),
               "–" if r.seeds_needed is None else str(r.seeds_needed), number(r.image_share)]
        lines.append("| " + " | ".join(s.replace("|", "\\|") for s in row) + " |")
    return lines


def write_claims_csv(results: list[ClaimResult], path: Path) -> None:
    """One row per result; a `stage` column first when the results come from several stages."""
    staged = any(r.stage for r in results)
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stage"] * staged + [
            "claim", "arm", "reference", "metric", "step", "expect", "pairs", "arm_mean",
            "reference_mean", "diff_mean", "diff_ci_low", "diff_ci_high", "verdict",
            "detectable", "seeds_needed", "image_share", "p_value", "holm_p", "holm_verdict"])
        for r in results:
            c = r.claim
            writer.writerow([r.stage] * staged + [
                c.claim, c.arm, c.reference, c.metric, c.step, c.expect, r.diff.n, r.arm_mean,
                r.reference_mean, r.diff.mean, r.diff.low, r.diff.high, r.verdict, r.detectable,
                r.seeds_needed or "", "" if r.image_share is None else r.image_share,
                r.p_value, r.holm_p, r.holm_verdict or r.verdict])


def _number(text: Optional[str]) -> float:
    return float(text) if text not in (None, "") else math.nan


def read_claims_csv(path: Path, level: float = 0.95) -> list[ClaimResult]:
    """The results of a claims.csv, also one written before the p columns existed: the paired
    sd is recovered from the recorded t-interval (half-width x sqrt(n) / t quantile) and p from
    it, so a committed table is re-judged without the sweep's run records. Holm is left unset:
    it depends on the table the results end up in (adjust_over_table)."""
    results = []
    for row in csv.DictReader(Path(path).open()):
        n, low, high = int(row["pairs"] or 0), _number(row["diff_ci_low"]), \
            _number(row["diff_ci_high"])
        sd = ((high - low) / 2 * math.sqrt(n) / stats.t.ppf(0.5 + level / 2, n - 1)
              if n >= 2 else math.nan)
        diff = Estimate(n, _number(row["diff_mean"]), sd, low, high)
        step = row["step"]
        claim = Claim(row["claim"], row["arm"], row["metric"], row["expect"], row["reference"],
                      int(step) if step else None)
        share, needed = row.get("image_share"), row.get("seeds_needed")
        results.append(ClaimResult(
            claim, diff, _number(row["arm_mean"]), _number(row["reference_mean"]),
            row["verdict"], _number(row["detectable"]), _number(share) if share else None,
            int(needed) if needed else None, paired_p_value(diff)))
    return results


def holm_from_csv(path: Path, level: float = 0.95) -> list[dict]:
    """Raw and Holm verdicts of one committed claims.csv, adjusted over that table."""
    return [{"claim": r.claim.claim, "verdict": r.verdict, "p": r.p_value, "holm_p": r.holm_p,
             "holm_verdict": r.holm_verdict}
            for r in adjust_over_table(read_claims_csv(path, level), level)]


if __name__ == "__main__":  # python -m cnexp.analysis.claims <claims.csv>: the Holm verdicts
    import sys

    for r in holm_from_csv(Path(sys.argv[1])):
        print(f"{r['claim'][:60]:60s} {r['verdict']:12s} p {r['p']:.4f}  Holm p "
              f"{r['holm_p']:.4f}  {r['holm_verdict']}")
