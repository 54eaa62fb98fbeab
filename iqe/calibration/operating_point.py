"""Operating points from scores: thresholds, their uncertainty, and a calibrated probability.

Pure NumPy/SciPy on arrays of scores (higher = more abnormal; a case is called abnormal
when ``score >= threshold``). Two fitting modes:

- labelled (`fit_labelled`): the threshold meeting a target sensitivity, a target
  specificity, or maximising Youden's J; stratified bootstrap intervals for sensitivity,
  specificity, PPV/NPV at a stated prevalence and AUC. Every replicate refits the
  threshold on a resample, so the intervals include the threshold's own uncertainty.
  Two intervals per quantity: ``ci95_population`` for the underlying rate of the fitted
  rule, and ``ci95`` for the rate observed on an independent set of the calibration
  set's size (replicate: fit on one resample, count on another) -- the range a site's
  audit on a fresh batch should fall in, hence the one reported first.
- normals only (`fit_normals_only`): the threshold is the k-th order statistic of n
  normal scores with k = ceil((n + 1)(1 - fpr)). Whatever the score distribution, the
  false-positive rate of that threshold is Beta(n - k + 1, k) distributed, which gives
  an exact interval for the population FPR, and its beta-binomial mixture gives the
  interval for the FPR observed on n new normals.

Score normalisation (`fit_normalisation`): isotonic regression or a logistic curve on the
raw score, whichever has the lower 5-fold cross-validated expected calibration error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import optimize, stats

from iqe.errors import InputError

MIN_PER_CLASS = 10  # fewer cases per class give too few distinct bootstrap replicates for a CI
DEFAULT_RESAMPLES = 2000
ECE_BINS = 10
CV_FOLDS = 5


# -- checks -------------------------------------------------------------------------------
def check_scores(scores: np.ndarray, labels: np.ndarray | None, source: str, paths: list[str] | None = None) -> None:
    """Raise InputError for non-finite scores or labels other than 0/1 (naming the first offender)."""
    scores = np.asarray(scores, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        where = paths[bad[0]] if paths else f"item {bad[0]}"
        raise InputError(f"{source}: {bad.size} score(s) are NaN or infinite (first: {where}); "
                         "a calibration needs a finite score for every case")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != scores.shape:
            raise InputError(f"{source}: {labels.size} labels for {scores.size} scores")
        odd = np.flatnonzero((labels != 0) & (labels != 1))
        if odd.size:
            raise InputError(f"{source}: label {labels[odd[0]].item()!r} is not 0 (normal) or 1 (abnormal)")


def check_class_sizes(n_normal: int, n_abnormal: int, source: str, minimum: int = MIN_PER_CLASS) -> None:
    """Refuse an empty or too small class, saying how many are needed."""
    for name, n in (("normal", n_normal), ("abnormal", n_abnormal)):
        if n == 0:
            other = "abnormal" if name == "normal" else "normal"
            hint = " (for normal cases only use --normals-only --fpr RATE)" if name == "abnormal" else ""
            raise InputError(f"{source}: no {name} cases (only {other}); a labelled calibration needs at least "
                             f"{minimum} of each class{hint}")
        if n < minimum:
            raise InputError(f"{source}: {n} {name} case(s); a bootstrap 95% CI needs at least {minimum} per class "
                             f"(add {minimum - n} more)")


# -- thresholds ---------------------------------------------------------------------------
def threshold_for_sensitivity(abnormal: np.ndarray, target: float) -> float:
    """The largest threshold with sensitivity >= target on these scores."""
    s = np.sort(abnormal)
    k = int(math.floor(len(s) * (1.0 - target) + 1e-9))  # cases allowed below the threshold
    return float(s[min(k, len(s) - 1)])


def threshold_for_specificity(normal: np.ndarray, target: float) -> float:
    """The smallest threshold with specificity >= target (normals strictly below it)."""
    s = np.sort(normal)
    m = int(math.ceil(len(s) * target - 1e-9))  # normals that must fall below the threshold
    if m <= 0:
        return float(s[0])
    return float(np.nextafter(s[m - 1], np.inf))


def threshold_youden(normal: np.ndarray, abnormal: np.ndarray) -> float:
    """The threshold (one of the scores) maximising sensitivity + specificity - 1."""
    cands = np.unique(np.concatenate([normal, abnormal]))
    sens = 1.0 - np.searchsorted(np.sort(abnormal), cands, side="left") / len(abnormal)
    spec = np.searchsorted(np.sort(normal), cands, side="left") / len(normal)
    return float(cands[int(np.argmax(sens + spec))])


def make_rule(rule: str, target: float | None) -> Callable[[np.ndarray, np.ndarray], float]:
    """rule in {'sensitivity', 'specificity', 'youden'} -> fit(normal, abnormal) -> threshold."""
    if rule == "sensitivity":
        return lambda normal, abnormal: threshold_for_sensitivity(abnormal, float(target))
    if rule == "specificity":
        return lambda normal, abnormal: threshold_for_specificity(normal, float(target))
    if rule == "youden":
        return threshold_youden
    raise ValueError(f"unknown rule {rule!r}")  # a bug: the CLI validates the choice


def rates(normal: np.ndarray, abnormal: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of `score >= threshold`."""
    return float(np.mean(abnormal >= threshold)), float(np.mean(normal < threshold))


