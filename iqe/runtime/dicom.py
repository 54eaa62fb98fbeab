"""DICOM files and series -> model inputs; a series -> a volume with its affine.

Intensity path per frame (one formula, `iqe.runtime.transforms.voi_to_uint8`):
pixel data -> Modality LUT (rescale) -> VOI: an override window if given for the
modality, else the file's VOI LUT or window (its VOI LUT Function), else for 8-bit
greyscale the full stored range (so an 8-bit DICOM maps like its PNG twin), else the
modality default (`DEFAULT_WINDOWS`: CT 40/400), else the 0.5-99.5 percentile range ->
MONOCHROME1 inverted. Colour (RGB, YBR decoded to RGB, palette) passes through, scaled
to 8 bits from its bit depth.

Enhanced multi-frame objects (Enhanced / Legacy Converted Enhanced CT, MR, ...) keep
rescale, window and geometry per frame in functional groups (PS3.3 C.7.6.16): the
modality values of a frame come from highdicom (`highdicom.Image.get_frame`, which
applies the frame's Pixel Value Transformation), the frame's window and position from
its Frame VOI LUT / Plane Position / Plane Orientation groups (per-frame, else shared),
and frames are ordered along the slice normal like the files of a series. Frames are
decoded one at a time, so a long multi-frame file never sits in memory whole.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels import pixel_array as decode_frame
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from iqe.errors import InputError
from iqe.model.preprocess import IMAGE_SUFFIXES
from iqe.runtime.items import (
    FILE_ERRORS,
    NIFTI_SUFFIXES,
    SliceItem,
    Source,
    describe,
    fallback_window,
    to_model_input,
    window_for,
)
from iqe.runtime.transforms import Window, range_window

_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Functional group sequences (PS3.3 C.7.6.16.2) -> the attributes they carry per frame.
_FRAME_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation"),
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
}
_GROUP_SEQUENCES = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")


@dataclass
class SeriesVolume:
    """A DICOM series stacked for writing NIfTI (nibabel layout).

    Attributes:
        volume: float32 [columns, rows, slices] of modality values (HU for CT);
            ``volume[:, :, k]`` is slice k of `iter_slices` transposed.
        affine: 4x4 float64, voxel (column, row, slice) -> RAS millimetres.
        files: the slice files in volume order.
        series_uid: SeriesInstanceUID.
    """

    volume: np.ndarray
    affine: np.ndarray
    files: tuple[Path, ...]
    series_uid: str


def geometry(ds: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """(ImagePositionPatient, slice normal) or None when either attribute is missing or malformed."""
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if ipp.shape != (3,) or iop.shape != (6,):
        return None
    normal = np.cross(iop[:3], iop[3:])
    return ipp, normal


def instance_number(ds: Dataset) -> int | None:
    try:
        return int(ds.InstanceNumber)
    except (AttributeError, TypeError, ValueError):
        return None


def read_dicom(path: Path, header_only: bool) -> Dataset:
    """dcmread that also accepts raw data sets (no preamble, no file meta) when that is safe.

    ``force=True`` makes pydicom parse any bytes, so it is used only when the file starts
    with a tag of group 0002 or 0008 (either byte order), as data sets written without
    file meta do. A transfer syntax missing from the file meta is set from the encoding
    pydicom detected, so the pixel data can be decoded.

    Raises:
        InputError: the file is neither DICOM nor a raw data set.
        Any of `FILE_ERRORS`: pydicom could not parse it.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        with open(path, "rb") as fh:
            head = fh.read(2)
        groups = {int.from_bytes(head, "little"), int.from_bytes(head, "big")} if len(head) == 2 else set()
        if not groups & {0x0002, 0x0008}:
            raise InputError(f"{path}: not DICOM (no DICM marker, no data set at byte 0) and not an image or "
                             f"NIfTI file ({', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)})") from None
        ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            raise InputError(f"{path}: no transfer syntax and pydicom could not detect the encoding")
        if not hasattr(ds, "file_meta"):
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                                          else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds




# ----------------------------------------------------------------------------- frames


def is_enhanced(ds: Dataset) -> bool:
    """True when the data set keeps per-frame attributes in functional groups (enhanced multi-frame)."""
    return any(k in ds for k in _GROUP_SEQUENCES)


