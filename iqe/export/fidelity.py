"""The fidelity contract: how far an engine's outputs may drift from the torch fp32 model.

One gate judges every configuration (export verification, the FP16 policy sweep, INT8,
`iqe check`), always against the float32 PyTorch model on the same images:

- fp32, any backend: score max abs <= 1e-3 x max(1, score spread over the images);
  maps <= 1e-3 max abs; per-image map correlation >= 0.999.
- fp16 / mixed: maps <= 1e-2 max abs; per-image map correlation >= 0.99; image-score
  Spearman >= 0.999 (meaningful over >= 64 images); no decision flip at an operating point.
- int8: as fp16, plus image-AUC change <= 0.005 on a labelled set.

Absolute limits are never set below a multiple of the fp32 noise floor measured on the
same images (float32 vs float64 PyTorch): a model that amplifies rounding ~500x has a
floor no backend can beat, and refusing it would be the defect. `tolerance` scales every
limit (abs limits x t, correlation gaps 1 - r x t) for users who accept more drift.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCORE_OUTPUTS = ("score", "score_query", "score_text", "score_few", "map_max", "score_zero")
RANKED_SCORES = ("score", "score_few", "map_max", "score_zero")  # image scores a site ranks and thresholds
MAP_OUTPUTS = ("map", "map_smooth", "map_zero", "map_few")  # map_zero / map_few: MVFA's raw branch maps
NOISE_FLOOR_FACTOR = 10.0  # abs limits are at least this multiple of the fp32-vs-fp64 drift
MIN_SPEARMAN_IMAGES = 64


@dataclass(frozen=True)
class Contract:
    """Limits of one precision class (None: not checked)."""

    score_rel: float | None  # score max abs / max(1, spread)
    map_abs: float
    map_corr: float
    spearman: float | None
    auc_delta: float | None = None
    flips: bool = False  # decision flips at the operating point are failures


CONTRACTS = {
    "fp32": Contract(score_rel=1e-3, map_abs=1e-3, map_corr=0.999, spearman=None),
    "fp16": Contract(score_rel=None, map_abs=1e-2, map_corr=0.99, spearman=0.999, flips=True),
    "int8": Contract(score_rel=None, map_abs=1e-2, map_corr=0.99, spearman=0.999, auc_delta=0.005, flips=True),
}


def contract_for(precision: str) -> Contract:
    """The contract class of a precision name ("fp32", "fp16", "mixed", "int8", "fp8")."""
    return CONTRACTS["fp32" if precision == "fp32" else "int8" if precision in ("int8", "fp8") else "fp16"]


@dataclass
class Check:
    """One judged number: `value` against `limit` (`kind` says which way passes)."""

    output: str
    metric: str
    value: float
    limit: float
    kind: str  # "max" (value <= limit) or "min" (value >= limit)
    passed: bool
    worst: str | None = None  # the image where the value was reached

    def line(self) -> str:
        op = "<=" if self.kind == "max" else ">="
        where = f" (worst: {self.worst})" if self.worst else ""
        return f"{self.output}: {self.metric} {self.value:.3g}, limit {op} {self.limit:.3g}{where}"


@dataclass
class DriftReport:
    """Drift of `candidate` vs `reference` on a set of images, judged by the contract."""

    reference: str
    candidate: str
    precision: str
    images: int
    tolerance: float
    checks: list[Check] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # per output: all numbers
    noise_floor: dict[str, float] = field(default_factory=dict)  # per output: fp32-vs-fp64 max abs
    worst_images: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> dict[str, Any]:
        """The few numbers worth carrying along (results metadata, build output)."""
        m = self.metrics
        return {
            "reference": self.reference, "candidate": self.candidate, "precision": self.precision,
            "images": self.images, "passed": self.passed,
            "map_max_abs": m.get("map", {}).get("max_abs"),
            "map_corr_min": m.get("map", {}).get("corr_min"),
            "score_max_abs": m.get("score", {}).get("max_abs"),
            "score_spearman": m.get("score", {}).get("spearman"),
            "failures": [c.line() for c in self.failures()],
            **({"fp16_flop_fraction": self.extra["fp16_flop_fraction"]} if "fp16_flop_fraction" in self.extra else {}),
        }

    def summary_line(self) -> str:
        s = self.summary()
        verdict = "passes" if self.passed else f"FAILS ({len(self.failures())} checks)"
        parts = [f"maps max abs {s['map_max_abs']:.2e}", f"map corr min {s['map_corr_min']:.5f}",
                 f"score max abs {s['score_max_abs']:.2e}"]
        if s["score_spearman"] is not None and not math.isnan(s["score_spearman"]):
            parts.append(f"score Spearman {s['score_spearman']:.5f}")
        if "fp16_flop_fraction" in s:
            parts.append(f"fp16 FLOPs {100 * s['fp16_flop_fraction']:.0f}%")
        return (f"drift {self.candidate} vs {self.reference} on {self.images} images: {', '.join(parts)}; "
                f"{self.precision} contract {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DriftReport":
        data = dict(data)
        data.pop("passed", None)
        data["checks"] = [Check(**c) for c in data.get("checks", [])]
        return cls(**data)

    def markdown(self) -> str:
        lines = [f"# Drift: {self.candidate} vs {self.reference}", "",
                 f"{self.images} images, {self.precision} contract, tolerance x{self.tolerance:g}: "
                 f"**{'pass' if self.passed else 'FAIL'}**", "",
                 "| output | check | value | limit | ok |", "|---|---|---|---|---|"]
        for c in self.checks:
            op = "<=" if c.kind == "max" else ">="
            lines.append(f"| {c.output} | {c.metric} | {c.value:.4g} | {op} {c.limit:.4g} | {'yes' if c.passed else 'NO'} |")
        if self.worst_images:
            lines += ["", "Worst images (lowest map correlation):", ""]
            lines += [f"- {w['image']}: map corr {w['map_corr']:.5f}, map max abs {w['map_max_abs']:.3g}"
                      for w in self.worst_images]
        if self.extra.get("policy"):
            lines += ["", f"FP16 policy: {json.dumps(self.extra['policy'])}"]
        lines += [f"- {n}" for n in ([""] + self.notes if self.notes else [])]
        return "\n".join(lines) + "\n"


def drift_path(engine_dir: str | Path, backend: str, precision: str) -> Path:
    return Path(engine_dir) / f"drift.{backend}.{precision}.json"


def write_drift_report(report: DriftReport, engine_dir: str | Path, backend: str, precision: str) -> Path:
    """Write `drift.<backend>.<precision>.json` and `.md` atomically; returns the JSON path."""
    from iqe.atomic import atomic_write_text

    path = drift_path(engine_dir, backend, precision)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2, default=_jsonable) + "\n")
    atomic_write_text(path.with_suffix(".md"), report.markdown())
    return path


def read_drift_report(engine_dir: str | Path, backend: str, precision: str) -> DriftReport | None:
    """The drift report next to an engine, or None when none was written."""
    path = drift_path(engine_dir, backend, precision)
    if not path.is_file():
        return None
    return DriftReport.from_dict(json.loads(path.read_text()))


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON-serialisable: {type(x)}")


# -- metrics ---------------------------------------------------------------------------------
def per_image_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation per image of [N, ...] arrays (1.0 where both images are constant and equal)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    num = (a * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.abs(a - b).max(axis=1) == 0, 1.0, 0.0))
    return corr


def rank_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Spearman rho, Kendall tau) of two score vectors (NaN with < 2 values or no spread)."""
    from scipy.stats import kendalltau, spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    return float(spearmanr(a, b).statistic), float(kendalltau(a, b).statistic)


