"""One claims table over several studies: each stage's committed claims.csv, re-judged with
Holm's adjustment taken over every tested claim of every stage.

    python -m cnexp.analysis.claims_table --out experiments/claims_table \\
        claims_study=experiments/claims_study/report/claims.csv \\
        small_data=experiments/regime_study/report_small_data/claims.csv ...

Each stage judged its claims in its own sweep (`compare --claims`), so each stage's Holm verdicts
control the error rate of that stage alone. The headline question ("which of the paper's claims
does the framework reproduce?") is asked of all of them at once, so the family here is the study:
one table, one adjustment. Only the committed tables are read (no run records): the paired sd is
recovered from each recorded interval (`read_claims_csv`). Writes claims.md (the table with a
verdict count), claims.csv (a `stage` column first), claims.png (the forest plot, a row per
claim on its own scale) and overview.png (every claim on one axis, in units of its detectable
effect). `--side-by-side A,B` also writes side_by_side.md: each claim of stage A beside the claim
of stage B that tests the same arm, reference, metric and step (the UNet's verdict beside the
transformer's), with the Holm verdicts of the one table; `--readme README.md` rewrites the
compact form of it (claim, A's cell, B's cell; `--labels` names the columns) between the file's
`<!-- side-by-side -->` and `<!-- /side-by-side -->` lines, so the headline is this command's.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

from cnexp.analysis.claims import (NOT_SHOWN, OPPOSITE, REPRODUCED, ClaimResult, ClaimsError,
                                   adjust_over_table, claims_markdown, interval, read_claims_csv,
                                   write_claims_csv)
from cnexp.analysis.stats import finite


def parse_stage(text: str) -> tuple[str, Path]:
    """NAME=PATH, or ClaimsError saying what to write."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ClaimsError(f"{text!r}: name each table, e.g. small_data=report_small_data/"
                          "claims.csv")
    return name, Path(path)


def merge_tables(stages: list[tuple[str, Path]], level: float = 0.95) -> list[ClaimResult]:
    """Every stage's results, each claim prefixed with its stage, Holm over all of them."""
    results = []
    for name, path in stages:
        try:
            rows = read_claims_csv(path, level)
        except OSError as err:
            raise ClaimsError(f"{path} (stage {name}): cannot be read ({err.strerror})") from None
        except KeyError as err:
            raise ClaimsError(f"{path} (stage {name}): no column {err} — is it a claims.csv "
                              "written by cnexp.analysis.compare --claims?") from None
        results += [replace(r, stage=name,
                            claim=replace(r.claim, claim=_staged(name, r.claim.claim)))
                    for r in rows]
    return adjust_over_table(results, level)


def _staged(stage: str, claim: str) -> str:
    """'stage: claim', once (a claim that already names its stage keeps its text)."""
    return claim if claim.startswith(f"{stage}: ") else f"{stage}: {claim}"


def _counted(verdicts: Counter) -> str:
    return ", ".join(f"{verdicts[v]} {v}" for v in (REPRODUCED, OPPOSITE, NOT_SHOWN))


def verdict_counts(results: list[ClaimResult]) -> str:
    """'33 claims, 33 tested — raw: 12 reproduced, 3 opposite, 18 not shown; Holm over all 33:
    2 reproduced, 1 opposite, 30 not shown'."""
    tested = [r for r in results if finite(r.p_value)]
    raw, holm = Counter(r.verdict for r in tested), Counter(r.holm_verdict for r in tested)
    return (f"{len(results)} claims, {len(tested)} tested — raw: {_counted(raw)}; "
            f"Holm over all {len(tested)}: {_counted(holm)}")


def write_table(results: list[ClaimResult], stages: list[tuple[str, Path]], out: Path,
                level: float = 0.95, figures: bool = True, options: tuple[str, ...] = ()) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m cnexp.analysis.claims_table --out", str(out)] +
                       [f"{name}={path}" for name, path in stages] + list(options))
    lines = ["# One claims table", "", f"`{command}`", "",
             f"**{verdict_counts(results)}.**", ""] + claims_markdown(results, level) + [""]
    (out / "claims.md").write_text("\n".join(lines))
    write_claims_csv(results, out / "claims.csv")  # with the stage column first
    if figures:
        from cnexp.analysis import plots  # matplotlib only where a figure is drawn
        plots.claims_forest(results, out / "claims.png")
        plots.claims_overview(results, out / "overview.png")
    return out / "claims.md"


def _tested(r: ClaimResult) -> tuple:
    return r.claim.arm, r.claim.reference, r.claim.metric, r.claim.step


def _cell(r: ClaimResult) -> str:
    holm = r.holm_verdict or r.verdict
    return f"{interval(r)} **{holm}**" + (f" (raw: {r.verdict})" if r.verdict != holm else "")