def frame_header(ds: Dataset, frame: int) -> Dataset:
    """The header as it applies to one frame: functional group attributes lifted to the top level.

    For an enhanced multi-frame data set, the attributes of `_FRAME_GROUPS` are taken
    from the frame's item of the Per-frame Functional Groups Sequence, else from the
    Shared Functional Groups, and set on a shallow copy of the top level (pixel data and
    the group sequences left out), so the code that reads a classic header (window,
    geometry, metadata) reads the frame's. A classic data set comes back as it is.
    """
    if not is_enhanced(ds):
        return ds
    flat = Dataset()
    skip = set(_GROUP_SEQUENCES) | set(_PIXEL_DATA)
    for element in ds:
        if element.keyword not in skip:
            flat.add(element)
    flat.file_meta = ds.file_meta
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for sequence, keywords in _FRAME_GROUPS.items():
        item = next((g.get(sequence)[0] for g in groups if g.get(sequence)), None)
        if item is not None:
            for keyword in keywords:
                if keyword in item:
                    flat.add(item[keyword])
    return flat


def _frame_order(ds: Dataset, frames: int) -> tuple[list[int], str]:
    """Frames in volume order: per-frame positions projected on the normal, else as stored."""
    if frames == 1 or not is_enhanced(ds):
        return list(range(frames)), "stored frame order"
    placed = [geometry(frame_header(ds, f)) for f in range(frames)]
    if any(g is None for g in placed):
        return list(range(frames)), "stored frame order"
    normal = placed[0][1]  # type: ignore[index]
    order = sorted(range(frames), key=lambda f: (float(np.dot(placed[f][0], normal)), f))  # type: ignore[index]
    return order, "ImagePositionPatient"


def iter_dicom_series(source: Source, size: int, windows: Mapping[str, Window],
                      skip: Container[str] = ()) -> Iterator[SliceItem]:
    """The files of a series in volume order; index = running slice index (frames count)."""
    index = 0
    for path in source.files:
        for item in iter_dicom_file(source, path, index, size, windows, skip):
            item.meta["ordered_by"] = source.ordered_by
            index += 1
            yield item


def iter_dicom_file(source: Source, path: Path, first_index: int | None, size: int,
                    windows: Mapping[str, Window], skip: Container[str] = ()) -> Iterator[SliceItem]:
    """One DICOM file -> one item per frame, in volume order, each frame decoded on its own.

    `first_index` None: a standalone file (key = path, ``path#frame`` when multi-frame,
    frame = the stored frame number from 0, index = its place in volume order).
    Otherwise a series member (key = ``SeriesInstanceUID#index``).
    """
    file = str(path)

    def name_of(frame: int, position: int, frames: int) -> tuple[str, int | None, str]:
        """(key, index, label for messages) of a frame."""
        if first_index is None:
            if frames == 1:
                return file, None, file
            return f"{path}#{frame}", position, f"{path} (frame {frame})"
        i = first_index + position
        return f"{source.series_uid}#{i}", i, f"{path} (series {source.series_uid}, slice {i})"

    key, index, label = name_of(0, 0, 1)
    try:
        ds = read_dicom(path, header_only=False)
        frames = _frame_count(ds)
        meta = _dicom_meta(ds)
        reason = _not_decodable(ds)
    except InputError as exc:
        yield SliceItem(key, source.name, index, error=str(exc), file=file)
        return
    except FILE_ERRORS as exc:
        yield SliceItem(key, source.name, index, error=f"{label}: cannot read DICOM file ({describe(exc)})", file=file)
        return
    if reason is None:
        try:
            reason = _implausible_size(ds, frames)
        except FILE_ERRORS as exc:
            reason = f"cannot read the image size ({describe(exc)})"
    if reason is not None:
        yield SliceItem(key, source.name, index, error=f"{label}: {reason}", meta=meta, file=file)
        return
    try:
        order, ordered_by = _frame_order(ds, frames)
        reader = _FrameReader(ds, frames)
    except FILE_ERRORS as exc:
        yield SliceItem(key, source.name, index, error=f"{label}: cannot read the frames ({describe(exc)})",
                        meta=meta, file=file)
        return
    for position, frame in enumerate(order):
        key, index, label = name_of(frame, position, frames)
        if key in skip:  # done in an earlier run: not decoded again
            yield SliceItem(key, source.name, index, file=file)
            continue
        frame_meta = dict(meta, frame=frame, frames=frames)
        try:
            header = frame_header(ds, frame)
            if header is not ds:
                frame_meta.update(_dicom_meta(header))
                frame_meta["frame_order"] = ordered_by
            pixels = reader.stored(frame)
        except FILE_ERRORS as exc:
            yield SliceItem(key, source.name, index, meta=frame_meta, file=file,
                            error=f"{label}: cannot decode pixel data ({describe(exc)}){_codec_hint(ds)}")
            continue
        try:
            image, frame_meta["window"] = _display(pixels, header, reader, frame, windows, size)
        except FILE_ERRORS as exc:
            yield SliceItem(key, source.name, index, meta=frame_meta, file=file,
                            error=f"{label}: cannot apply the header's LUTs ({describe(exc)})")
            continue
        yield SliceItem(key, source.name, index, image=image, meta=frame_meta, file=file)


