"""Operating points: `calibration.json` in a bundle, and applying it to scored rows.

Public API (light to import; used by `iqe score`, the DICOM node and `iqe check`):

    cal = load_calibration(bundle_dir)          # None when the bundle has no calibration.json
    row = annotate(row, cal, target="Brain")    # adds calibrated_score, decision, operating_point

`iqe calibrate` (iqe.calibration.cli) writes the file; the statistics live in
iqe.calibration.operating_point.

File format (``BUNDLE/calibration.json``, written atomically, UTF-8 JSON)::

    {
      "format": "iqe-calibration/1",
      "bundle": {"content_key": "..."},          # the model the scores came from (sha256 over
                                                  # config.json + model.safetensors, as engine caches)
      "entries": {                                # one per target / body part / modality
        "Brain": {
          "target": "Brain",
          "mode": "labelled" | "normals-only",
          "score_key": "map_max",                 # which results.jsonl score the threshold applies to
          "rule": "sensitivity" | "specificity" | "youden" | "fpr",
          "requested": 0.9,                       # target rate (null for youden)
          "threshold": 0.512,                     # decision "abnormal" when score >= threshold
          "created": "2026-11-30T08:00:00Z",
          "data": {"source": "...", "description": "...", "normal": 40, "abnormal": 40,
                   "failed": 0, "backend": "torch", "precision": "fp32"},
          "metrics": {                            # labelled: sensitivity, specificity, ppv, npv, auc
            "sensitivity": {"value": 0.9,         #   normals-only: fpr, specificity
                            "ci95": [lo, hi],             # rate observed on a new set of the same size
                            "ci95_population": [lo, hi]}, # the underlying rate of the fitted rule
            ...},
          "prevalence": 0.5,                      # labelled: the one PPV/NPV use
          "normalisation": {"method": "isotonic", "x": [...], "y": [...]}  # or logistic slope/intercept,
                                                  # or normal-percentile (normals-only), see operating_point
          "bootstrap" | "order_statistic": {...}  # how the intervals were computed
        }
      }
    }

An entry is chosen for a row by, in order: the `target` argument, the row's `target`,
`body_part` or `modality` field (case-insensitive match of the entry key), the entry
``"default"``, the single entry when there is only one. Rows without a match, failed rows
and rows without the entry's score key are returned unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

CALIBRATION_NAME = "calibration.json"
FORMAT = "iqe-calibration/1"


def load_calibration(bundle_dir: str | Path) -> dict | None:
    """Read ``bundle_dir/calibration.json``; None when absent.

    Raises:
        InputError: the file exists but is not a calibration of this format.
    """
    from iqe.errors import InputError

    path = Path(bundle_dir) / CALIBRATION_NAME
    if not path.is_file():
        return None
    try:
        cal = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable calibration ({exc}); rerun `iqe calibrate`") from None
    if not isinstance(cal, dict) or cal.get("format") != FORMAT or not isinstance(cal.get("entries"), dict):
        raise InputError(f"{path}: not an {FORMAT} file; rerun `iqe calibrate`")
    return cal


def select_entry(calibration: dict | None, row: dict | None = None, target: str | None = None) -> dict | None:
    """The calibration entry that applies to `row` (see the module docstring), or None."""
    if not calibration:
        return None
    entries: dict[str, dict] = calibration.get("entries", {})
    by_lower = {k.lower(): v for k, v in entries.items()}
    keys = [target] if target is not None else [(row or {}).get(k) for k in ("target", "body_part", "modality")]
    for key in keys:
        if isinstance(key, str) and key.lower() in by_lower:
            return by_lower[key.lower()]
    if target is not None:
        return None  # an explicit target that has no entry: do not guess
    if "default" in by_lower:
        return by_lower["default"]
    return next(iter(entries.values())) if len(entries) == 1 else None


def annotate(row: dict[str, Any], calibration: dict | None, target: str | None = None) -> dict[str, Any]:
    """A copy of a results row with `calibrated_score`, `decision` and `operating_point` added.

    Args:
        row: one results.jsonl object (``score``, ``map_max``, ... or ``error``).
        calibration: from `load_calibration` (None: the row is returned unchanged).
        target: entry key (target / body part / modality); default: taken from the row.

    Returns:
        The row plus ``calibrated_score`` (float), ``decision`` ("normal" | "abnormal") and
        ``operating_point`` (threshold, score_key, target, mode, rule, requested, and the
        point estimates with their ci95), when an entry applies and the row has its score.
    """
    entry = select_entry(calibration, row, target)
    raw = row.get(entry["score_key"]) if entry else None
    if entry is None or "error" in row or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        return dict(row)
    from iqe.calibration.operating_point import apply_normalisation

    return {
        **row,
        "calibrated_score": float(apply_normalisation(entry["normalisation"], float(raw))),
        "decision": "abnormal" if raw >= entry["threshold"] else "normal",
        "operating_point": operating_point_of(entry),
    }


def operating_point_of(entry: dict) -> dict[str, Any]:
    """The compact description of an entry that travels with every decision."""
    return {
        "threshold": entry["threshold"],
        "score_key": entry["score_key"],
        "target": entry["target"],
        "mode": entry["mode"],
        "rule": entry["rule"],
        "requested": entry.get("requested"),
        "created": entry.get("created"),
        **{name: {"value": m["value"], "ci95": m["ci95"]} for name, m in entry["metrics"].items()},
    }


def annotate_rows(rows: list[dict[str, Any]], calibration: dict | None, target: str | None = None) -> list[dict[str, Any]]:
    """`annotate` for a list of rows (same order)."""
    return [annotate(r, calibration, target) for r in rows]


ANNOTATION_KEYS = ("calibrated_score", "decision", "operating_point")


def calibration_hook(bundle_dir: str | Path | None, target: str | None = None):
    """A results-row hook (`iqe.runtime.results.RunOutput(annotate=...)`) applying the bundle's
    calibration, or None when there is no bundle or it has no calibration.json."""
    calibration = load_calibration(bundle_dir) if bundle_dir is not None else None
    if calibration is None:
        return None
    return lambda row: annotate(row, calibration, target)


def annotate_results(results: list, bundle_dir: str | Path, target: str | None = None) -> int:
    """Add the annotation fields to scored `iqe.runtime.results.ItemResult`s in place (via `extra`).

    The hook `iqe score` calls before writing results.jsonl. Returns how many were annotated
    (0 when the bundle has no calibration).
    """
    calibration = load_calibration(bundle_dir)
    if calibration is None:
        return 0
    count = 0
    for r in results:
        if r.error is not None:
            continue
        row = annotate(r.to_json(), calibration, target)
        if "decision" in row:
            r.extra.update({k: row[k] for k in ANNOTATION_KEYS})
            count += 1
    return count
