"""A scored series -> DICOM results written with highdicom, plus the JSON result.

    build_sr(...)        Comprehensive 3D SR, TID 1500 measurement report
    build_pm(...)        Parametric Map of the anomaly map (one frame per scored slice)
    build_overlays(...)  Secondary Capture: colour map on the slice, score and "not for diagnostic use" burned in
    series_json(...)     the JSON result of one series

All objects belong to the source study, each in a new series, and reference the source
instances. UIDs are derived from the result job (series + instance set + model) under
the configured root, so producing the results again after a crash gives the same
instances, and a PACS that already has them sees duplicates, not new results.

No standard code exists for an anomaly score, so the SR uses a private coding scheme
(`IQE_SCHEME`, designator "99IQE"); the decision values use SNOMED CT's normal/abnormal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from iqe.node.runtime_adapter import ModelIdentity, SeriesScore, SliceScore

IQE_SCHEME = "99IQE"
MANUFACTURER = "iqe-engine"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
SERIES_DESCRIPTION_PREFIX = "IQE"  # our result series start with it; the node and plugin never score them


def _code(value: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=IQE_SCHEME, meaning=meaning)


# Private concepts (value, meaning); test code reads SRs by these values.
ANOMALY_SCORE = ("IQE0001", "Anomaly score")
SERIES_ANOMALY_SCORE = ("IQE0002", "Series anomaly score")
CALIBRATED_SCORE = ("IQE0003", "Calibrated anomaly score")
DECISION = ("IQE0004", "Anomaly decision")
OPERATING_THRESHOLD = ("IQE0005", "Operating point threshold")
ANOMALY_DETECTION = ("IQE0010", "Zero/few-shot anomaly detection")


@dataclass(frozen=True)
class ResultContext:
    """Everything a result object needs besides the scores."""

    job: str  # result job name: series UID + instance-set digest (seeds the result UIDs)
    uid_root: str
    series_number: int  # SR series; PM +1, SC +2
    model: ModelIdentity
    software_version: str

    def uid(self, *parts: object) -> str:
        return generate_uid(prefix=self.uid_root, entropy_srcs=[self.job, self.model.bundle_sha256,
                                                                *map(str, parts)])


def _equipment(ctx: ResultContext) -> list:
    """Contributing Equipment: the model (name, bundle hash) and software that made the object."""
    import highdicom as hd

    return [hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=ctx.model.label, software_versions=ctx.software_version,
        device_serial_number=ctx.model.bundle_sha256[:16],
        contribution_description=f"anomaly detection, {ctx.model.backend} {ctx.model.precision}; "
                                 f"{NOT_FOR_DIAGNOSTIC_USE.lower()}")]


def _algorithm(ctx: ResultContext):
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(
        name=ctx.model.label, version=ctx.model.bundle_sha256[:16],
        parameters=[f"bundle_sha256={ctx.model.bundle_sha256}", f"backend={ctx.model.backend}",
                    f"precision={ctx.model.precision}", f"image_size={ctx.model.image_size}"])


def _source_image(ds: Dataset, frame: int | None, kind):
    args = {"referenced_sop_class_uid": ds.SOPClassUID, "referenced_sop_instance_uid": ds.SOPInstanceUID}
    if frame is not None:
        args["referenced_frame_numbers"] = [frame + 1]
    return kind(**args)


def build_sr(sources: dict[str, Dataset], result: SeriesScore, ctx: ResultContext) -> Dataset:
    """Comprehensive 3D SR: TID 1500 with the series score, per-slice scores, decision, model identity.

    Args:
        sources: source data sets (headers suffice) by SOP Instance UID.
        result: the series' scores.
        ctx: job, UID root, series number, model identity.
    """
    import highdicom as hd

    algorithm = _algorithm(ctx)
    unit = codes.UCUM.NoUnits
    first = next(iter(sources.values()))
    measurements = []
    if result.score is not None:
        measurements.append(hd.sr.Measurement(name=_code(*SERIES_ANOMALY_SCORE), value=result.score, unit=unit,
                                              algorithm_id=algorithm))
    if result.calibrated_score is not None:
        measurements.append(hd.sr.Measurement(name=_code(*CALIBRATED_SCORE), value=result.calibrated_score,
                                              unit=unit, algorithm_id=algorithm))
    threshold = (result.operating_point or {}).get("threshold")
    if isinstance(threshold, (int, float)):
        measurements.append(hd.sr.Measurement(name=_code(*OPERATING_THRESHOLD), value=float(threshold),
                                              unit=unit, algorithm_id=algorithm))
    for s in result.slices:
        if s.sop_uid not in sources or not np.isfinite(s.score):
            continue
        ref = _source_image(sources[s.sop_uid], s.frame, hd.sr.SourceImageForMeasurement)
        measurements.append(hd.sr.Measurement(name=_code(*ANOMALY_SCORE), value=s.score, unit=unit,
                                              algorithm_id=algorithm, referenced_images=[ref]))
    evaluations = []
    if result.decision is not None:
        value = (hd.sr.CodedConcept("263654008", "SCT", "Abnormal") if result.decision == "abnormal"
                 else hd.sr.CodedConcept("17621005", "SCT", "Normal"))
        evaluations.append(hd.sr.QualitativeEvaluation(name=_code(*DECISION), value=value))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=ctx.uid("tracking"),
                                                     identifier=f"IQE anomaly series {first.SeriesInstanceUID}"),
        algorithm_id=algorithm, measurements=measurements or None, qualitative_evaluations=evaluations or None,
        source_images=[_source_image(ds, None, hd.sr.SourceImageForMeasurementGroup) for ds in sources.values()])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.uid("device"), name="iqe-node", manufacturer_name=MANUFACTURER,
            model_name=ctx.model.label))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code(*ANOMALY_DETECTION), imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources.values()), content=report, series_instance_uid=ctx.uid("sr-series"),
        series_number=ctx.series_number, sop_instance_uid=ctx.uid("sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        contributing_equipment=_equipment(ctx))
    sr.SeriesDescription = f"{SERIES_DESCRIPTION_PREFIX} anomaly report ({NOT_FOR_DIAGNOSTIC_USE.lower()})"
    sr.SoftwareVersions = ctx.software_version
    return sr


def _resize(values: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A display-frame map/image [S, S] -> the source matrix [rows, cols] (bilinear)."""
    img = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    return np.asarray(img.resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)


