"""The comparison's written report: report.md's sections, summary.csv and runs.csv, from the
table that cnexp/analysis/compare.py summarizes (compare reads runs and computes; this writes)."""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Optional

from cnexp.analysis.claims import claims_markdown
from cnexp.analysis.runs import DUPLICATE, DUPLICATE_RULE, OK, STATUSES, RunRecord, shown_path
from cnexp.analysis.stats import Estimate
from cnexp.metrics.registry import described
from cnexp.overrides import knob_diff

SETTING_ORDER = ("curve", "default", "none", "insufficient", "conflicting", "perfect")
# metrics no registry declares (cnexp/metrics/registry.py: sample metrics and the fidelity
# table): lower is better when the name holds one of these (drift and damage: from the base)
LOWER_IS_BETTER = ("kid", "loss", "lpips", "mse", "drift", "damage")


def lower_is_better(metric: str) -> bool:
    declared = described(metric).get("higher_is_better")
    if declared is not None:
        return not declared
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def heading(metric: str) -> str:
    """A table's heading: "fid: FID (lower is better)"."""
    label = described(metric).get("label")
    better = "lower" if lower_is_better(metric) else "higher"
    return f"{metric}{f': {label}' if label else ''} ({better} is better)"


def _setting_rank(setting: str) -> tuple[int, str]:
    return (SETTING_ORDER.index(setting) if setting in SETTING_ORDER else len(SETTING_ORDER),
            setting)


def baseline_of(label: str, groups: dict[str, list[RunRecord]], baseline: str) -> Optional[str]:
    """The baseline label with the same other swept knobs as `label`."""
    variant = groups[label][0].variant
    candidate = f"{baseline} [{variant}]" if variant else baseline
    return candidate if candidate in groups else None


def _num(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.3g}" if abs(x) >= 1000 else f"{x:.3f}"


def fmt_estimate(e: Estimate, signed: bool = False, runs: int = 0) -> str:
    """"0.412 ± 0.051", Δ "-0.100 ± 0.025 *"; "(n=k)" when fewer values than runs."""
    if e.n == 0:
        return "–"
    mean = f"{e.mean:+.3f}" if signed and abs(e.mean) < 1000 else _num(e.mean)
    star = " *" if signed and e.excludes_zero else ""
    fewer = f" (n={e.n})" if e.n == 1 or e.n < runs else ""
    return (f"{mean}{fewer}" if e.n == 1 else f"{mean} ± {_num(e.half_width)}{star}{fewer}")


