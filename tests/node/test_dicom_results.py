"""Result objects without a model: SR content, Parametric Map values and SC pixels on analytic inputs."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from iqe.bench.data import write_dicom_series
from iqe.node.dicom_results import ResultContext, build_overlays, build_pm, build_sr
from iqe.node.runtime_adapter import ModelIdentity, summarize
from iqe.runtime.overlay import colorize
from iqe.runtime.results import ItemResult

MODEL = ModelIdentity("tiny", "ab" * 10, "torch", "fp32", 240)
SCORES = [0.25, 0.75, 0.5]
MAP_LEVELS = [0.1, 0.3, 0.2]  # constant maps: resizing leaves them constant, so PM values are known exactly


@pytest.fixture
def series(tmp_path):
    paths = write_dicom_series(tmp_path / "ct", 3, size=32)
    sources = {str((ds := pydicom.dcmread(p, stop_before_pixels=True)).SOPInstanceUID): ds for p in paths}
    results = []
    for i, (sop, score, level) in enumerate(zip(sources, SCORES, MAP_LEVELS)):
        extra = {"series": "s", "slice": i, "SOPInstanceUID": sop, "calibrated_score": score / 2,
                 "decision": "abnormal" if score > 0.6 else "normal", "operating_point": {"threshold": 0.3}}
        results.append(ItemResult(path=f"s#{i}", scores={"score": score}, extra=extra,
                                  map=np.full((24, 24), level, np.float32),
                                  map_smooth=np.full((24, 24), level, np.float32),
                                  image=np.full((3, 24, 24), 0.5, np.float32)))
    ctx = ResultContext("job", "1.2.826.0.1.3680043.8.498.", 9900, MODEL, "test")
    return sources, summarize(results), ctx


def _content(items, out):
    for item in items:
        out.append(item)
        _content(item.get("ContentSequence", []), out)
    return out


def test_summary_takes_series_score_and_calibration_from_rows(series):
    _, result, _ = series
    assert result.score == 0.75 and result.argmax_slice == 1  # highest slice, as iqe score's series.jsonl
    assert result.decision == "abnormal"  # one abnormal slice makes the series abnormal
    assert result.calibrated_score == pytest.approx(0.375)
    assert result.operating_point == {"threshold": 0.3}


def test_sr_holds_scores_decision_operating_point_and_model(series):
    sources, result, ctx = series
    sr = build_sr(sources, result, ctx)
    items = _content(sr.ContentSequence, [])
    nums = {}
    for item in items:
        if item.ValueType == "NUM":
            code = item.ConceptNameCodeSequence[0]
            assert code.CodingSchemeDesignator == "99IQE"
            nums.setdefault(code.CodeValue, []).append(float(item.MeasuredValueSequence[0].NumericValue))
    assert nums == {"IQE0002": [0.75], "IQE0003": [0.375], "IQE0005": [0.3], "IQE0001": SCORES}
    (decision,) = [i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "IQE0004"]
    assert decision.ConceptCodeSequence[0].CodeValue == "263654008"  # SNOMED CT: abnormal
    params = {i.TextValue for i in items if i.ValueType == "TEXT"}
    assert {"bundle_sha256=" + "ab" * 10, "backend=torch", "precision=fp32"} <= params
    assert sr.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    assert build_sr(sources, result, ctx).SOPInstanceUID == sr.SOPInstanceUID  # same job -> same UID
    equipment = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "iqe-engine"]
    assert equipment[0].DeviceSerialNumber == ("ab" * 10)[:16]


def test_parametric_map_frames_follow_the_source_slices(series):
    sources, result, ctx = series
    pm = build_pm(sources, result, ctx)
    frames = pm.pixel_array
    assert frames.shape == (3, 32, 32)  # the source matrix, one frame per slice
    # highdicom orders frames along the stack; each frame must hold the map of the slice it references.
    refs = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in pm.PerFrameFunctionalGroupsSequence]
    assert sorted(refs) == sorted(sources)
    level_of = dict(zip(sources, MAP_LEVELS))
    for frame, ref in zip(frames, refs):
        np.testing.assert_allclose(frame, level_of[ref], rtol=1e-6)


def test_overlay_pixels_blend_slice_and_map(series):
    sources, result, ctx = series
    overlays = build_overlays(sources, result, ctx, "all")
    assert len(overlays) == 3 and build_overlays(sources, result, ctx, "max")[0].InstanceNumber == 1
    px = overlays[0].pixel_array
    # Grey 0.5 everywhere; maps range over 0.1..0.3, slice 0 sits at the bottom (colour map at 0).
    expected = 0.55 * 0.5 * 255 + 0.45 * colorize(np.zeros(1))[0].astype(np.float32)
    np.testing.assert_allclose(px[16, 16], expected, atol=1.0)
    assert overlays[0].BurnedInAnnotation == "YES"
    assert overlays[0].SourceImageSequence[0].ReferencedSOPInstanceUID == list(sources)[0]