class _FrameReader:
    """Decodes one frame at a time; modality values of enhanced frames through highdicom."""

    def __init__(self, ds: Dataset, frames: int) -> None:
        self.ds, self.frames = ds, frames
        self.photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        self._hd = None
        if is_enhanced(ds) and self.photometric.startswith("MONOCHROME"):
            import highdicom

            try:
                self._hd = highdicom.Image.from_dataset(ds, copy=False)
            except FILE_ERRORS:  # highdicom refuses it: pydicom on the frame's flattened header does the same math
                self._hd = None

    def stored(self, frame: int) -> np.ndarray:
        """Stored values of one frame: HxW (greyscale) or HxWx3 (colour).

        Raises:
            ValueError: the decoded frame has another shape (a malformed header).
            RuntimeError: the decoder crashed.
            Any of `FILE_ERRORS`: pydicom could not decode it.
        """
        try:
            pixels = decode_frame(self.ds, index=frame if self.frames > 1 else None)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except FILE_ERRORS:
            raise
        except BaseException as exc:  # noqa: BLE001  a native decoder crashed (e.g. a Rust panic): this frame fails
            raise RuntimeError(f"decoder crashed: {describe(exc)}") from None
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[..., 0]
        colour = not self.photometric.startswith("MONOCHROME") and self.photometric != "PALETTE COLOR"
        if pixels.ndim != (3 if colour else 2) or (colour and pixels.shape[2] != 3):
            raise ValueError(f"decoded frame has shape {pixels.shape}, expected "
                             f"{'rows x columns x 3' if colour else 'rows x columns'} for {self.photometric}")
        return pixels

    def modality_values(self, pixels: np.ndarray, header: Dataset, frame: int) -> np.ndarray:
        """The frame's values after the Modality LUT / Pixel Value Transformation."""
        if self._hd is not None:
            try:
                return self._hd.get_frame(frame, as_index=True, apply_real_world_transform=False,
                                          apply_modality_transform=None, apply_voi_transform=False,
                                          apply_presentation_lut=False, apply_palette_color_lut=False,
                                          apply_icc_profile=False)
            except FILE_ERRORS:
                pass  # e.g. a damaged per-frame item: the flattened header below gives the frame's rescale
        return apply_modality_lut(pixels, header)


def _display(pixels: np.ndarray, header: Dataset, reader: _FrameReader, frame: int,
             windows: Mapping[str, Window], size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One decoded frame -> (model input, record of the window applied), by the module's intensity path."""
    photometric = reader.photometric
    if not photometric.startswith("MONOCHROME"):
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, header)
            bits = 8 * pixels.dtype.itemsize  # the palette's entries are 8 or 16 bit
        else:  # RGB, or YBR that pydicom already converted to RGB
            bits = int(header.get("BitsStored", 8 * pixels.dtype.itemsize))
        return to_model_input(pixels, range_window(0.0, 2.0 ** bits - 1), f"{bits}-bit colour", "RGB", size,
                              function="LINEAR_EXACT")

    modality = str(header.get("Modality", "") or "").upper()
    values = reader.modality_values(pixels, header, frame)
    override, label = window_for(modality, windows)
    if override is not None:
        return to_model_input(values, override, label or "", photometric, size)
    lut = _file_voi_lut(values, header)
    if lut is not None:
        display, lo, hi = lut
        image, _ = to_model_input(display, range_window(lo, hi), "", photometric, size, function="LINEAR_EXACT")
        return image, {"center": None, "width": None, "function": None, "source": "file VOI LUT"}
    file_window = _file_window(header)
    if file_window is not None:
        window, function = file_window
        return to_model_input(values, window, f"file window ({function})", photometric, size, function=function)
    full = _eight_bit_range(header)
    if full is not None:
        return to_model_input(values, range_window(*full), "8-bit full range", photometric, size,
                              function="LINEAR_EXACT")
    default, source = fallback_window(modality)
    return to_model_input(values, default, source, photometric, size)


