"""Figures for a sweep comparison: metric vs step per ablation (seed band, sudden convergence),
bars per prompt setting with confidence intervals, and sample grids side by side (paper Fig. 8)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cnexp.analysis.runs import RunRecord  # noqa: E402


def sudden_step(entry: Any, key: str) -> Optional[float]:
    """The sudden-convergence step that metrics.json's `sudden_convergence` gives for `key`.

    Accepts a step; {"step": s, ...} (for the `metric` it names, if it names one); or a mapping
    from metric key (with or without `eval/`), prompt setting or metric name to either. Anything
    else (absent, null, "not reached") is None.
    """
    if isinstance(entry, bool) or entry is None:
        return None
    if isinstance(entry, (int, float)):
        return float(entry) if math.isfinite(entry) else None
    if isinstance(entry, dict):
        parts = key.removeprefix("eval/").split("/")
        named = entry.get("metric")  # {"metric": "eval/perfect/shape_iou", "step": 300}
        if isinstance(named, str) and named not in (key, key.removeprefix("eval/"), parts[-1]):
            return None
        for candidate in (key, key.removeprefix("eval/"), parts[0], parts[-1], "step"):
            if candidate in entry:
                return sudden_step(entry[candidate], key)
    return None


def _series(run: RunRecord, key: str) -> dict[int, float]:
    return {int(row["step"]): row[key] for row in run.history if key in row}


def metric_curves(groups: dict[str, list[RunRecord]], metric: str, keys: dict[str, str],
                  path: Path, lower_is_better: bool = False) -> Optional[Path]:
    """One panel per prompt setting (keys: setting -> metric key), one line per ablation: the
    mean over seeds, a band from the lowest to the highest seed, dotted lines at each seed's
    sudden-convergence step."""
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.4), squeeze=False,
                             sharey=True)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    drawn = False
    for ax, (setting, key) in zip(axes.flat, keys.items()):
        for color, (label, runs) in zip(plt.cm.tab10.colors, groups.items()):
            series = [s for s in (_series(run, key) for run in runs) if s]
            if not series:
                continue
            steps = sorted(set().union(*series))
            per_step = [[s[t] for s in series if t in s] for t in steps]
            ax.plot(steps, [np.mean(v) for v in per_step], color=color, marker=".",
                    label=f"{label} ({len(series)} seeds)")
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step],
                            color=color, alpha=0.2, linewidth=0)
            for run in runs:
                step = sudden_step(run.sudden, key)
                if step is not None:
                    ax.axvline(step, color=color, linestyle=":", alpha=0.8)
            drawn = True
        ax.set_title(setting)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel(f"{metric} ({'lower' if lower_is_better else 'higher'} is better)")
    axes[0][cols - 1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{metric} vs step: mean over seeds, band = seed range, "
                 "dotted = sudden convergence", fontsize=9)
    return _save(fig, path) if drawn else _discard(fig)


def setting_bars(cells: dict[str, dict[str, Any]], metric: str, path: Path,
                 lower_is_better: bool = False) -> Optional[Path]:
    """Grouped bars: x = prompt setting, one bar per ablation (mean, 95% CI), dots = seeds.

    cells: label -> setting -> object with .estimate (cnexp.analysis.stats.Estimate) and .values."""
    labels = list(cells)
    settings = list(dict.fromkeys(s for per_label in cells.values() for s in per_label))
    if not labels or not settings:
        return None
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(settings) * max(1, len(labels) / 3)), 3.6))
    x = np.arange(len(settings))
    for i, (color, label) in enumerate(zip(plt.cm.tab10.colors, labels)):
        cell = [cells[label].get(s) for s in settings]
        means = [c.estimate.mean if c else np.nan for c in cell]
        errors = [c.estimate.half_width if c and math.isfinite(c.estimate.half_width) else 0
                  for c in cell]
        offset = x - 0.4 + width * (i + 0.5)
        ax.bar(offset, means, width, yerr=errors, capsize=3, color=color, alpha=0.8, label=label)
        for xi, c in zip(offset, cell):
            if c:
                ax.plot([xi] * len(c.values), list(c.values.values()), "k.", markersize=3)
    ax.set_xticks(x, settings)
    ax.set_xlabel("prompt setting at inference")
    ax.set_ylabel(f"{metric} ({'lower' if lower_is_better else 'higher'} is better)")
    ax.set_title(f"final {metric}: mean, 95% CI over seeds, dots = seeds", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def sample_grids(groups: dict[str, list[RunRecord]], path: Path,
                 settings_order: tuple[str, ...] = ()) -> Optional[Path]:
    """Rows = ablations, columns = prompt settings: each cell the last sample grid of the
    ablation's first seed (condition | sample | real per row) - the paper's Fig. 8, in small."""
    firsts = {label: next((r for r in runs if r.samples), None) for label, runs in groups.items()}
    firsts = {label: run for label, run in firsts.items() if run is not None}
    if not firsts:
        return None
    found = {s for run in firsts.values() for s in run.samples}
    settings = [s for s in settings_order if s in found] + sorted(found - set(settings_order))
    images = {(label, s): plt.imread(run.samples[s]) for label, run in firsts.items()
              for s in settings if s in run.samples}
    height, width = next(iter(images.values())).shape[:2]
    scale = 2.2 / width  # inches per pixel: each grid about 2.2 inches wide
    fig, axes = plt.subplots(len(firsts), len(settings), squeeze=False,
                             figsize=(width * scale * len(settings) + 1.2,
                                      height * scale * len(firsts) + 0.6))
    for row, (label, run) in enumerate(firsts.items()):
        for col, setting in enumerate(settings):
            ax = axes[row][col]
            ax.set_xticks([]), ax.set_yticks([])
            if (label, setting) in images:
                ax.imshow(images[(label, setting)])
            if row == 0:
                ax.set_title(setting, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{label}\n(seed {run.seed})", fontsize=8)
    fig.suptitle("last evaluation: condition | sample | real", fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _discard(fig) -> None:
    plt.close(fig)


VERDICT_COLOURS = {"reproduced": "tab:green", "opposite": "tab:red", "not shown": "tab:gray"}


def claims_forest(results: list, path: Path) -> Optional[Path]:
    """One row per claim (cnexp/analysis/claims.py ClaimResult): the paired difference and its
    interval on the claim's own scale, the zero line, and the detectable effect on the paper's
    side (dashed); coloured by the Holm verdict (green reproduced, red opposite, grey not
    shown), the raw one named in the title where it differs."""
    rows = [r for r in results if r.diff.n >= 2]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 1, figsize=(7.5, 0.95 * len(rows) + 0.6), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        verdict = r.holm_verdict or r.verdict
        colour = VERDICT_COLOURS.get(verdict, "black")
        ax.errorbar([r.diff.mean], [0], xerr=[[r.diff.mean - r.diff.low],
                                             [r.diff.high - r.diff.mean]],
                    fmt="o", color=colour, capsize=4)
        ax.axvline(0, color="black", linewidth=0.8)
        side = 1 if r.claim.expect == "higher" else -1
        if math.isfinite(r.detectable):
            ax.axvline(side * r.detectable, color=colour, linestyle="--", linewidth=0.8)
        span = max(abs(r.diff.low), abs(r.diff.high), r.detectable if
                   math.isfinite(r.detectable) else 0, 1e-9) * 1.3
        ax.set_xlim(-span, span)
        ax.set_yticks([])
        step = f" @ {r.claim.step}" if r.claim.step is not None else ""
        said = verdict if verdict == r.verdict else f"raw {r.verdict}, Holm {verdict}"
        ax.set_title(f"{_short(r.claim.claim, 64)} — {r.claim.metric}{step} ({said})",
                     fontsize=8, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Paired Δ ± CI per claim (dashed: detectable effect on the paper's side)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(text: str, most: int) -> str:
    return text if len(text) <= most else text[:most - 1] + "…"


def in_detectable_units(r) -> tuple[float, float, float]:
    """A claim's Δ, and its interval's ends (low, high), divided by its detectable effect and
    signed so that the paper's direction is positive: 1 is the smallest effect the design finds
    on the paper's side, and the interval excludes 0 exactly when the raw one does."""
    side = (1 if r.claim.expect == "higher" else -1) / r.detectable
    low, high = sorted((r.diff.low * side, r.diff.high * side))
    return r.diff.mean * side, low, high