def _scored(sources: dict[str, Dataset], result: SeriesScore) -> list[SliceScore]:
    return [s for s in result.slices if s.map is not None and s.sop_uid in sources and np.isfinite(s.score)]


def build_pm(sources: dict[str, Dataset], result: SeriesScore, ctx: ResultContext) -> Dataset | None:
    """Parametric Map of the (smoothed) anomaly map on the source matrix; None when nothing was scored.

    Frames follow the source images (one per scored slice / frame), so viewers
    overlay it on the series. Values are the model's map, unit-less.
    """
    import highdicom as hd

    slices = _scored(sources, result)
    if not slices:
        return None
    first = sources[str(slices[0].sop_uid)]
    rows, cols = int(first.Rows), int(first.Columns)
    frames = np.stack([_resize(s.map, rows, cols) for s in slices]).astype(np.float32)
    multi = any(s.frame is not None for s in slices)
    images = [sources[str(s.sop_uid)] for s in slices] if not multi else [first]
    lo, hi = float(frames.min()), float(frames.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="IQE_ANOMALY", lut_explanation=ctx.model.map_description, unit=codes.UCUM.NoUnits,
        value_range=(lo, hi if hi > lo else lo + 1.0), slope=1.0, intercept=0.0)
    pm = hd.pm.ParametricMap(
        source_images=images, pixel_array=frames, series_instance_uid=ctx.uid("pm-series"),
        series_number=ctx.series_number + 1, sop_instance_uid=ctx.uid("pm"), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=ctx.model.label,
        software_versions=ctx.software_version, device_serial_number=ctx.model.bundle_sha256[:16],
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.content.VOILUTTransformation(window_center=(lo + hi) / 2,
                                                                   window_width=max(hi - lo, 1e-6))],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label="IQE_ANOMALY", content_description="anomaly map, not for diagnostic use",
        contributing_equipment=_equipment(ctx))
    pm.SeriesDescription = f"{SERIES_DESCRIPTION_PREFIX} anomaly map ({NOT_FOR_DIAGNOSTIC_USE.lower()})"
    return pm


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def overlay_pixels(s: SliceScore, series_score: float | None, rows: int, cols: int, lo: float, hi: float
                   ) -> np.ndarray:
    """RGB uint8 [rows, cols, 3]: the slice in grey, the map in colour, score and disclaimer burned in."""
    from iqe.runtime.overlay import colorize

    gray = _resize(np.asarray(s.image).mean(axis=0), rows, cols).clip(0, 1)
    heat = (_resize(s.map, rows, cols) - lo) / max(hi - lo, 1e-12)
    blend = 0.55 * np.repeat(gray[..., None] * 255, 3, axis=2) + 0.45 * colorize(heat).astype(np.float32)
    img = Image.fromarray(blend.clip(0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    size = max(6, min(rows // 28, cols // 20))  # the longer line fits the width
    font = _font(size)
    text = f"score {s.score:.4f}"
    if series_score is not None:
        text += f" | series {series_score:.4f}"
    for y, line, colour in ((2, text, (255, 255, 255)), (rows - size - 4, NOT_FOR_DIAGNOSTIC_USE, (255, 64, 64))):
        draw.rectangle([0, y, cols, y + size + 2], fill=(0, 0, 0))
        draw.text((2, y), line, fill=colour, font=font)
    return np.asarray(img)


def _patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation (row, column directions) from ImageOrientationPatient; axial when absent."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # (negative, positive) end of each LPS axis
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

    def letter(v: list[float]) -> str:
        axis = int(np.argmax(np.abs(v)))
        return letters[axis][v[axis] > 0]

    return letter(iop[:3]), letter(iop[3:])


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return (float(spacing[0]), float(spacing[1])) if spacing else None


def build_overlays(sources: dict[str, Dataset], result: SeriesScore, ctx: ResultContext, which: str = "all"
                   ) -> list[Dataset]:
    """Secondary Capture overlays (burned-in annotation) for every scored slice, or only the highest."""
    import highdicom as hd

    slices = _scored(sources, result)
    if which == "none" or not slices:
        return []
    if which == "max":
        slices = [s for s in slices if s.index == result.argmax_slice][:1] or slices[:1]
    lo = min(float(np.min(s.map)) for s in slices)
    hi = max(float(np.max(s.map)) for s in slices)
    out: list[Dataset] = []
    for n, s in enumerate(slices, start=1):
        ref = sources[str(s.sop_uid)]
        rows, cols = int(ref.Rows), int(ref.Columns)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref, pixel_array=overlay_pixels(s, result.score, rows, cols, lo, hi),
            photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
            patient_orientation=_patient_orientation(ref),
            pixel_spacing=_pixel_spacing(ref),  # type: ignore[arg-type]  # highdicom annotates ints; spacing is mm
            series_instance_uid=ctx.uid("sc-series"), series_number=ctx.series_number + 2,
            sop_instance_uid=ctx.uid("sc", s.index), instance_number=n, manufacturer=MANUFACTURER,
            transfer_syntax_uid=ExplicitVRLittleEndian, contributing_equipment=_equipment(ctx))
        sc.BurnedInAnnotation = "YES"
        sc.SeriesDescription = f"{SERIES_DESCRIPTION_PREFIX} anomaly overlay ({NOT_FOR_DIAGNOSTIC_USE.lower()})"
        sc.ImageComments = f"IQE anomaly score {s.score:.6f}; {NOT_FOR_DIAGNOSTIC_USE}"
        src = Dataset()
        src.ReferencedSOPClassUID, src.ReferencedSOPInstanceUID = ref.SOPClassUID, ref.SOPInstanceUID
        if s.frame is not None:
            src.ReferencedFrameNumber = s.frame + 1
        sc.SourceImageSequence = [src]
        out.append(sc)
    return out


def series_json(series_uid: str, study_uid: str, result: SeriesScore, ctx: ResultContext,
                objects: dict[str, list[str]], errors: list[str]) -> dict[str, Any]:
    """The JSON result of one series (one entry of the study's JSON file)."""
    return {
        "series_uid": series_uid, "study_uid": study_uid, "job": ctx.job,
        "score": result.score, "argmax_slice": result.argmax_slice,
        "decision": result.decision, "calibrated_score": result.calibrated_score,
        "operating_point": result.operating_point,
        "slices": [{"index": s.index, "sop_instance_uid": s.sop_uid, "frame": s.frame,
                    **({k: v for k, v in s.scores.items()} if s.scores else {}),
                    **s.calibration, **({"error": s.error} if s.error else {})} for s in result.slices],
        "errors": errors, "model": ctx.model.as_dict(), "results": objects,
        "note": f"{NOT_FOR_DIAGNOSTIC_USE}: research output of an anomaly detector",
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=float)
