"""Threshold fitting against analytic operating points; interval coverage by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from iqe.calibration.operating_point import (
    _fit_logistic,
    apply_normalisation,
    auc,
    expected_calibration_error,
    fit_labelled,
    fit_normalisation,
    fit_normals_only,
    threshold_for_sensitivity,
    threshold_for_specificity,
    threshold_youden,
)
from iqe.errors import InputError

SHIFT = 2.0  # normal ~ N(0, 1), abnormal ~ N(SHIFT, 1) throughout


def _draw(rng: np.random.Generator, n0: int, n1: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.r_[rng.normal(0, 1, n0), rng.normal(SHIFT, 1, n1)]
    return scores, np.r_[np.zeros(n0, int), np.ones(n1, int)]


@pytest.mark.parametrize(
    ("rule", "target", "threshold", "sens", "spec"),
    [
        # sensitivity 0.9: t = SHIFT - z_0.9; specificity = Phi(t)
        ("sensitivity", 0.9, SHIFT - stats.norm.ppf(0.9), 0.9, stats.norm.cdf(SHIFT - stats.norm.ppf(0.9))),
        # specificity 0.95: t = z_0.95; sensitivity = 1 - Phi(t - SHIFT)
        ("specificity", 0.95, stats.norm.ppf(0.95), stats.norm.sf(stats.norm.ppf(0.95) - SHIFT), 0.95),
        # equal variances: Youden's J peaks half-way between the means
        ("youden", None, SHIFT / 2, stats.norm.sf(-SHIFT / 2), stats.norm.cdf(SHIFT / 2)),
    ],
)
def test_threshold_recovers_known_operating_point(rule, target, threshold, sens, spec):
    scores, labels = _draw(np.random.default_rng(1), 20000, 20000)
    fit = fit_labelled(scores, labels, rule, target, resamples=20)  # the intervals are not under test here
    # sample-quantile standard error at n=20000 is ~0.012; Youden's optimum is flat, hence its looser bound
    assert fit["threshold"] == pytest.approx(threshold, abs=0.05 if rule != "youden" else 0.15)
    assert fit["metrics"]["sensitivity"]["value"] == pytest.approx(sens, abs=0.015)
    assert fit["metrics"]["specificity"]["value"] == pytest.approx(spec, abs=0.015)
    assert fit["metrics"]["auc"]["value"] == pytest.approx(stats.norm.cdf(SHIFT / np.sqrt(2)), abs=0.01)


def test_thresholds_are_extreme_on_small_samples():
    """Brute force over all candidate thresholds: the fit is the largest (sensitivity) / smallest
    (specificity) threshold meeting the target on the sample itself."""
    rng = np.random.default_rng(5)
    for _ in range(50):
        normal, abnormal = rng.normal(0, 1, 17), rng.normal(1, 1, 13)
        cands = np.unique(np.r_[normal, abnormal, np.nextafter(normal, np.inf)])
        for s in (0.5, 0.8, 0.9, 0.99):
            ok = [c for c in cands if np.mean(abnormal >= c) >= s]
            assert threshold_for_sensitivity(abnormal, s) == max(ok)
            ok = [c for c in cands if np.mean(normal < c) >= s]
            assert threshold_for_specificity(normal, s) == min(ok)
        j = [np.mean(abnormal >= c) + np.mean(normal < c) for c in cands]
        t = threshold_youden(normal, abnormal)
        assert np.mean(abnormal >= t) + np.mean(normal < t) == pytest.approx(max(j))


def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(2)
    normal, abnormal = rng.integers(0, 5, 30).astype(float), rng.integers(1, 6, 20).astype(float)
    pairs = (abnormal[:, None] > normal[None]).mean() + 0.5 * (abnormal[:, None] == normal[None]).mean()
    assert auc(normal, abnormal) == pytest.approx(pairs)


def test_ppv_npv_follow_bayes_at_stated_prevalence():
    scores, labels = _draw(np.random.default_rng(3), 200, 200)
    fit = fit_labelled(scores, labels, "sensitivity", 0.8, prevalence=0.1, resamples=200)
    se, sp = fit["metrics"]["sensitivity"]["value"], fit["metrics"]["specificity"]["value"]
    assert fit["metrics"]["ppv"]["value"] == pytest.approx(0.1 * se / (0.1 * se + 0.9 * (1 - sp)))
    assert fit["metrics"]["npv"]["value"] == pytest.approx(0.9 * sp / (0.9 * sp + 0.1 * (1 - se)))


def test_labelled_intervals_cover_a_held_out_half():
    """The issue's acceptance check, simulated: fit on one half, observe on the other half;
    ci95 is meant to hold the other half's rates, ci95_population the true rates."""
    rng = np.random.default_rng(11)
    runs, n = 80, 60
    hits = {"sensitivity": 0, "specificity": 0}
    pop_hits = {"sensitivity": 0, "specificity": 0}
    for r in range(runs):
        s1, y1 = _draw(rng, n, n)
        s2, y2 = _draw(rng, n, n)
        fit = fit_labelled(s1, y1, "sensitivity", 0.9, resamples=400, seed=r)
        t = fit["threshold"]
        observed = {"sensitivity": np.mean(s2[y2 == 1] >= t), "specificity": np.mean(s2[y2 == 0] < t)}
        truth = {"sensitivity": stats.norm.sf(t - SHIFT), "specificity": stats.norm.cdf(t)}
        for k in hits:
            lo, hi = fit["metrics"][k]["ci95"]
            hits[k] += lo <= observed[k] <= hi
            lo, hi = fit["metrics"][k]["ci95_population"]
            pop_hits[k] += lo <= truth[k] <= hi
    # nominal 95 %; with 80 runs the binomial spread is ~2.4 %, so 85 % is a >4-sigma miss
    for k in hits:
        assert hits[k] / runs >= 0.85, (k, hits[k])
        assert pop_hits[k] / runs >= 0.85, (k, pop_hits[k])


