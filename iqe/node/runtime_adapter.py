"""The node's one door into the runtime and the engine (kept thin on purpose).

Runner construction (`iqe.engine.build.make_runner`) and batch scoring
(`iqe.runtime.scoring.score_inputs`) are being reshaped by other work; every call the
node and the Orthanc plugin make into them goes through this module, so following
those changes is one edit here. Scoring a spooled series folder goes down exactly the
path of `iqe score <folder>`, so the numbers are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iqe.node.config import ModelSection

# Optional fields a calibrated bundle adds to each result row (iqe.calibration).
CALIBRATION_FIELDS = ("calibrated_score", "decision", "operating_point")


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a result: written into every SR, PM, SC and JSON result."""

    name: str  # bundle's model name (config.json "name")
    bundle_sha256: str  # content key of config.json + weights
    backend: str
    precision: str
    image_size: int
    family: str = "iqe-clip"  # the bundle's model family (config.json "family", iqe.model.families)

    @property
    def label(self) -> str:
        """The model as results name it: family label and bundle name ('MVFA mvfa-Brain')."""
        from iqe.model.families import family_label

        return f"{family_label(self.family)} {self.name}"

    @property
    def map_description(self) -> str:
        """What the results' map is, for the Parametric Map ('MVFA anomaly map (zero-shot, or ...)')."""
        from iqe.model.families import family_label, get_family

        return f"{family_label(self.family)} {get_family(self.family).map_description}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "bundle_sha256": self.bundle_sha256,
                "backend": self.backend, "precision": self.precision, "image_size": self.image_size}


@dataclass
class SliceScore:
    """One scored (or failed) slice of a series, in volume order."""

    index: int  # position in the volume (frames of a multi-frame file count one each)
    key: str  # runtime item key
    sop_uid: str | None
    frame: int | None  # 0-based frame in a multi-frame instance, None for single-frame files
    scores: dict[str, float] | None  # score, score_query, ... ; None on error
    error: str | None
    map: Any = None  # float32 [S, S] anomaly map (map_smooth), display frame
    image: Any = None  # float32 [3, S, S] model input in [0, 1]
    calibration: dict[str, Any] = field(default_factory=dict)  # calibrated_score / decision / operating_point

    @property
    def score(self) -> float:
        """The slice's anomaly score (NaN when it failed)."""
        return float(self.scores["score"]) if self.scores else math.nan


@dataclass
class SeriesScore:
    """A series' result: per-slice scores, the series score (highest slice) and calibration if any."""

    slices: list[SliceScore]
    score: float | None
    argmax_slice: int | None
    decision: str | None = None  # "normal" / "abnormal" when the bundle is calibrated
    calibrated_score: float | None = None
    operating_point: dict[str, Any] | None = None

    @property
    def failed(self) -> list[SliceScore]:
        return [s for s in self.slices if s.scores is None or s.error]


class SeriesScorer:
    """A runner held open for the node's lifetime; scores spooled series folders.

    Args:
        model: [model] section of the node config.
    """

    def __init__(self, model: ModelSection) -> None:
        from iqe.engine.build import bundle_key, make_runner

        self._batch = model.batch
        self._bundle = Path(model.bundle)
        self._runner = make_runner(model.bundle, model.backend, model.precision, model.engine, progress=False)
        self._runner.__enter__()
        import numpy as np

        size = self._runner.image_size  # one warm-up call: the first series pays model time only
        self._runner.infer(np.zeros((1, 3, size, size), np.float32))
        import json

        config = json.loads((Path(model.bundle) / "config.json").read_text())
        self.identity = ModelIdentity(config.get("name", "iqe"), bundle_key(Path(model.bundle)), model.backend,
                                      model.precision, self._runner.image_size, config.get("family", "iqe-clip"))

    def score_folder(self, folder: str | Path) -> SeriesScore:
        """Score every instance in `folder` (one series) as `iqe score folder` would."""
        from iqe.runtime.scoring import score_inputs

        from iqe.calibration import annotate_results

        results = score_inputs([folder], self._runner.infer, self._runner.image_size, self._batch,
                               keep_maps=True, keep_images=True, progress=False)
        annotate_results(results, self._bundle)  # decision + operating point when the bundle is calibrated
        return summarize(results)

    def close(self) -> None:
        self._runner.__exit__(None, None, None)


def summarize(results: list) -> SeriesScore:
    """Runtime ItemResults of one series -> SeriesScore.

    The series score is `iqe score`'s series summary (`aggregate_series`: the highest
    slice score); a lone single-frame file is its own series.
    """
    from iqe.runtime.volumes import aggregate_series

    rows = [r.to_json() for r in results]
    slices: list[SliceScore] = []
    frames_of: dict[str | None, int] = {}
    for i, (r, row) in enumerate(zip(results, rows)):
        sop = r.extra.get("SOPInstanceUID")
        frames_of[sop] = frames_of.get(sop, 0) + 1
        index = r.extra.get("slice")
        slices.append(SliceScore(
            index=int(index) if index is not None else i, key=r.path, sop_uid=sop,
            frame=frames_of[sop] - 1,  # rows of one instance are its frames, in order
            scores=r.scores if r.error is None else None, error=r.error, map=r.map_smooth, image=r.image,
            calibration={k: row[k] for k in CALIBRATION_FIELDS if row.get(k) is not None}))
    for s in slices:  # single-frame instances carry no frame number
        if frames_of[s.sop_uid] == 1:
            s.frame = None
    summaries = aggregate_series(rows)
    if summaries:
        score, argmax = summaries[0]["score"], summaries[0]["argmax_slice"]
    else:
        ok = [s for s in slices if math.isfinite(s.score)]
        score, argmax = (ok[0].score, ok[0].index) if ok else (None, None)
    out = SeriesScore(slices, score, argmax)
    decisions = [s.calibration["decision"] for s in slices if "decision" in s.calibration]
    if decisions:  # a series is abnormal when any slice is
        out.decision = "abnormal" if "abnormal" in decisions else "normal"
        calibrated = [s.calibration["calibrated_score"] for s in slices if "calibrated_score" in s.calibration]
        out.calibrated_score = max(calibrated) if calibrated else None
        out.operating_point = next((s.calibration["operating_point"] for s in slices
                                    if "operating_point" in s.calibration), None)
    return out
