"""Sudden convergence: the step at which control fidelity abruptly rises (paper section 3.4).

A pure function of the fidelity curve logged on a fixed schedule, so it can be tested on a
synthetic curve and recomputed from any run's metrics.json history.
"""
from __future__ import annotations

from typing import Optional, Sequence


def sudden_convergence(steps: Sequence[int], values: Sequence[float], threshold: float,
                       higher_is_better: bool = True) -> dict[str, Optional[float]]:
    """Read a fidelity curve (steps ascending; one value per step).

    Returns
      step: the first evaluated step whose value crosses `threshold` (>= for higher-is-better
        metrics, <= otherwise); None if the curve never does;
      steepest_rise_step: the end of the interval with the largest improvement per step, and
      steepest_rise_per_1k_steps: that improvement, per 1000 steps (None with under 2 points);
      threshold, final: for the record.
    """
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values")
    sign = 1.0 if higher_is_better else -1.0
    crossed = next((s for s, v in zip(steps, values) if sign * (v - threshold) >= 0), None)
    best_step, best_rate = None, None
    for (s0, v0), (s1, v1) in zip(zip(steps, values), zip(steps[1:], values[1:])):
        if s1 <= s0:
            raise ValueError(f"steps must increase, got {s0} then {s1}")
        rate = sign * (v1 - v0) / (s1 - s0)
        if best_rate is None or rate > best_rate:
            best_step, best_rate = s1, rate
    return {"step": crossed, "threshold": threshold,
            "steepest_rise_step": best_step,
            "steepest_rise_per_1k_steps": None if best_rate is None else best_rate * 1000,
            "final": values[-1] if len(values) else None}
