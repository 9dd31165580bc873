"""The statistics of the sweep cells against independent computations: textbook formulas over
scipy.stats' distributions, Holm's procedure as a rejection rule, interpolation by hand."""

import math

import numpy as np
import pytest
from scipy import stats as sp

from nanogpt import stats
from nanogpt.cells import to_target

A = [3.281, 3.274, 3.290]
B = [3.262, 3.270, 3.251, 3.266]


def test_a_cell_estimate_is_the_student_t_interval():
    e = stats.estimate(B)
    mean, sem = np.mean(B), np.std(B, ddof=1) / math.sqrt(len(B))
    low, high = sp.t.interval(0.95, len(B) - 1, loc=mean, scale=sem)
    assert (e.n, e.mean, e.std) == (4, pytest.approx(mean, abs=1e-12), pytest.approx(np.std(B, ddof=1), abs=1e-12))
    assert (e.ci_low, e.ci_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert stats.estimate([3.3]) == stats.Estimate(1, 3.3, None, None, None)  # one run: its value, no interval
    assert stats.estimate([]) == stats.Estimate(0, None, None, None, None)


def test_welch_difference_interval_p_value_and_cohens_d_by_hand():
    d = stats.welch(A, B)
    va, vb = np.var(A, ddof=1) / len(A), np.var(B, ddof=1) / len(B)
    df = (va + vb) ** 2 / (va**2 / (len(A) - 1) + vb**2 / (len(B) - 1))  # Welch-Satterthwaite
    diff, se = np.mean(B) - np.mean(A), math.sqrt(va + vb)
    half = sp.t.ppf(0.975, df) * se
    pooled = math.sqrt(((len(A) - 1) * np.var(A, ddof=1) + (len(B) - 1) * np.var(B, ddof=1)) / (len(A) + len(B) - 2))
    assert d.diff == pytest.approx(diff, abs=1e-12)
    assert (d.ci_low, d.ci_high) == (pytest.approx(diff - half, abs=1e-9), pytest.approx(diff + half, abs=1e-9))
    assert d.p_value == pytest.approx(2 * sp.t.sf(abs(diff / se), df), abs=1e-9)
    assert d.effect_size == pytest.approx(diff / pooled, abs=1e-9)
    assert stats.welch(A, [3.2]) is None  # no variance in a run of one


def test_holm_adjusts_as_the_step_down_rule_rejects():
    p = [0.01, 0.04, None, 0.03, 0.005, 0.2]
    adjusted = stats.holm(p)
    assert adjusted[2] is None
    tested = sorted(x for x in p if x is not None)
    m = len(tested)
    for alpha in np.linspace(0.001, 0.5, 500):
        # Holm: reject the k-th smallest while every p up to it is <= alpha / (m - j + 1)
        rejected, ok = set(), True
        for j, x in enumerate(tested):
            ok = ok and x <= alpha / (m - j)
            if ok:
                rejected.add(x)
        assert {x for x, q in zip(p, adjusted) if q is not None and q <= alpha} == rejected, alpha
    assert all(q >= x for x, q in zip(p, adjusted) if x is not None)


def test_below_target_is_the_one_sided_t_test():
    t = (np.mean(B) - 3.28) / (np.std(B, ddof=1) / math.sqrt(len(B)))
    assert stats.below_target(B, 3.28) == pytest.approx(sp.t.cdf(t, len(B) - 1), abs=1e-12)
    assert stats.below_target([3.2], 3.28) is None


def test_two_cells_one_noise_floor_apart_are_at_p_0_05():
    """What the noise floor means: two cells of n runs and standard deviation s each whose means
    differ by it give Welch's p = 0.05 exactly."""
    z = np.array([-1.0, 0.0, 1.0])  # mean 0, standard deviation 1
    s, n = 0.004, 3
    floor = stats.noise_floor(n, s)
    assert floor == pytest.approx(sp.t.ppf(0.975, 2 * n - 2) * s * math.sqrt(2 / n), abs=1e-15)
    a = 3.28 + s * z
    assert sp.ttest_ind(a + floor, a, equal_var=False).pvalue == pytest.approx(0.05, abs=1e-9)
    assert stats.noise_floor(1, None) is None


EVALS = [  # iter, val loss, tokens, training seconds
    {"iter": 0, "val_loss": 4.0, "tokens": 0, "train_time_s": 0.0},
    {"iter": 50, "val_loss": 3.0, "tokens": 3200, "train_time_s": 5.0},
    {"iter": 100, "val_loss": 2.6, "tokens": 6400, "train_time_s": 11.0},
    {"iter": 150, "val_loss": 2.7, "tokens": 9600, "train_time_s": 16.0},
    {"iter": 200, "val_loss": 2.2, "tokens": 12800, "train_time_s": 22.0},
]


def test_time_to_target_interpolates_between_the_evaluations_around_the_first_crossing():
    # 2.8 is half way from 3.0 (iter 50) to 2.6 (iter 100)
    assert to_target(EVALS, 2.8) == approx({"iters_to_target": 75, "tokens_to_target": 4800, "time_to_target_s": 8})
    # 2.65 is first reached 0.35/0.4 of the way from iter 50 to 100, not later between 150 and 200
    assert to_target(EVALS, 2.65) == approx({"iters_to_target": 50 + 50 * 0.35 / 0.4, "tokens_to_target": 3200 + 3200 * 0.35 / 0.4,
                                             "time_to_target_s": 5 + 6 * 0.35 / 0.4})
    assert to_target(EVALS, 2.6) == approx({"iters_to_target": 100, "tokens_to_target": 6400, "time_to_target_s": 11})  # met at an eval
    assert to_target(EVALS, 4.5) == {"iters_to_target": 0.0, "tokens_to_target": 0.0, "time_to_target_s": 0.0}
    assert to_target(EVALS, 2.0) == {"iters_to_target": None, "tokens_to_target": None, "time_to_target_s": None}
    later = EVALS[1:]  # the first evaluation already at or below the target: its own point
    assert to_target(later, 3.5) == {"iters_to_target": 50.0, "tokens_to_target": 3200.0, "time_to_target_s": 5.0}


def approx(expected: dict) -> dict:
    return pytest.approx(expected, abs=1e-9)