def _file_window(header: Dataset) -> tuple[Window, str] | None:
    """The header's first window ``(center, width)`` and its VOI LUT Function, or None (absent or unusable)."""
    if header.get("WindowCenter") is None or header.get("WindowWidth") is None:
        return None
    try:
        center, width = float(_first(header.WindowCenter)), float(_first(header.WindowWidth))
        function = str(header.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    except FILE_ERRORS:
        return None
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        return None  # e.g. width 0: the modality default applies
    return (center, width), function


def _file_voi_lut(values: np.ndarray, header: Dataset) -> tuple[np.ndarray, float, float] | None:
    """The header's VOI LUT Sequence applied by pydicom: (display values, their output range), or None.

    The output range (mapped onto 0..255) is found by passing every LUT index through the
    same call. An unusable LUT is ignored, so the window or the modality default applies.
    """
    lut_items = header.get("VOILUTSequence")
    try:
        if not (lut_items and all(lut_items[0].get(k) is not None for k in ("LUTDescriptor", "LUTData"))):
            return None
        entries, first = int(lut_items[0].LUTDescriptor[0]) or 2 ** 16, int(lut_items[0].LUTDescriptor[1])
        display = apply_voi_lut(values, header, prefer_lut=True)
        limits = apply_voi_lut(np.arange(first, first + entries), header, prefer_lut=True)
    except FILE_ERRORS:
        return None
    return display, float(limits.min()), float(limits.max())


def _eight_bit_range(header: Dataset) -> tuple[float, float] | None:
    """For greyscale of at most 8 stored bits: the stored range after the Modality LUT, else None.

    Such an image is display-ready (a screenshot, a secondary capture, an 8-bit PNG
    converted to DICOM): shown over its full range it maps exactly like the PNG path,
    where a percentile stretch would change its grey levels.
    """
    try:
        bits = int(header.get("BitsStored", 16))
        signed = int(header.get("PixelRepresentation", 0)) == 1
    except FILE_ERRORS:
        return None
    if bits > 8 or bits < 1:
        return None
    stored = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2 ** bits - 1])
    try:
        ends = np.asarray(apply_modality_lut(stored, header), dtype=np.float64)
    except FILE_ERRORS:
        return None
    return float(ends.min()), float(ends.max())

def _not_decodable(ds: Dataset) -> str | None:
    """Why this data set gives no image here, or None when pydicom can decode it."""
    if not any(k in ds for k in _PIXEL_DATA):
        # A DICOMDIR names its SOP Class only in the file meta.
        sop = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        sop_name = sop.name if sop else "unknown"
        hint = "; file truncated?" if "Image Storage" in sop_name else ""
        return f"not an image (SOP Class {sop_name}): no Pixel Data{hint}"
    ts = ds.file_meta.TransferSyntaxUID
    if not ts.is_transfer_syntax:
        return f"unknown transfer syntax {ts}"
    if not ts.is_compressed:
        return None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"unsupported transfer syntax {ts.name} ({ts}): pydicom has no decoder for it"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        return (f"unsupported transfer syntax {ts.name} ({ts}): no decoder installed ({missing}); "
                f"reinstall iqe-engine, whose default dependencies include pylibjpeg and its plugins")
    return None


def _codec_hint(ds: Dataset) -> str:
    """The near miss when an installed decoder failed: a missing pylibjpeg plugin may decode it (e.g. 12-bit JPEG)."""
    try:
        ts = ds.file_meta.TransferSyntaxUID
        missing = [d for d in get_decoder(ts).missing_dependencies if d.startswith("pylibjpeg")] \
            if ts.is_compressed else []
    except (NotImplementedError, AttributeError, ValueError):
        return ""
    return f"; other decoders: {'; '.join(missing)} (default dependencies of iqe-engine)" if missing else ""


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


MAX_FRAME_PIXELS = 2 ** 28  # larger frames are refused: no scanner writes them, a damaged header does