def image_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of scores for binary labels (Mann-Whitney, ties counted half)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], precision: str,
            names: list[str] | None = None, tolerance: float = 1.0,
            noise_floor: dict[str, float] | None = None, threshold: tuple[str, float] | None = None,
            labels: np.ndarray | None = None, reference_name: str = "torch fp32",
            candidate_name: str = "candidate", n_worst: int = 5) -> DriftReport:
    """Judge `candidate` outputs against `reference` outputs by the contract of `precision`.

    Args:
        reference, candidate: output name -> [N] scores or [N, S, S] maps (same images, same order).
        precision: "fp32", "fp16"/"mixed", "int8"/"fp8" (selects the contract).
        names: image names for the worst-image list (default: indices).
        tolerance: multiplier >= 1 on every limit (see module docstring).
        noise_floor: output -> fp32-vs-fp64 max abs on the same images; abs limits are at least
            NOISE_FLOOR_FACTOR times it.
        threshold: (score output, value) operating point; decisions `score >= value` must not flip.
        labels: 0/1 per image; with them the image-AUC change of each ranked score is checked (int8).
    Returns:
        DriftReport with every check.
    """
    c = contract_for(precision)
    n = len(reference["score"])
    names = names or [str(i) for i in range(n)]
    floor = noise_floor or {}
    rep = DriftReport(reference_name, candidate_name, precision, n, tolerance, noise_floor=dict(floor))

    def abs_limit(output: str, base: float) -> float:
        return max(base * tolerance, NOISE_FLOOR_FACTOR * floor.get(output, 0.0))

    def corr_limit(base: float) -> float:
        return 1.0 - (1.0 - base) * tolerance

    for key in SCORE_OUTPUTS:
        if key not in reference or key not in candidate:
            continue
        a, b = np.asarray(reference[key], np.float64), np.asarray(candidate[key], np.float64)
        diff = np.abs(a - b)
        worst = int(np.argmax(diff)) if n else 0
        rho, tau = rank_stats(a, b)
        rep.metrics[key] = {"max_abs": float(diff.max()) if n else 0.0, "spread": float(np.ptp(a)) if n else 0.0,
                            "spearman": rho, "kendall": tau}
        if c.score_rel is not None and n:
            limit = abs_limit(key, c.score_rel * max(1.0, float(np.ptp(a))))
            rep.checks.append(Check(key, "max abs", float(diff.max()), limit, "max", bool(diff.max() <= limit),
                                    names[worst]))
        if c.spearman is not None and key in RANKED_SCORES and n >= 2:
            if n < MIN_SPEARMAN_IMAGES:
                rep.notes.append(f"{key}: Spearman over {n} images (the contract asks for >= {MIN_SPEARMAN_IMAGES})")
            limit = corr_limit(c.spearman)
            ok = not math.isnan(rho) and rho >= limit
            if math.isnan(rho) and np.ptp(a) == 0 and np.ptp(b) == 0:
                ok = True  # constant scores on both sides: nothing to rank
            rep.checks.append(Check(key, "Spearman", rho, limit, "min", ok))
        if labels is not None and c.auc_delta is not None and key in RANKED_SCORES:
            d = abs(image_auc(b, labels) - image_auc(a, labels))
            rep.metrics[key]["auc_delta"] = d
            rep.checks.append(Check(key, "image-AUC change", d, c.auc_delta * tolerance, "max",
                                    bool(d <= c.auc_delta * tolerance)))
    corr_map = None
    for key in MAP_OUTPUTS:
        if key not in reference or key not in candidate:
            continue
        a, b = np.asarray(reference[key], np.float32), np.asarray(candidate[key], np.float32)
        per_abs = np.abs(a - b).reshape(n, -1).max(axis=1) if n else np.zeros(0)
        corr = per_image_corr(a, b) if n else np.zeros(0)
        if key == "map":
            corr_map = (corr, per_abs)
        if not n:
            continue
        i_abs, i_corr = int(np.argmax(per_abs)), int(np.argmin(corr))
        rep.metrics[key] = {"max_abs": float(per_abs.max()), "corr_min": float(corr.min()),
                            "corr_mean": float(corr.mean())}
        limit = abs_limit(key, c.map_abs)
        rep.checks.append(Check(key, "max abs", float(per_abs.max()), limit, "max", bool(per_abs.max() <= limit),
                                names[i_abs]))
        limit = corr_limit(c.map_corr)
        rep.checks.append(Check(key, "per-image correlation (min)", float(corr.min()), limit, "min",
                                bool(corr.min() >= limit), names[i_corr]))
    if threshold is not None and threshold[0] in reference and threshold[0] in candidate:
        key, value = threshold
        flips = np.flatnonzero((np.asarray(reference[key]) >= value) != (np.asarray(candidate[key]) >= value))
        rep.metrics.setdefault(key, {})["decision_flips"] = int(len(flips))
        rep.extra["operating_point"] = {"score": key, "threshold": float(value)}
        rep.checks.append(Check(key, f"decision flips at {value:.6g}", float(len(flips)), 0.0, "max",
                                len(flips) == 0 or not c.flips, names[int(flips[0])] if len(flips) else None))
    if corr_map is not None and n:
        corr, per_abs = corr_map
        order = np.argsort(corr)[:n_worst]
        rep.worst_images = [{"image": names[i], "map_corr": float(corr[i]), "map_max_abs": float(per_abs[i]),
                             "score_abs": float(abs(reference["score"][i] - candidate["score"][i]))} for i in order]
    return rep