def predictive_values(sens: np.ndarray, spec: np.ndarray, prevalence: float) -> tuple[np.ndarray, np.ndarray]:
    """PPV and NPV at `prevalence` (Bayes' rule; NaN where undefined)."""
    sens, spec = np.asarray(sens, np.float64), np.asarray(spec, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ppv = sens * prevalence / (sens * prevalence + (1 - spec) * (1 - prevalence))
        npv = spec * (1 - prevalence) / (spec * (1 - prevalence) + (1 - sens) * prevalence)
    return ppv, npv


def auc(normal: np.ndarray, abnormal: np.ndarray) -> float:
    """ROC AUC = P(abnormal > normal) + P(tie) / 2 (Mann-Whitney)."""
    ranks = stats.rankdata(np.concatenate([abnormal, normal]))
    n1, n0 = len(abnormal), len(normal)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def roc_curve(normal: np.ndarray, abnormal: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for `score >= t` at every distinct score, from (0,0)-ish to (1,1)."""
    t = np.unique(np.concatenate([normal, abnormal]))[::-1]
    tpr = 1.0 - np.searchsorted(np.sort(abnormal), t, side="left") / len(abnormal)
    fpr = 1.0 - np.searchsorted(np.sort(normal), t, side="left") / len(normal)
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, t]


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def fit_labelled(scores: np.ndarray, labels: np.ndarray, rule: str, target: float | None = None,
                 prevalence: float | None = None, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 source: str = "scores") -> dict:
    """Fit a threshold on labelled scores with bootstrap intervals.

    Args:
        scores: one score per case (higher = more abnormal).
        labels: 0 normal, 1 abnormal.
        rule: 'sensitivity' | 'specificity' | 'youden'.
        target: the wanted sensitivity/specificity in (0, 1) (ignored for youden).
        prevalence: for PPV/NPV; default the calibration set's own abnormal fraction.
        resamples: bootstrap replicates (stratified: class sizes kept).
        seed: bootstrap RNG seed.
        source: names the data in error messages.

    Returns:
        dict with ``threshold``, ``metrics`` (each ``value``, ``ci95``, ``ci95_population``),
        ``counts`` and ``bootstrap``.

    Raises:
        InputError: NaN scores, bad labels, an empty or too small class, bad target.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    check_scores(scores, labels, source)
    normal, abnormal = scores[labels == 0], scores[labels == 1]
    check_class_sizes(len(normal), len(abnormal), source)
    if rule != "youden" and not (target is not None and 0.0 < target < 1.0):
        raise InputError(f"target {rule} {target!r}: must be between 0 and 1 (exclusive), e.g. 0.9")
    prev = len(abnormal) / len(scores) if prevalence is None else float(prevalence)
    if not 0.0 < prev < 1.0:
        raise InputError(f"prevalence {prevalence!r}: must be between 0 and 1 (exclusive), e.g. 0.1")
    fit = make_rule(rule, target)
    threshold = fit(normal, abnormal)
    sens, spec = rates(normal, abnormal, threshold)
    ppv, npv = predictive_values(sens, spec, prev)
    point = {"sensitivity": sens, "specificity": spec, "ppv": float(ppv), "npv": float(npv),
             "auc": auc(normal, abnormal)}

    rng = np.random.default_rng(seed)
    names = ("sensitivity", "specificity", "ppv", "npv", "auc")
    pop = {k: np.empty(resamples) for k in names}
    new = {k: np.empty(resamples) for k in names}
    n0, n1 = len(normal), len(abnormal)
    for r in range(resamples):
        a0, a1 = normal[rng.integers(0, n0, n0)], abnormal[rng.integers(0, n1, n1)]
        b0, b1 = normal[rng.integers(0, n0, n0)], abnormal[rng.integers(0, n1, n1)]
        t = fit(a0, a1)
        pop["sensitivity"][r], pop["specificity"][r] = rates(normal, abnormal, t)
        new["sensitivity"][r], new["specificity"][r] = rates(b0, b1, t)
        auc_a, auc_b = auc(a0, a1), auc(b0, b1)
        pop["auc"][r] = auc_a
        # observed on a new set = truth + its own error; truth = estimate - our error
        new["auc"][r] = point["auc"] + auc_b - auc_a
    for d in (pop, new):
        d["ppv"], d["npv"] = predictive_values(d["sensitivity"], d["specificity"], prev)
    metrics = {k: {"value": point[k], "ci95": _interval(new[k]), "ci95_population": _interval(pop[k])} for k in names}
    metrics["auc"]["ci95_population"] = _interval(pop["auc"])
    return {
        "threshold": threshold,
        "rule": rule,
        "requested": None if rule == "youden" else float(target),
        "prevalence": prev,
        "prevalence_source": "calibration set" if prevalence is None else "stated",
        "metrics": metrics,
        "counts": {"normal": n0, "abnormal": n1},
        "bootstrap": {"resamples": resamples, "seed": seed, "stratified": True, "threshold_refit": True},
    }


# -- normals only -------------------------------------------------------------------------
def normals_needed(fpr: float) -> int:
    """Smallest n for which an upper order statistic meets `fpr` in expectation: (n+1)(1-fpr) <= n."""
    return int(math.ceil((1.0 - fpr) / fpr - 1e-9))


def order_statistic_index(n: int, fpr: float) -> int:
    """1-based k with E[FPR of X_(k)] = (n - k + 1)/(n + 1) <= fpr, the smallest such k."""
    return int(math.ceil((n + 1) * (1.0 - fpr) - 1e-9))


def fit_normals_only(normal: np.ndarray, fpr: float, source: str = "scores") -> dict:
    """Threshold from normal scores alone, with exact order-statistics intervals on the FPR.

    Raises:
        InputError: NaN scores, `fpr` outside (0, 1), or fewer normals than `normals_needed(fpr)`.
    """
    normal = np.asarray(normal, np.float64)
    check_scores(normal, None, source)
    if not 0.0 < fpr < 1.0:
        raise InputError(f"--fpr {fpr!r}: must be between 0 and 1 (exclusive), e.g. 0.05")
    n, need = len(normal), normals_needed(fpr)
    if n < need:
        raise InputError(f"{source}: {n} normal case(s); a threshold at FPR {fpr:g} with an order-statistics CI "
                         f"needs at least {need} (add {need - n} more)")
    k = order_statistic_index(n, fpr)
    threshold = float(np.sort(normal)[k - 1])
    a, b = n - k + 1, k  # FPR ~ Beta(a, b)
    fpr_pop = [float(v) for v in stats.beta.ppf([0.025, 0.975], a, b)]
    fpr_new = [float(v) / n for v in stats.betabinom.ppf([0.025, 0.975], n, a, b)]
    expected = a / (n + 1)
    observed = float(np.mean(normal >= threshold))
    return {
        "threshold": threshold,
        "rule": "fpr",
        "requested": float(fpr),
        "order_statistic": {"k": k, "n": n, "beta": [a, b]},
        "metrics": {
            "fpr": {"value": expected, "observed": observed, "ci95": fpr_new, "ci95_population": fpr_pop},
            "specificity": {"value": 1 - expected, "observed": 1 - observed, "ci95": [1 - fpr_new[1], 1 - fpr_new[0]],
                            "ci95_population": [1 - fpr_pop[1], 1 - fpr_pop[0]]},
        },
        "counts": {"normal": n, "abnormal": 0},
    }


# -- score normalisation -----------------------------------------------------------------
def expected_calibration_error(prob: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over equal-count bins of the predicted probability: sum_b |mean p - mean y| * n_b / n."""
    order = np.argsort(prob, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, min(bins, len(order))):
        total += abs(prob[chunk].mean() - labels[chunk].mean()) * len(chunk)
    return float(total / len(prob))


def _fit_isotonic(scores: np.ndarray, labels: np.ndarray) -> dict:
    order = np.argsort(scores, kind="stable")
    x, y = scores[order], labels[order].astype(np.float64)
    fitted = optimize.isotonic_regression(y, increasing=True).x
    # Keep one knot per step edge so np.interp reproduces the step function between them.
    xs, idx = np.unique(x, return_index=True)
    ys = np.array([fitted[i:j].mean() for i, j in zip(idx, np.r_[idx[1:], len(x)])])
    keep = np.r_[True, np.diff(ys) != 0] | np.r_[np.diff(ys) != 0, True]
    return {"method": "isotonic", "x": xs[keep].tolist(), "y": ys[keep].tolist()}


def _fit_logistic(scores: np.ndarray, labels: np.ndarray) -> dict:
    mu, sd = float(scores.mean()), float(scores.std()) or 1.0
    z, y = (scores - mu) / sd, labels.astype(np.float64)

    def nll(w: np.ndarray) -> float:
        t = w[0] * z + w[1]
        return float(np.sum(np.logaddexp(0, t) - y * t) + 1e-4 * w[0] ** 2)

    w = optimize.minimize(nll, np.array([1.0, 0.0]), method="BFGS").x
    return {"method": "logistic", "slope": float(w[0] / sd), "intercept": float(w[1] - w[0] * mu / sd)}


def apply_normalisation(norm: dict, scores: np.ndarray | float) -> np.ndarray:
    """Map raw scores through a stored normalisation (see `fit_normalisation`)."""
    s = np.asarray(scores, np.float64)
    method = norm["method"]
    if method == "logistic":
        return 0.5 * (1 + np.tanh(0.5 * (norm["slope"] * s + norm["intercept"])))  # stable sigmoid
    if method in ("isotonic", "normal-percentile"):
        return np.interp(s, norm["x"], norm["y"])
    raise InputError(f"calibration: unknown normalisation method {method!r}")


def fit_normalisation(scores: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Monotone map raw score -> probability of abnormal, chosen by cross-validated ECE.

    Both candidates are scored on 5 stratified folds (fit on 4, predict the 5th); the one
    with the lower ECE of the pooled out-of-fold predictions is refitted on all the data.
    The probability reflects the calibration set's prevalence.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(int)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(scores), int)
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        folds[rng.permutation(idx)] = np.arange(len(idx)) % CV_FOLDS
    fitters = {"isotonic": _fit_isotonic, "logistic": _fit_logistic}
    errors = {}
    for name, fitter in fitters.items():
        pred = np.empty(len(scores))
        for f in range(CV_FOLDS):
            test = folds == f
            pred[test] = apply_normalisation(fitter(scores[~test], labels[~test]), scores[test])
        errors[name] = expected_calibration_error(pred, labels)
    best = min(errors, key=errors.get)
    return {**fitters[best](scores, labels), "cv_ece": errors, "chosen_by": f"{CV_FOLDS}-fold cross-validated ECE"}


def normal_percentile(normal: np.ndarray, knots: int = 101) -> dict:
    """Normals-only 'calibrated score': the fraction of calibration normals scoring below."""
    s = np.sort(np.asarray(normal, np.float64))
    q = np.linspace(0, 1, min(knots, len(s)))
    x = np.quantile(s, q)
    return {"method": "normal-percentile", "x": x.tolist(), "y": q.tolist(),
            "meaning": "fraction of the calibration normals scoring below (not a probability of disease)"}