def _implausible_size(ds: Dataset, frames: int) -> str | None:
    """Why the header's size cannot be right for the pixel data it carries, or None.

    Checked before decoding, so a damaged header (huge Rows, NumberOfFrames) ends in one
    clear error instead of a giant allocation or millions of failing frames.
    """
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 0) or 0)
    except FILE_ERRORS:
        return "Rows, Columns, SamplesPerPixel or BitsAllocated is not a number"
    if rows < 1 or columns < 1 or samples < 1:
        return f"image size {rows} x {columns} x {samples} samples is empty"
    if rows * columns * samples > MAX_FRAME_PIXELS:
        return f"image size {rows} x {columns} x {samples} samples is implausibly large (damaged header?)"
    data = next((ds[k] for k in _PIXEL_DATA if k in ds), None)
    size = len(data.value or b"") if data is not None else 0
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        if frames > max(1, size // 8):  # every frame needs at least one fragment with its 8-byte item header
            return f"NumberOfFrames {frames} cannot fit in {size} bytes of compressed pixel data"
        return None
    needed = (rows * columns * samples * max(bits, 1) * frames + 7) // 8
    if data is not None and data.keyword == "PixelData" and needed > size + 1:  # +1: odd lengths are padded
        return (f"pixel data holds {size} bytes, {frames} frame(s) of {rows} x {columns} x {samples} samples "
                f"at {bits} bits need {needed}; file truncated?")
    return None


def _first(value: Any) -> Any:
    """First value of a multi-valued element (WindowCenter may list several windows)."""
    return value[0] if isinstance(value, (MultiValue, list, tuple)) else value


_META_KEYWORDS = ("Modality", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                  "SeriesNumber", "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient",
                  "PixelSpacing", "SliceThickness", "PhotometricInterpretation", "Rows", "Columns",
                  "BodyPartExamined")


def _dicom_meta(ds: Dataset) -> dict[str, Any]:
    """JSON-friendly identifying and geometric attributes; no patient identity on purpose."""
    meta: dict[str, Any] = {"format": "dicom", "modality": str(ds.get("Modality", "") or "") or None,
                            "transfer_syntax": str(ds.file_meta.TransferSyntaxUID)}
    for keyword in _META_KEYWORDS:
        try:
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            meta[keyword] = [_plain(v) for v in value] if isinstance(value, MultiValue) else _plain(value)
        except FILE_ERRORS:  # malformed value in the header: leave it out
            continue
    placed = geometry(ds)
    if placed is not None:
        meta["slice_position"] = float(np.dot(*placed))
    return meta


def _plain(value: Any) -> Any:
    """pydicom value -> int / float / str (DS is a float subclass, IS an int subclass)."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def read_series_volume(source: Source) -> SeriesVolume:
    """Stack a DICOM series (or a single-frame DICOM file) into a volume with its affine.

    Values are after the Modality LUT (HU for CT), without VOI. The affine follows the
    DICOM -> NIfTI formula (nibabel's DICOM orientation notes): columns are the row
    direction x column spacing, the column direction x row spacing, the step between
    first and last slice / (n - 1), and the first ImagePositionPatient; LPS is flipped
    to RAS. MONAI's `PydicomReader` is not used: it orders slices by InstanceNumber and
    takes the slice step from z alone, wrong for sagittal or oblique stacks.

    Args:
        source: a ``dicom_series`` or ``dicom`` source from `discover`.

    Returns:
        The volume, in the slice order `iter_slices` uses.

    Raises:
        InputError: not a DICOM source; a slice cannot be decoded, is multi-frame or
            colour, lacks position/orientation/spacing, differs in shape; or the slice
            spacing is uneven (a missing slice) or zero (duplicated positions).
    """
    if source.kind not in ("dicom", "dicom_series"):
        raise InputError(f"{source.name}: not a DICOM series (kind {source.kind})")
    values: list[np.ndarray] = []
    geometries: list[tuple[np.ndarray, np.ndarray]] = []
    first: Dataset | None = None
    for path in source.files:
        label = f"{path} (series {source.series_uid})"
        try:
            ds = read_dicom(path, header_only=False)
            reason = _not_decodable(ds)
            if reason is not None:
                raise InputError(f"{label}: {reason}")
            pixels = ds.pixel_array
            slice_values = apply_modality_lut(pixels, ds)
        except FILE_ERRORS as exc:
            raise InputError(f"{label}: cannot decode pixel data ({describe(exc)})") from None
        placed = geometry(ds)
        if pixels.ndim != 2 or placed is None or "PixelSpacing" not in ds:
            raise InputError(f"{label}: need single-frame greyscale slices with ImagePositionPatient, "
                             f"ImageOrientationPatient and PixelSpacing to build a volume")
        if values and slice_values.shape != values[0].shape:
            raise InputError(f"{label}: slice shape {slice_values.shape} differs from {values[0].shape}")
        if first is None:
            first = ds
        values.append(slice_values)
        geometries.append(placed)
    assert first is not None  # a source always has files

    iop = np.asarray([float(v) for v in first.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    positions = np.stack([g[0] for g in geometries])
    normal = geometries[0][1]
    if len(values) > 1:
        steps = np.diff(positions @ normal)
        if np.any(steps <= 0) or np.ptp(steps) > 0.01 * abs(steps.mean()):
            raise InputError(f"{source.name}: uneven or zero slice spacing ({steps.min():.3g}..{steps.max():.3g} mm);"
                             f" missing or duplicated slices?")
        slice_step = (positions[-1] - positions[0]) / (len(values) - 1)
    else:
        slice_step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * column_spacing
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    volume = np.stack([v.T for v in values], axis=-1).astype(np.float32)
    return SeriesVolume(volume, affine, source.files, str(source.series_uid))