def failure_message(report: DriftReport, what: str, precision: str) -> str:
    """One line per failing check, each saying what to do (for the user, never a traceback)."""
    other = "fp32" if precision != "fp32" else "another backend"
    lines = [f"{what}: {report.candidate} drifts from {report.reference} past the {precision} contract "
             f"on {report.images} images:"]
    for c in report.failures():
        lines.append(f"  {c.line()} -- try --precision {other}, --tolerance "
                     f"{_suggest_tolerance(c, report.tolerance):.3g}, or --no-verify")
    return "\n".join(lines)


def _suggest_tolerance(c: Check, current: float) -> float:
    """Smallest tolerance multiplier under which this check would pass (rounded up a little)."""
    if c.kind == "max":
        need = current * c.value / c.limit if c.limit > 0 else current * 10
    else:
        gap, allowed = 1.0 - c.value, 1.0 - c.limit
        need = current * gap / allowed if allowed > 0 else current * 10
    return float(np.ceil(max(need, current) * 1.05 * 100) / 100)


# -- hooks for the CLI ---------------------------------------------------------------------------
def drift_summary_line(engine_dir: str | Path, backend: str, precision: str) -> str:
    """What `iqe build` prints about the engine's fidelity (the export's drift report)."""
    rep = read_drift_report(engine_dir, backend, precision)
    if rep is None and backend != "onnxruntime":
        rep = read_drift_report(engine_dir, "onnxruntime", precision)
        if rep is not None:
            return f"{rep.summary_line()} (the exported graph in ONNX Runtime; this {backend} engine itself is not verified)"
    if rep is None:
        return f"no drift report for {precision} (exported with --no-verify); `iqe check` measures one"
    return rep.summary_line()


