"""Compare the runs of a sweep: `python -m cnexp.analysis.compare <sweep dir> [--out DIR]`
(or `--wandb entity/project --group G`, read through the W&B API when online).

Writes to <out> (default <sweep dir>/compare):
  report.md    per metric and prompt setting: mean over seeds ± 95% t-interval, and the
               difference to baseline paired by seed ± its own interval; runs missing or failed
  summary.csv  the same numbers, one row per ablation x prompt setting x metric
  runs.csv     every run with its status, error and directory (relative to the sweep dir)
  curves_<metric>.png, bars_<metric>.png, samples.png
  with --claims FILE: claims.csv, claims.png and the claims table at the top of report.md
  (cnexp/analysis/claims.py: each paper claim's paired effect, verdict and detectable effect)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cnexp.analysis import plots
from cnexp.analysis.claims import ClaimsError, judge_claims, load_claims, write_claims_csv
from cnexp.analysis.report import (SETTING_ORDER, _setting_rank, baseline_of, lower_is_better,
                                   markdown, write_runs_csv, write_summary_csv)
from cnexp.analysis.runs import OK, RunRecord, is_metric, load_sweep, load_wandb
from cnexp.analysis.stats import Estimate, mean_ci, paired_difference
from cnexp.run.record import METRICS_FILE

# eval/curve/<metric>: a subset of the perfect-prompt images, scored often for the step curves;
# eval/<metric> ("default"): the headline copy of one setting. Neither goes in the final tables
# when per-setting keys exist (cnexp/metrics/callbacks.py).
CURVE_ONLY = "curve"


@dataclass
class Cell:
    """One ablation x prompt setting x metric: final values by seed and their statistics."""
    values: dict[int, float]
    estimate: Estimate
    diff: Optional[Estimate] = None  # paired by seed, minus baseline; None for baseline itself


def split_key(key: str) -> tuple[str, str]:
    """eval/perfect/shape_iou -> ("perfect", "shape_iou"); eval/shape_iou -> ("default", ...)."""
    parts = key.removeprefix("eval/").split("/")
    return ("default" if len(parts) == 1 else "/".join(parts[:-1])), parts[-1]


def distinct_keys(keys: set[str], curve: bool = False) -> list[str]:
    """Metric keys without the headline duplicates (and without the curve subset unless asked)."""
    split = {k: split_key(k) for k in keys if is_metric(k)}
    per_setting = {metric for setting, metric in split.values() if setting != "default"}
    return sorted(k for k, (setting, metric) in split.items() if (curve or setting != CURVE_ONLY)
                  and not (setting == "default" and metric in per_setting))



def select_runs(records: list[RunRecord], baseline: str = "baseline"
                ) -> dict[str, list[RunRecord]]:
    """label -> finished runs, one per seed (a seed finished twice: the newest), baseline first."""
    latest: dict[tuple[str, Optional[int]], RunRecord] = {}
    for run in records:
        if run.status != OK:
            continue
        key = (run.label, run.seed)
        if key not in latest or _mtime(run) > _mtime(latest[key]):
            latest[key] = run
    groups: dict[str, list[RunRecord]] = {}
    for (label, _), run in sorted(latest.items(), key=lambda kv: kv[0][1] or 0):
        groups.setdefault(label, []).append(run)
    order = sorted(groups, key=lambda label: (label.split(" [")[0] != baseline,
                                              [r.label for r in records].index(label)))
    return {label: groups[label] for label in order}


def _mtime(run: RunRecord) -> float:
    try:
        return (run.path / METRICS_FILE).stat().st_mtime if run.path else 0.0
    except OSError:
        return 0.0



def summarize(groups: dict[str, list[RunRecord]], baseline: str = "baseline",
              level: float = 0.95) -> dict[str, dict[str, dict[str, Cell]]]:
    """metric -> label -> setting -> Cell, over every eval/ key any finished run reports."""
    keys = distinct_keys({k for runs in groups.values() for r in runs for k in r.final})
    table: dict[str, dict[str, dict[str, Cell]]] = {}
    for key in sorted(keys, key=lambda k: (split_key(k)[1], _setting_rank(split_key(k)[0]))):
        setting, metric = split_key(key)
        for label, runs in groups.items():
            values = {r.seed: r.final[key] for r in runs if key in r.final}
            if not values:
                continue
            cell = Cell(values, mean_ci(values.values(), level))
            base = baseline_of(label, groups, baseline)
            if base is not None and base != label:
                base_values = {r.seed: r.final[key] for r in groups[base] if key in r.final}
                cell.diff = paired_difference(values, base_values, level)
            table.setdefault(metric, {}).setdefault(label, {})[setting] = cell
    return table


def make_figures(table, groups, out: Path) -> list[Path]:
    figures = []
    keys = distinct_keys({k for runs in groups.values() for r in runs for row in r.history
                          for k in row}, curve=True)
    for metric in table:
        by_setting = {split_key(k)[0]: k for k in sorted(keys) if split_key(k)[1] == metric}
        by_setting = dict(sorted(by_setting.items(), key=lambda kv: _setting_rank(kv[0])))
        if by_setting:
            figures.append(plots.metric_curves(groups, metric, by_setting,
                                               out / f"curves_{metric}.png",
                                               lower_is_better(metric)))
        figures.append(plots.setting_bars(table[metric], metric, out / f"bars_{metric}.png",
                                          lower_is_better(metric)))
    figures.append(plots.sample_grids(groups, out / "samples.png", SETTING_ORDER))
    return [f for f in figures if f is not None]


def compare(records: list[RunRecord], out: Path, source: str, baseline: str = "baseline",
            level: float = 0.95, figures: bool = True, claims_file: Optional[Path] = None,
            root: Optional[Path] = None) -> dict:
    """Write report.md, summary.csv, runs.csv and the figures (and the claims table when a
    claims file is given); return the summary table. root: the compared directory, which the
    runs' paths are written relative to."""
    claims = load_claims(claims_file) if claims_file else None  # a bad file fails before writing
    out.mkdir(parents=True, exist_ok=True)
    groups = select_runs(records, baseline)
    table = summarize(groups, baseline, level)
    write_summary_csv(table, out / "summary.csv")
    write_runs_csv(records, out / "runs.csv", root)
    pngs = make_figures(table, groups, out) if figures else []
    results = judge_claims(claims, groups, level) if claims else None
    if results:
        write_claims_csv(results, out / "claims.csv")
        forest = plots.claims_forest(results, out / "claims.png") if figures else None
        pngs = [forest, *pngs] if forest else pngs
    (out / "report.md").write_text(markdown(table, groups, records, baseline, pngs, source, level,
                                            results, root))
    return table


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnexp.analysis.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a multirun directory (or any "
                        "directory above run directories)")
    parser.add_argument("--out", type=Path, help="where to write (default <sweep dir>/compare)")
    parser.add_argument("--baseline", default="baseline", help="the reference ablation")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from the W&B API")
    parser.add_argument("--group", help="the W&B group (with --wandb)")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--claims", type=Path, metavar="FILE", help="a claims file (YAML, see "
                        "cnexp/analysis/claims.py): adds the claims table to the report")
    args = parser.parse_args(argv)
    if args.wandb:
        if not args.group:
            parser.error("--wandb needs --group (the sweep's W&B group)")
        source = f"W&B {args.wandb}/{args.group}"
        try:
            records = load_wandb(args.wandb, args.group)
        except Exception as err:  # noqa: BLE001 - no network, no login, wrong project, ...
            print(f"cannot read {source}: {err}\n  needs network and `wandb login`; offline runs "
                  "reach W&B with `wandb sync <run dir>/wandb/offline-run-*`", file=sys.stderr)
            return 2
        out, root = args.out or Path("compare") / args.group, None
    elif args.sweep_dir is None:
        parser.error("give a sweep directory (multirun/<date>/<time>), or --wandb "
                     "ENTITY/PROJECT --group G")
    elif not args.sweep_dir.is_dir():
        parser.error(f"sweep directory {args.sweep_dir} does not exist")
    else:
        records, source, root = load_sweep(args.sweep_dir), str(args.sweep_dir), args.sweep_dir
        out = args.out or args.sweep_dir / "compare"
    if not records:
        print(f"no runs found in {source}", file=sys.stderr)
        return 1
    try:
        compare(records, out, source, args.baseline, args.level, figures=not args.no_figures,
                claims_file=args.claims, root=root)
    except ClaimsError as err:
        print(err, file=sys.stderr)
        return 2
    bad = [r for r in records if r.status != OK]
    print(f"{len(records) - len(bad)} of {len(records)} runs finished; report: {out / 'report.md'}")
    for r in bad:
        print(f"  {r.status:10s} {r.name}: {r.error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
