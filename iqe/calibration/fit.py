"""Build a calibration entry from scores and store it in the bundle.

scores (+ labels) -> `operating_point` fits -> entry -> ``BUNDLE/calibration.json``
(merged with the entries of other targets, written atomically).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np

from iqe.atomic import atomic_write_text
from iqe.calibration import CALIBRATION_NAME, FORMAT, load_calibration
from iqe.calibration.operating_point import (
    DEFAULT_RESAMPLES,
    fit_labelled,
    fit_normalisation,
    fit_normals_only,
    normal_percentile,
)
from iqe.errors import InputError


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def fit_entry(scores: np.ndarray, labels: np.ndarray, *, target: str, score_key: str, rule: str,
              requested: float | None, prevalence: float | None = None, resamples: int = DEFAULT_RESAMPLES,
              seed: int = 0, data: dict | None = None, source: str = "scores") -> dict:
    """One calibration entry (the ``entries[target]`` object of calibration.json).

    Args:
        scores: the `score_key` score of every case.
        labels: 0 normal / 1 abnormal; for rule 'fpr' (normals only) every label must be 0.
        target: entry key (target object, body part or modality).
        score_key: which results.jsonl score the threshold applies to.
        rule: 'sensitivity' | 'specificity' | 'youden' (labelled) or 'fpr' (normals only).
        requested: target sensitivity / specificity / FPR (None for youden).
        prevalence: PPV/NPV prevalence (labelled; default the data's own).
        resamples, seed: bootstrap settings (labelled).
        data: description of the data, stored as ``data`` (counts are added here).
        source: names the data in error messages.

    Raises:
        InputError: see `fit_labelled` / `fit_normals_only`.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    if rule == "fpr":
        if np.any(labels != 0):
            raise InputError(f"{source}: --normals-only got {int(np.sum(labels != 0))} abnormal case(s); "
                             "drop --normals-only to use the labels")
        fitted = fit_normals_only(scores, float(requested), source)
        mode, norm = "normals-only", normal_percentile(scores)
    else:
        fitted = fit_labelled(scores, labels, rule, requested, prevalence, resamples, seed, source)
        mode, norm = "labelled", fit_normalisation(scores, labels, seed)
    counts = fitted.pop("counts")
    return {
        "target": target,
        "mode": mode,
        "score_key": score_key,
        **{k: fitted.pop(k) for k in ("rule", "requested", "threshold")},
        "created": _now(),
        "data": {**(data or {}), **counts},
        **fitted,
        "normalisation": norm,
    }


def save_entry(bundle_dir: str | Path, entry: dict, content_key: str | None = None) -> Path:
    """Add or replace ``entries[entry['target']]`` in ``bundle_dir/calibration.json`` (atomic write).

    Entries of other targets are kept, unless `content_key` (the bundle's weights + config key,
    `iqe.engine.build.bundle_key`) differs from the stored one: then they were fitted on
    another model's scores and are dropped. Returns the file's path.
    """
    bundle_dir = Path(bundle_dir)
    cal = load_calibration(bundle_dir) or {"format": FORMAT, "bundle": {}, "entries": {}}
    if content_key is not None:
        old = cal.get("bundle", {}).get("content_key")
        if old is not None and old != content_key:
            cal["entries"] = {}  # scores of another model: the old thresholds no longer mean anything
        cal["bundle"] = {"content_key": content_key}
    cal["entries"][entry["target"]] = entry
    path = bundle_dir / CALIBRATION_NAME
    atomic_write_text(path, json.dumps(cal, indent=2) + "\n")
    return path