def matched(results: list[ClaimResult], first: str, second: str
            ) -> list[tuple[ClaimResult, ClaimResult]]:
    """Each claim of stage `first` with the claim of stage `second` that runs the same test."""
    stages = {r.stage for r in results}
    for name in (first, second):
        if name not in stages:
            raise ClaimsError(f"--side-by-side: no stage {name!r} (stages: "
                              f"{', '.join(sorted(stages))})")
    theirs = {_tested(r): r for r in results if r.stage == second}
    return [(r, theirs[_tested(r)]) for r in results
            if r.stage == first and _tested(r) in theirs]


def side_by_side(results: list[ClaimResult], first: str, second: str) -> list[str]:
    """Markdown lines: each claim of stage `first` beside the same test in stage `second`
    (Δ ± CI and the Holm verdict of the one table, the raw one beside it where they differ),
    and whether the Holm verdicts agree."""
    lines = [f"| claim | arm vs reference | metric | {first}: Δ ± CI, Holm verdict | "
             f"{second}: Δ ± CI, Holm verdict | same verdict |", "|---|---|---|---|---|---|"]
    for r, other in matched(results, first, second):
        c = r.claim
        metric = f"`{c.metric}`" + (f" at step {c.step}" if c.step is not None else "")
        same = (r.holm_verdict or r.verdict) == (other.holm_verdict or other.verdict)
        row = [_short(r, first), f"`{c.arm}` vs `{c.reference}`", metric,
               _cell(r), _cell(other), "yes" if same else "**no**"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _short(r: ClaimResult, stage: str) -> str:
    return r.claim.claim.removeprefix(f"{stage}: ")


def headline(results: list[ClaimResult], first: str, second: str,
             labels: tuple[str, str]) -> list[str]:
    """The side-by-side table's compact form for a README: claim, and each stage's cell."""
    lines = [f"| claim (arm vs its reference) | {labels[0]}: Δ, Holm verdict | "
             f"{labels[1]}: Δ, Holm verdict |", "|---|---|---|"]
    return lines + [f"| {_short(r, first)} | {_cell(r)} | {_cell(other)} |"
                    for r, other in matched(results, first, second)]


BEGIN, END = "<!-- side-by-side -->", "<!-- /side-by-side -->"


def around_block(path: Path) -> tuple[str, str]:
    """What lies before the BEGIN line of `path` and after its END line, or ClaimsError."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ClaimsError(f"--readme {path}: cannot be read ({err.strerror})") from None
    if BEGIN not in text or END not in text.split(BEGIN, 1)[1]:
        raise ClaimsError(f"--readme {path}: put a line {BEGIN} before the table to rewrite "
                          f"and a line {END} after it")
    before, rest = text.split(BEGIN, 1)
    return before, rest.split(END, 1)[1]


def rewrite_block(path: Path, around: tuple[str, str], lines: list[str]) -> None:
    """`path` with `lines` between its BEGIN and END lines, the rest as it was."""
    new = path.with_name(path.name + ".tmp")  # written whole, then swapped in
    new.write_text(around[0] + "\n".join([BEGIN] + lines + [END]) + around[1])
    new.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="+", metavar="NAME=CLAIMS_CSV")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--side-by-side", metavar="A,B",
                        help="also write side_by_side.md: stage A's claims beside stage B's")
    parser.add_argument("--readme", type=Path, metavar="PATH",
                        help="with --side-by-side: rewrite its compact table in PATH between "
                             f"the lines {BEGIN} and {END}")
    parser.add_argument("--labels", metavar="A,B",
                        help="the --readme table's column names (default: the stage names)")
    args = parser.parse_args(argv)
    try:
        stages = [parse_stage(s) for s in args.stages]
        results = merge_tables(stages, args.level)
        pair = args.side_by_side.split(",") if args.side_by_side else None
        if pair is not None and len(pair) != 2:
            raise ClaimsError(f"--side-by-side {args.side_by_side}: name two stages, A,B")
        compared = side_by_side(results, *pair) if pair else None
        if args.readme is not None:
            if pair is None:
                raise ClaimsError("--readme: name the two stages with --side-by-side A,B")
            labels = args.labels.split(",") if args.labels else pair
            if len(labels) != 2:
                raise ClaimsError(f"--labels {args.labels}: name two columns, A,B")
            # checked before anything is written; the README is rewritten last
            readme = around_block(args.readme), headline(results, *pair, tuple(labels))
    except ClaimsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    options = ("--side-by-side", args.side_by_side) if pair else ()
    if args.readme is not None:
        options += ("--readme", str(args.readme)) + (("--labels", args.labels)
                                                      if args.labels else ())
    path = write_table(results, stages, args.out, args.level, not args.no_figures, options)
    print(f"{verdict_counts(results)}\nwrote {path}")
    if compared is not None:
        (args.out / "side_by_side.md").write_text("\n".join(compared) + "\n")
        print(f"wrote {args.out / 'side_by_side.md'}")
    if args.readme is not None:
        rewrite_block(args.readme, *readme)
        print(f"rewrote the side-by-side table in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