def test_order_statistic_ci_coverage_by_simulation():
    """FPR of the k-th order statistic is Beta(n-k+1, k) for any continuous distribution:
    the population interval covers the true FPR ~95 % of the time, the new-set interval
    covers the FPR observed on n fresh normals >= 95 % (discrete)."""
    rng = np.random.default_rng(7)
    runs, n, fpr = 2000, 59, 0.05
    pop = new = 0
    true_fprs = []
    for _ in range(runs):
        normal = rng.exponential(1.0, n)  # true FPR of threshold t: exp(-t)
        fit = fit_normals_only(normal, fpr)
        true = np.exp(-fit["threshold"])
        true_fprs.append(true)
        lo, hi = fit["metrics"]["fpr"]["ci95_population"]
        pop += lo <= true <= hi
        fresh = np.mean(rng.exponential(1.0, n) >= fit["threshold"])
        lo, hi = fit["metrics"]["fpr"]["ci95"]
        new += lo <= fresh <= hi
    assert abs(pop / runs - 0.95) < 0.015  # binomial sd at 2000 runs: 0.005
    assert new / runs >= 0.94
    # expected FPR = (n - k + 1)/(n + 1) with k = ceil((n + 1)(1 - fpr)) = 57 -> 3/60
    assert np.mean(true_fprs) == pytest.approx(3 / 60, abs=0.004)


def test_logistic_normalisation_recovers_the_true_posterior():
    # equal-variance normals, equal priors: log-odds(s) = SHIFT * s - SHIFT**2 / 2
    scores, labels = _draw(np.random.default_rng(4), 20000, 20000)
    norm = _fit_logistic(scores, labels)
    assert norm["slope"] == pytest.approx(SHIFT, abs=0.1)
    assert norm["intercept"] == pytest.approx(-SHIFT**2 / 2, abs=0.1)


def test_normalisation_is_monotone_and_calibrated_on_fresh_data():
    rng = np.random.default_rng(6)
    # a posterior that is a step (not logistic): isotonic should win
    s = rng.uniform(0, 1, 4000)
    y = (rng.uniform(0, 1, 4000) < np.where(s > 0.6, 0.9, 0.1)).astype(int)
    norm = fit_normalisation(s, y)
    assert norm["method"] == "isotonic" and norm["cv_ece"]["isotonic"] < norm["cv_ece"]["logistic"]
    grid = np.linspace(-0.5, 1.5, 500)
    assert np.all(np.diff(apply_normalisation(norm, grid)) >= 0)
    s2 = rng.uniform(0, 1, 4000)
    y2 = (rng.uniform(0, 1, 4000) < np.where(s2 > 0.6, 0.9, 0.1)).astype(int)
    assert expected_calibration_error(apply_normalisation(norm, s2), y2) < 0.04


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        (np.r_[np.arange(20.0), np.nan], np.r_[np.zeros(10), np.ones(11)],
         r"^data: 1 score\(s\) are NaN or infinite \(first: item 20\); a calibration needs a finite score for every case$"),
        (np.arange(20.0), np.zeros(20),
         r"^data: no abnormal cases \(only normal\); a labelled calibration needs at least 10 of each class "
         r"\(for normal cases only use --normals-only --fpr RATE\)$"),
        (np.arange(20.0), np.ones(20), r"^data: no normal cases \(only abnormal\); a labelled calibration needs at least 10"),
        (np.arange(16.0), np.r_[np.zeros(10), np.ones(6)],
         r"^data: 6 abnormal case\(s\); a bootstrap 95% CI needs at least 10 per class \(add 4 more\)$"),
        (np.arange(20.0), np.r_[np.zeros(10), 2 * np.ones(10)], r"^data: label 2 is not 0 \(normal\) or 1 \(abnormal\)$"),
    ],
)
def test_bad_labelled_input_fails_clearly(scores, labels, message):
    with pytest.raises(InputError, match=message):
        fit_labelled(scores, labels.astype(int), "youden", source="data")


def test_normals_only_refuses_too_few_and_nan():
    with pytest.raises(InputError, match=r"^data: 18 normal case\(s\); a threshold at FPR 0.05 with an order-statistics "
                                         r"CI needs at least 19 \(add 1 more\)$"):
        fit_normals_only(np.arange(18.0), 0.05, source="data")
    fit_normals_only(np.arange(19.0), 0.05)  # 19 is enough: k = ceil(20 * 0.95) = 19 <= n
    with pytest.raises(InputError, match=r"NaN or infinite"):
        fit_normals_only(np.r_[np.arange(30.0), np.inf], 0.05)