def write_summary_csv(table, path: Path) -> None:
    columns = ["metric", "setting", "ablation", "n", "mean", "sd", "ci_low", "ci_high",
               "pairs", "diff_mean", "diff_ci_low", "diff_ci_high", "values_by_seed"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for metric, by_label in table.items():
            for label, by_setting in by_label.items():
                for setting, c in sorted(by_setting.items(), key=lambda kv: _setting_rank(kv[0])):
                    d = c.diff
                    writer.writerow([metric, setting, label, c.estimate.n, c.estimate.mean,
                                     c.estimate.sd, c.estimate.low, c.estimate.high,
                                     d.n if d else "", d.mean if d else "", d.low if d else "",
                                     d.high if d else "",
                                     " ".join(f"{s}:{v:.6g}" for s, v in sorted(c.values.items()))])


def write_runs_csv(records: list[RunRecord], path: Path, root: Optional[Path] = None) -> None:
    """One row per run; `path` relative to root (the compared directory) when given."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "ablation", "variant", "seed", "status", "error", "path"])
        for r in records:
            writer.writerow([r.name, r.ablation, r.variant, r.seed, r.status, r.error,
                             shown_path(r.path, root)])


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
                    for row in rows]


def knob_lines(groups: dict[str, list[RunRecord]], baseline: str) -> list[list[str]]:
    rows = []
    for label, runs in groups.items():
        base = baseline_of(label, groups, baseline)
        knobs = ("(the reference)" if base == label else "(no baseline run)" if base is None else
                 ", ".join(f"`{k}={v}`" for k, v in
                           knob_diff(runs[0].config, groups[base][0].config).items()) or "none")
        rows.append([label, str(len(runs)), ", ".join(str(r.seed) for r in runs), knobs])
    return rows


def _num_or_unknown(x: float | None) -> str:
    return "?" if x is None else _num(x)


def dynamics_rows(groups: dict[str, list[RunRecord]]) -> list[list[str]]:
    """Per ablation, seed by seed: base damage at step 0, the step-0 and final value of the
    sudden-convergence metric, the step it first crosses its threshold and the steepest rise."""
    rows = []
    for label, runs in groups.items():
        cells = {"damage": [], "curve": [], "cross": [], "rise": []}
        for run in runs:
            # metrics.json's sudden_convergence: {metric: {step, final, ...}} (first metric)
            sudden = run.sudden if isinstance(run.sudden, dict) and run.sudden else {"?": {}}
            name, info = next(iter(sudden.items()))
            if not isinstance(info, dict):
                name, info = "?", {}
            first = next((row for row in run.history if f"eval/curve/{name}" in row), {})
            cells["damage"].append(_num_or_unknown(run.base_damage))
            cells["curve"].append(f"{name} {_num_or_unknown(first.get(f'eval/curve/{name}'))} → "
                                  f"{_num_or_unknown(info.get('final'))}")
            cells["cross"].append("never" if info.get("step") is None else str(info["step"]))
            cells["rise"].append(str(info.get("steepest_rise_step", "?")))
        rows.append([label, ", ".join(str(r.seed) for r in runs),
                     *("; ".join(values) for values in cells.values())])
    return rows


def budget_lines(groups: dict[str, list[RunRecord]]) -> list[str]:
    """Steps, time and machine of the finished runs, from metrics.json and status.json."""
    budgets = [r.budget for runs in groups.values() for r in runs if r.budget]
    if not budgets:
        return ["Not recorded."]

    def spread(key: str) -> str:
        values = [b[key] for b in budgets if isinstance(b.get(key), (int, float))]
        if not values:
            return "?"
        return (f"{sum(values) / len(values):.0f} s (min {min(values):.0f}, max {max(values):.0f})"
                if key.endswith("seconds") else ", ".join(str(v) for v in sorted(set(values))))

    lines = [f"- {len(budgets)} finished runs; training steps per run: {spread('steps')}",
             f"- training time per run: {spread('fit_seconds')}; whole job (loading, "
             f"evaluation, export): {spread('seconds')}"]
    ends = [(b["epoch"], b["seconds"]) for b in budgets if "epoch" in b and "seconds" in b]
    if ends:
        span = max(e for e, _ in ends) - min(e - sec for e, sec in ends)
        lines.append(f"- sweep wall time, first job start to last job end: {span / 60:.1f} min")
    machines = sorted({f"{b.get('host', '?')}: {b.get('cpus', '?')} CPU cores, "
                       f"{b.get('torch_threads', '?')} torch threads per job, "
                       f"GPU {b.get('gpu') or 'none'}" for b in budgets})
    return lines + [f"- machine: {m}" for m in machines]


def markdown(table, groups, records, baseline: str, figures: list[Path], source: str,
             level: float, claims: Optional[list] = None, root: Optional[Path] = None) -> str:
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    pct = f"{level:.0%}"
    out = [f"# Sweep comparison: {source}", "",
           f"Generated by `python -m cnexp.analysis.compare` on {time.strftime('%Y-%m-%d %H:%M')}. "
           + " · ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(records)} runs.", "",
           f"Cells: final value, mean over seeds ± half-width of the {pct} Student-t interval "
           "(n − 1 degrees of freedom). Δ: difference to the baseline run with the same seed, "
           f"averaged over seeds, ± its own {pct} t-interval; `*` marks a Δ whose interval "
           "excludes 0. `(n=k)`: only k seeds had a value. With few seeds the intervals of the means "
           "are wide; the paired Δ is the sharper test.", ""]
    if claims:
        out += ["## Claims", ""] + claims_markdown(claims, level) + [""]
    out += ["## Ablations", ""]
    out += _md_table(["ablation", "runs", "seeds", f"knobs that differ from `{baseline}`"],
                     knob_lines(groups, baseline))
    for metric, by_label in table.items():
        settings = sorted({s for cells in by_label.values() for s in cells}, key=_setting_rank)
        out += ["", f"## {heading(metric)}", "", f"Mean ± {pct} CI over seeds:", ""]
        means, diffs = [], []
        for label, cells in by_label.items():
            runs = len(groups[label])
            means.append([label, *(fmt_estimate(cells[s].estimate, runs=runs) if s in cells
                                   else "–" for s in settings)])
            if any(c.diff for c in cells.values()):
                diffs.append([label, *(fmt_estimate(cells[s].diff, True, runs)
                                       if s in cells and cells[s].diff else "–"
                                       for s in settings)])
        out += _md_table(["ablation", *settings], means)
        if diffs:
            out += ["", f"Δ vs `{baseline}`, paired by seed, ± {pct} CI:", ""]
            out += _md_table(["ablation", *settings], diffs)
    out += ["", "## Step 0 and sudden convergence", "",
            "Seed by seed. Base damage: MSE between the controlled and the base model's noise "
            "prediction before any update (0 = the run starts as the base). Curve: the fidelity "
            "curve's metric (first eval.curve_images images, perfect prompt) at step 0 → the "
            "end; crosses: first evaluated step at or past eval.convergence_threshold.", ""]
    out += _md_table(["ablation", "seeds", "base damage at step 0", "curve", "crosses at step",
                      "steepest rise at step"], dynamics_rows(groups))
    out += ["", "## Budget", ""] + budget_lines(groups)
    if figures:
        out += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    left_out = [r for r in records if r.status != OK]
    redone = {(r.label, r.seed) for r in records if r.status == OK}
    out += ["", "## Runs not in the tables", ""]
    if any(r.status == DUPLICATE for r in records):
        out += [f"Duplicates: {DUPLICATE_RULE}.", ""]
    out += (_md_table(["run", "ablation", "seed", "status", "error", "path"],
                      [[r.name, r.label, r.seed, r.status + (" (rerun finished)" if
                        r.status != DUPLICATE and (r.label, r.seed) in redone else ""),
                        r.error, shown_path(r.path, root)] for r in left_out])
            if left_out else ["None: every run of the sweep finished."])
    return "\n".join(out) + "\n"