def export_options_to_env(args: Any) -> None:
    """Pass `--tolerance/--no-verify/--calib` of `iqe score` to an export it triggers (env defaults)."""
    import os

    if getattr(args, "tolerance", None) is not None:
        os.environ["IQE_TOLERANCE"] = str(args.tolerance)
    if getattr(args, "no_verify", False):
        os.environ["IQE_NO_VERIFY"] = "1"
    if getattr(args, "calib", None) is not None:
        os.environ["IQE_CALIB"] = str(args.calib)


def engine_drift_meta(runner: Any) -> dict[str, Any]:
    """`results.meta.json` of an `iqe score` run: the backend and the drift summary of its engine.

    ONNX Runtime / TensorRT runners: the export's drift report next to the engine; torch
    fp16: the emulated report of the bundle's policy; torch fp32 is the reference itself.
    """
    graph = getattr(runner, "onnx_path", None) or getattr(runner, "plan_path", None)
    summary: dict[str, Any] | None = None
    if graph is not None:
        precision = Path(graph).name.split(".")[1] if Path(graph).name.count(".") >= 2 else "fp32"
        rep = read_drift_report(Path(graph).parent, "onnxruntime", precision)
        summary = rep.summary() if rep is not None else {"verified": False}
    elif getattr(runner, "precision", "fp32") == "fp16":
        summary = {"note": "torch fp16 runs the bundle's measured FP16 policy (see iqe/export/precision.py)"}
    else:
        summary = {"reference": "torch fp32", "note": "the reference configuration"}
    return json.loads(json.dumps({"backend": getattr(runner, "name", "?"), "drift": summary}, default=_jsonable))