def claims_overview(results: list, path: Path) -> Optional[Path]:
    """Every claim on one axis: Δ and its interval divided by the claim's detectable effect and
    turned to the paper's side (right: the paper's direction). Each row keeps its verdict (the
    interval excludes 0 or not), 1 marks the smallest effect the design finds, and claims on
    different metrics read together: how far each effect lies from what its design can see."""
    rows = [r for r in results if r.diff.n >= 2 and math.isfinite(r.detectable)
            and r.detectable > 0]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.2))
    for y, r in enumerate(reversed(rows)):
        mean, low, high = in_detectable_units(r)
        verdict = r.holm_verdict or r.verdict
        colour = VERDICT_COLOURS.get(verdict, "black")
        raw = VERDICT_COLOURS.get(r.verdict, "black")  # a hollow dot: the raw verdict's colour
        ax.plot([low, high], [y, y], color=colour, linewidth=1.5)
        ax.plot([mean], [y], "o", markersize=5, color=raw,
                markerfacecolor=colour if verdict == r.verdict else "white")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.axvline(1, color="black", linewidth=0.6, linestyle="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_short(r.claim.claim, 70) for r in reversed(rows)], fontsize=7)
    ax.set_xlabel("Δ / detectable effect, paper's direction to the right (dashed: detectable)",
                  fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("Each claim's paired Δ ± CI in units of its detectable effect. Green "
                 "reproduced, red opposite, grey not shown\n(Holm over the table; a hollow "
                 "dot in green or red: the raw verdict, which Holm does not keep)", fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long claim labels: grow, do not clip
    plt.close(fig)
    return path
