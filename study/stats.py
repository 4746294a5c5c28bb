"""Comparing configurations over seeds: means with 95 % t-intervals and paired differences.

Two configurations run on the same seeds share their initialization, data order and crops, so
their difference on one seed cancels what the seed alone decides; the mean of the per-seed
differences and its Student-t interval say whether an effect is larger than the seeds' noise
(an interval that excludes 0). The study (:mod:`study`) reports every measure that way.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

#: two-sided 95 % quantiles of Student's t for 1-30 degrees of freedom
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (beyond 30: the normal
    quantile with two Cornish-Fisher corrections; the table and the formula are within 0.0005)."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its 95 % t-interval (``low``, ``high``; NaN for one value)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def show(self, scale: float = 1.0, digits: int = 3, sign: bool = False) -> str:
        """``mean [low, high]`` (``mean`` alone for one value), each times ``scale``."""
        mean = f"{scale * self.mean:{'+' if sign else ''}.{digits}f}"
        if self.n < 2:
            return mean
        return f"{mean} [{scale * self.low:{'+' if sign else ''}.{digits}f}, {scale * self.high:{'+' if sign else ''}.{digits}f}]"


def mean_interval(values) -> Interval:
    """The mean of ``values`` and its 95 % t-interval."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to average")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def paired_difference(baseline: dict, other: dict) -> Interval | None:
    """``other - baseline`` over the keys (seeds) both have, as a mean with its 95 % t-interval;
    None when they share no seed."""
    seeds = sorted(set(baseline) & set(other))
    if not seeds:
        return None
    return mean_interval(other[s] - baseline[s] for s in seeds)
