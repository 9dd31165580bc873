"""The statistics of a sweep's comparisons: numbers in, numbers out, distributions from scipy.stats.

- a cell's mean with a 95% Student's t interval, mean +- t(0.975, n-1) s / sqrt(n);
- one cell against another: the difference of the means with Welch's interval and two-sided
  test (unequal variances, Welch-Satterthwaite degrees of freedom) and Cohen's d (pooled s);
- Holm's step-down adjustment of the p-values of many cells against one baseline;
- the one-sided test that a mean is below a target (modded-nanogpt's record rule, p < 0.01);
- the noise floor: the smallest difference Welch's test calls significant at p < 0.05 between two
  cells of n runs and standard deviation s each, t(0.975, 2n-2) s sqrt(2/n);
- where a curve first reaches a target, interpolated linearly between two evaluations.

A statistic that needs more runs than there are (an interval of one run) is None, never NaN.
scipy is imported where it is used: every train.py imports the sweep summary, and scipy.stats
takes about a second to import.
"""

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A sample's mean with its interval (None for fewer than 2 values)."""

    n: int
    mean: float | None
    std: float | None  # the sample standard deviation (n - 1 in the denominator)
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True)
class Difference:
    """b's mean minus a's, with Welch's interval and p-value and Cohen's d."""

    diff: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    effect_size: float | None


def estimate(values: Sequence[float]) -> Estimate:
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n < 2:
        return Estimate(n, float(x[0]) if n else None, None, None, None)
    from scipy import stats

    mean, std = float(x.mean()), float(x.std(ddof=1))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    return Estimate(n, mean, std, mean - half, mean + half)


def welch(a: Sequence[float], b: Sequence[float]) -> Difference | None:
    """b against a; None unless each has 2 values or more (a variance)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    with _quiet():
        test = stats.ttest_ind(b, a, equal_var=False)
    ci = test.confidence_interval(CONFIDENCE)
    diff = float(b.mean() - a.mean())
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return Difference(diff, _number(ci.low), _number(ci.high), _number(test.pvalue),
                      diff / pooled if pooled > 0 else None)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's adjusted p-values, in the order given: the k-th smallest of m is multiplied by
    m - k + 1, then made non-decreasing; a None is no test and is not counted in m."""
    tested = [i for i, p in enumerate(p_values) if p is not None]
    p = np.array([p_values[i] for i in tested], dtype=float)
    order = np.argsort(p)
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    out: list[float | None] = [None] * len(p_values)
    for i, q in zip(tested, adjusted):
        out[i] = float(q)
    return out


def below_target(values: Sequence[float], target: float) -> float | None:
    """One-sided p-value of 'the mean is below target' (Student's t); None under 2 values."""
    if len(values) < 2:
        return None
    from scipy import stats

    with _quiet():
        return _number(stats.ttest_1samp(values, target, alternative="less").pvalue)


def noise_floor(n: int, std: float | None) -> float | None:
    """The smallest difference between two cells of n runs and standard deviation std each that
    Welch's test calls significant at p < 0.05 (two-sided). With equal n and s its degrees of
    freedom are 2n - 2 and its standard error s sqrt(2/n)."""
    if n < 2 or std is None:
        return None
    from scipy import stats

    return float(stats.t.ppf(0.975, 2 * n - 2) * std * math.sqrt(2 / n))


def crossing(ys: Sequence[float], target: float) -> float | None:
    """Where the curve ys first reaches target (at or below), as a fractional index: 2.25 is a
    quarter of the way from point 2 to point 3; 0 when the first point is already there; None
    when no point is. Read any x at it with np.interp(index, range(len(xs)), xs)."""
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return 0.0
            before = ys[i - 1]  # above the target, or the crossing would have been found there
            return i - 1 + (before - target) / (before - y)
    return None


@contextmanager
def _quiet() -> Iterator[None]:
    """scipy warns of precision loss when a sample has no variance (runs that agree to the last
    digit); its result is then infinite or NaN (None here), which docs/sweep.md explains."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _number(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x
