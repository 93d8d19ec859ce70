"""Small-sample statistics for seeds: a mean with its t-interval, and paired differences.

With 3-5 seeds per ablation a normal interval would be far too narrow; Student's t with n - 1
degrees of freedom is the honest one. Pairing by seed removes what two runs with the same seed
share (data order, evaluation noise), so a paired difference is tighter than two separate means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """A mean over n values with a two-sided t confidence interval [low, high]."""
    n: int
    mean: float
    sd: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly above or below 0 (False when it is undefined)."""
        return self.low > 0 or self.high < 0


def mean_ci(values: Iterable[float], level: float = 0.95) -> Estimate:
    """Mean and t-interval of the finite values; the interval is NaN below 2 values."""
    x = np.asarray([v for v in values if finite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Estimate(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * sd / math.sqrt(n)
    return Estimate(n, mean, sd, mean - half, mean + half)


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float],
                      level: float = 0.95) -> Estimate:
    """values - baseline over the seeds both have (finite), with the t-interval of the mean."""
    seeds = sorted(s for s in values.keys() & baseline.keys()
                   if finite(values[s]) and finite(baseline[s]))
    return mean_ci([values[s] - baseline[s] for s in seeds], level)


def finite(value) -> bool:
    """A number a statistic can use: not None (a NaN or Inf as the record stores it), not NaN/Inf."""
    return value is not None and math.isfinite(value)
