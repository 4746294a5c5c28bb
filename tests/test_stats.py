"""Paired comparisons over seeds: the t quantiles, intervals and paired differences."""

from __future__ import annotations

import math

import pytest

from study import stats


def test_t_quantiles_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is the oracle of the t quantiles")
    for df in (1, 2, 5, 9, 19, 30, 31, 45, 100, 1000):
        assert stats.t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=5e-4), (
            df
        )  # the table has three decimals
    with pytest.raises(ValueError):
        stats.t975(0)


def test_mean_interval_known_values():
    iv = stats.mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182 * math.sqrt(5 / 3) / 2  # t(3) * sd / sqrt(n)
    assert (iv.mean, iv.n) == (2.5, 4) and iv.low == pytest.approx(2.5 - half) and iv.high == pytest.approx(2.5 + half)
    assert iv.excludes_zero and iv.show(digits=1) == f"2.5 [{2.5 - half:.1f}, {2.5 + half:.1f}]"
    one = stats.mean_interval([7.0])
    assert one.n == 1 and math.isnan(one.low) and one.show(digits=0) == "7" and not one.excludes_zero


def test_paired_difference_uses_the_shared_seeds_only():
    ce = {0: 90.0, 1: 80.0, 2: 70.0, 3: 60.0}
    cgc = {0: 91.0, 1: 81.0, 2: 71.5, 5: 10.0}
    diff = stats.paired_difference(ce, cgc)
    assert diff.n == 3 and diff.mean == pytest.approx(7 / 6)
    assert diff.excludes_zero  # the seeds' spread (10 points) cancels: every seed gains 1-1.5
    assert stats.paired_difference({0: 1.0}, {1: 2.0}) is None
    assert stats.mean_interval([1.0, -1.0, 0.5, -0.5]).excludes_zero is False
    assert "+1.17 [" in diff.show(digits=2, sign=True)
