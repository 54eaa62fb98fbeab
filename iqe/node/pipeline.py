"""One complete series -> scores -> result objects + JSON (shared by the node and the Orthanc plugin).

    SeriesResults.build(folder, ...)   score the folder, build SR / PM / SC, collect errors
    StudyResults                       <spool>/results/<StudyInstanceUID>.json, one entry per series

A result object that cannot be built (e.g. a Parametric Map for images without
geometry) is reported in the JSON and the others still go out; a series with nothing
scorable yields its report and no DICOM objects.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from iqe.atomic import atomic_write_text
from iqe.node.dicom_results import ResultContext, build_overlays, build_pm, build_sr, dumps, series_json
from iqe.node.runtime_adapter import SeriesScore, SeriesScorer

# What highdicom / pydicom raise when the source data do not allow an object (missing or odd
# attributes). Anything else (ImportError, OSError, MemoryError) is not the data's fault: it
# propagates, and the series is scored again later instead of being recorded without results.
DATA_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError)


def job_name(series_uid: str, digest: str) -> str:
    """Result job of one instance set of a series (file-safe, unique per set)."""
    return f"{series_uid}-{digest[:16]}"


def read_headers(folder: Path) -> dict[str, Dataset]:
    """Headers of the instances in `folder` by SOP Instance UID (unreadable files are skipped)."""
    out: dict[str, Dataset] = {}
    for path in sorted(folder.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out[str(ds.SOPInstanceUID)] = ds
        except Exception:  # noqa: BLE001 - the scorer reports the same file with its reason
            continue
    return out


@dataclass
class SeriesResults:
    """What one series produced."""

    objects: list[tuple[str, Dataset]]  # (kind, data set) in sending order: sr, pm, sc...
    summary: dict[str, Any]  # the series' JSON result
    score: SeriesScore
    errors: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, folder: Path, series_uid: str, study_uid: str, scorer: SeriesScorer, ctx: ResultContext,
              parametric_map: bool = True, overlays: str = "all") -> "SeriesResults":
        """Score `folder` (one series) and build its result objects.

        Args:
            folder: the series' instances.
            series_uid, study_uid: the source series and study.
            scorer: held-open runner.
            ctx: job, UID root, series number, model identity.
            parametric_map: build the Parametric Map.
            overlays: "all" | "max" | "none" Secondary Capture overlays.
        """
        score = scorer.score_folder(folder)
        errors = [s.error for s in score.slices if s.error]
        sources = read_headers(folder)
        objects: list[tuple[str, Dataset]] = []
        if score.score is not None and sources:
            builders = [("sr", lambda: [build_sr(sources, score, ctx)])]
            if parametric_map:
                builders.append(("pm", lambda: [pm] if (pm := build_pm(sources, score, ctx)) is not None else []))
            builders.append(("sc", lambda: build_overlays(sources, score, ctx, overlays)))
            for kind, build in builders:
                try:
                    objects.extend((kind, ds) for ds in build())
                except DATA_ERRORS as exc:  # this series' data do not allow it; the other objects still go out
                    errors.append(f"series {series_uid}: {kind} not written ({type(exc).__name__}: {exc})")
        else:
            errors.append(f"series {series_uid}: nothing scorable ({len(score.slices)} items, all failed)")
        written = {kind: [str(ds.SOPInstanceUID) for k, ds in objects if k == kind] for kind in ("sr", "pm", "sc")}
        summary = series_json(series_uid, study_uid, score, ctx, written, errors)
        return cls(objects, summary, score, errors)


class StudyResults:
    """The JSON result per study: <root>/<StudyInstanceUID>.json, updated atomically, thread-safe."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, study_uid: str) -> Path:
        return self.root / f"{study_uid}.json"

    def read(self, study_uid: str) -> dict[str, Any]:
        try:
            return json.loads(self.path(study_uid).read_text())
        except FileNotFoundError:
            return {"study_uid": study_uid, "series": {}, "rejected": []}

    def _update(self, study_uid: str, change) -> None:
        with self._lock:
            doc = self.read(study_uid)
            change(doc)
            atomic_write_text(self.path(study_uid), dumps(doc))

    def put_series(self, study_uid: str, summary: dict[str, Any]) -> None:
        """Record (or replace) one series' result."""
        self._update(study_uid, lambda doc: doc["series"].__setitem__(summary["series_uid"], summary))

    def reject(self, study_uid: str, entry: dict[str, Any]) -> None:
        """Report an instance refused at intake (non-image, unreadable, missing UIDs)."""
        self._update(study_uid, lambda doc: doc["rejected"].append(entry))
