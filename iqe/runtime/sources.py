"""Files, folders, DICOM series and NIfTI volumes -> a flat stream of 2-D model inputs.

    discover(inputs)          paths -> [Source]: image, NIfTI, DICOM file, DICOM series, error
    iter_slices(source)       Source -> SliceItem per 2-D image (or one error item)
    iter_items(inputs)        both, chained
    read_series_volume(src)   a DICOM series -> stacked volume + RAS affine (for NIfTI output)
    nifti_display_ornt(aff)   the axis flips/permutation applied to a NIfTI volume before slicing

Every item ends the way the model's training images did: an 8-bit display image, then
the exact PIL path of `iqe.model.preprocess` (see `iqe.runtime.transforms`). What turns
raw values into 8 bits depends on the source:

- 8-bit PNG/JPEG/BMP/TIFF: nothing; the PIL image goes straight to
  `pil_to_tensor_array` (same bytes as `load_image`).
- 16-bit / 32-bit / float images: min..max (or the global window override) -> 0..255.
- DICOM: pixel data -> Modality LUT (rescale) -> VOI: an override window if given for the
  modality, else the file's VOI LUT or window, else the modality default
  (`DEFAULT_WINDOWS`: CT 40/400), else the 0.5-99.5 percentile range -> MONOCHROME1
  inverted. Colour (RGB, YBR decoded to RGB, palette) passes through, scaled to 8 bits
  from its bit depth.
- NIfTI: reoriented to LPS with MONAI, axial slices shown like a DICOM axial image
  (anterior up, patient left on the right), each slice windowed as DICOM would be
  (modality "CT" only when the header says its values are HU).

Problems with one file become an item with `error` set (naming the file and the
reason), never an exception; options the caller got wrong raise `InputError`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pydicom
from monai.transforms import Compose, LoadImage, Orientation
from nibabel.filebasedimages import ImageFileError
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from iqe.errors import InputError
from iqe.model.preprocess import IMAGE_SUFFIXES, pil_to_tensor_array
from iqe.runtime.transforms import (
    DEFAULT_PERCENTILES,
    InvertMonochrome1d,
    ScaleToUint8,
    ScaleToUint8d,
    ToModelInput,
    ToModelInputd,
    Window,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DEFAULT_WINDOWS: dict[str, Window] = {"CT": (40.0, 400.0)}  # soft tissue / abdomen, used when the file has none
GLOBAL_WINDOW = "*"  # key of a `windows` override that applies to every modality and format
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # PIL modes convert('RGB') would clip
MIN_MAX = (0.0, 100.0)  # percentiles meaning plain min-max
NIFTI_DISPLAY_AXCODES = "LPS"  # frame NIfTI volumes are reoriented to before slicing (DICOM's)
_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of each RAS axis

SourceKind = Literal["image", "nifti", "dicom", "dicom_series", "error"]

# What pydicom, PIL, nibabel, zlib and NumPy raise on malformed files. Only calls that parse
# or decode a file are guarded with it; anything raised elsewhere is our bug and propagates.
_FILE_ERRORS = (InvalidDicomError, ImageFileError, OSError, EOFError, ValueError, KeyError, IndexError,
                TypeError, AttributeError, NotImplementedError, RuntimeError, SyntaxError, struct.error,
                zlib.error)
_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class Source:
    """One thing to read: a file, a DICOM series, or the reason something cannot be read.

    Attributes:
        kind: ``image`` (PNG/JPEG/BMP/TIFF), ``nifti``, ``dicom`` (one file, possibly
            multi-frame), ``dicom_series`` (several files sharing a SeriesInstanceUID) or
            ``error``.
        path: the file; for a series, the folder its files share.
        files: the files to read; for a series in volume order (see `ordered_by`).
        series_uid: SeriesInstanceUID of DICOM sources.
        ordered_by: how a series was ordered: ``ImagePositionPatient`` (projected on the
            slice normal) or ``InstanceNumber`` (when a slice lacks position/orientation).
        error: for ``kind == "error"``, the message (names the item and the reason).
    """

    kind: SourceKind
    path: Path
    files: tuple[Path, ...] = ()
    series_uid: str | None = None
    ordered_by: str | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        """How messages and results refer to this source."""
        return f"{self.path} (series {self.series_uid})" if self.kind == "dicom_series" else str(self.path)


@dataclass
class SliceItem:
    """One 2-D model input, or the reason there is none.

    Attributes:
        key: unique name: the file path; ``path#frame`` for frames of a multi-frame file
            or pages of a TIFF; ``SeriesInstanceUID#index`` for a series slice;
            ``path#slice`` for a NIfTI slice.
        source: `Source.name` of the source it came from.
        index: frame / slice index (position in the volume for series and NIfTI); None
            for a plain 2-D file.
        image: float32 [3, S, S] in [0, 1], or None when `error` is set.
        error: message naming the item and the reason, or None.
        meta: JSON-friendly facts: format, modality, UIDs, InstanceNumber, slice position,
            the window applied ({center, width, source}). Never patient names.
    """

    key: str
    source: str
    index: int | None
    image: np.ndarray | None = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


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


# ----------------------------------------------------------------------------- discovery


def discover(inputs: Iterable[str | Path]) -> list[Source]:
    """Expand files and folders into sources, sorted by path.

    Folders are scanned recursively (hidden files and folders skipped: OS metadata such
    as ``.DS_Store``). Images and NIfTI are recognized by suffix; every other file by
    content: DICOM with a DICM marker, or a raw data set (no preamble, no file meta).
    DICOM files are grouped by SeriesInstanceUID across all inputs: a group of several
    files is one ``dicom_series`` ordered for the volume, a lone file is ``dicom``. A
    file given twice is read once; a second file with the same SOPInstanceUID is an error.

    Args:
        inputs: files and folders.

    Returns:
        Sources in deterministic order (by their first file path). Missing paths, empty
        folders and unreadable or unknown files are ``error`` sources, never exceptions.
    """
    sources: list[Source] = []
    candidates: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                sources.append(_error_source(p, f"{p}: empty folder (no files to read)"))
            candidates.extend(found)
        elif p.is_file():
            candidates.append(p)
        else:
            sources.append(_error_source(p, f"{p}: no such file or folder"))

    seen: set[Path] = set()
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for f in candidates:
        if (resolved := f.resolve()) in seen:
            continue
        seen.add(resolved)
        if f.name.lower().endswith(NIFTI_SUFFIXES):
            sources.append(Source("nifti", f, (f,)))
        elif f.suffix.lower() in IMAGE_SUFFIXES:
            sources.append(Source("image", f, (f,)))
        else:
            try:
                header = _read_dicom(f, header_only=True)
            except InputError as exc:
                sources.append(_error_source(f, str(exc)))
                continue
            except _FILE_ERRORS as exc:
                sources.append(_error_source(f, f"{f}: cannot read DICOM header ({_describe(exc)})"))
                continue
            uid = str(header.get("SeriesInstanceUID", "") or "")
            if uid:
                series.setdefault(uid, []).append((f, header))
            else:
                sources.append(Source("dicom", f, (f,)))
    for uid, members in series.items():
        sources.extend(_series_sources(uid, members))
    return sorted(sources, key=lambda s: (min(str(f) for f in s.files) if s.files else str(s.path), s.kind))


def _error_source(path: Path, message: str) -> Source:
    return Source("error", path, error=message)


def _series_sources(uid: str, members: list[tuple[Path, Dataset]]) -> list[Source]:
    """One series group -> its source (plus error sources for duplicated instances)."""
    out: list[Source] = []
    unique: list[tuple[Path, Dataset]] = []
    first_of: dict[str, Path] = {}
    for f, header in sorted(members, key=lambda m: str(m[0])):
        sop = str(header.get("SOPInstanceUID", "") or "")
        if sop and sop in first_of:
            # Two copies of one instance would put two slices at one position.
            out.append(_error_source(f, f"{f} (series {uid}): skipped, same SOPInstanceUID as {first_of[sop]}"))
            continue
        first_of[sop] = f
        unique.append((f, header))
    if len(unique) == 1:
        out.append(Source("dicom", unique[0][0], (unique[0][0],), series_uid=uid))
        return out
    files, ordered_by = _order_slices(unique)
    try:
        folder = Path(os.path.commonpath([str(f.parent) for f in files]))
    except ValueError:  # relative and absolute paths mixed
        folder = Path(os.path.commonpath([str(f.parent.absolute()) for f in files]))
    out.append(Source("dicom_series", folder, files, series_uid=uid, ordered_by=ordered_by))
    return out


def _order_slices(members: list[tuple[Path, Dataset]]) -> tuple[tuple[Path, ...], str]:
    """Volume order: ImagePositionPatient projected on the slice normal, else InstanceNumber.

    The normal is that of the first file (by path), so oblique and sagittal stacks sort
    along their own axis, not along z. Ties fall back to InstanceNumber, then path.
    """
    geometry = [_geometry(h) for _, h in members]
    numbers = [_instance_number(h) for _, h in members]
    placed = [g for g in geometry if g is not None]
    if len(placed) == len(members):
        normal = placed[0][1]
        keys = [(float(np.dot(position, normal)), n if n is not None else math.inf, str(f))
                for (f, _), (position, _), n in zip(members, placed, numbers)]
        ordered_by = "ImagePositionPatient"
    else:
        keys = [(n if n is not None else math.inf, 0.0, str(f)) for (f, _), n in zip(members, numbers)]
        ordered_by = "InstanceNumber"
    order = sorted(range(len(members)), key=lambda i: keys[i])
    return tuple(members[i][0] for i in order), ordered_by


def _geometry(ds: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
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


def _instance_number(ds: Dataset) -> int | None:
    try:
        return int(ds.InstanceNumber)
    except (AttributeError, TypeError, ValueError):
        return None


def _read_dicom(path: Path, header_only: bool) -> Dataset:
    """dcmread that also accepts raw data sets (no preamble, no file meta) when that is safe.

    ``force=True`` makes pydicom parse any bytes, so it is used only when the file starts
    with a tag of group 0002 or 0008 (either byte order), as data sets written without
    file meta do. A transfer syntax missing from the file meta is set from the encoding
    pydicom detected, so the pixel data can be decoded.

    Raises:
        InputError: the file is neither DICOM nor a raw data set.
        Any of `_FILE_ERRORS`: pydicom could not parse it.
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


# ----------------------------------------------------------------------------- reading


def check_windows(windows: Mapping[str, Window] | None) -> dict[str, Window]:
    """Validate window overrides: ``{modality: (center, width)}``, ``"*"`` for all.

    Args:
        windows: e.g. ``{"CT": (50, 350)}`` or ``{"*": (0, 4000)}``; None for none.
            Modality keys are DICOM codes (CT, MR, CR, DX, OP, OPT, ...), matched
            case-insensitively. An override wins over the file's own VOI.

    Returns:
        The overrides with upper-case keys and float values.

    Raises:
        InputError: a value is not two finite numbers with width > 0.
    """
    checked: dict[str, Window] = {}
    for key, value in (windows or {}).items():
        try:
            center, width = (float(v) for v in value)
        except (TypeError, ValueError):
            center = width = math.nan
        if not (math.isfinite(center) and math.isfinite(width) and width > 0):
            raise InputError(f"window for {key!r}: expected (center, width) with width > 0, got {value!r}")
        checked[str(key).upper()] = (center, width)
    return checked


def iter_slices(source: Source, size: int = 240, windows: Mapping[str, Window] | None = None) -> Iterator[SliceItem]:
    """Read one source as 2-D model inputs (see the module docstring for the intensity path).

    Args:
        source: from `discover`.
        size: output side length (240 for IQE-CLIP).
        windows: overrides ``{modality: (center, width)}``; ``"*"`` applies to every
            modality, to NIfTI and to high-bit-depth image files. Checked before reading.

    Returns:
        An iterator of items, each with an image or an error; reading problems never
        raise.

    Raises:
        InputError: `windows` is malformed (raised here, before any file is read).
    """
    checked = check_windows(windows)
    if source.kind == "error":
        return iter([SliceItem(str(source.path), source.name, None, error=source.error)])
    if source.kind == "image":
        return _iter_image(source, size, checked)
    if source.kind == "nifti":
        return _iter_nifti(source, size, checked)
    if source.kind == "dicom":
        return _iter_dicom_file(source, source.files[0], None, size, checked)
    return _iter_dicom_series(source, size, checked)


def iter_items(inputs: Iterable[str | Path], size: int = 240,
               windows: Mapping[str, Window] | None = None) -> Iterator[SliceItem]:
    """`discover` then `iter_slices` for every source: the flat stream the runtime batches.

    Discovery runs now (cheap: headers only); pixels are read as the iterator is consumed.

    Raises:
        InputError: `windows` is malformed (raised here, before any file is read).
    """
    checked = check_windows(windows)
    return (item for source in discover(inputs) for item in iter_slices(source, size, checked))


def _window_for(modality: str, windows: Mapping[str, Window]) -> tuple[Window | None, str | None]:
    """(override window, its label) for a modality, or (None, None)."""
    if modality in windows:
        return windows[modality], f"override {modality}"
    if GLOBAL_WINDOW in windows:
        return windows[GLOBAL_WINDOW], "override *"
    return None, None


def _fallback_window(modality: str) -> tuple[Window | None, str]:
    """Window when neither an override nor the file sets one: the modality default, else percentiles."""
    if modality in DEFAULT_WINDOWS:
        return DEFAULT_WINDOWS[modality], f"{modality} default"
    return None, "percentile {}-{}".format(*DEFAULT_PERCENTILES)


def _window_meta(window: Window, source: str) -> dict[str, Any]:
    return {"center": window[0], "width": window[1], "source": source}


@functools.lru_cache(maxsize=8)
def _display_pipeline(size: int) -> Compose:
    """Values + per-item window -> 8 bits -> MONOCHROME1 inverted -> model input.

    Colour goes through it too (photometric "RGB": no inversion), scaled from its bit depth.
    """
    return Compose([ScaleToUint8d("image", percentiles=DEFAULT_PERCENTILES),
                    InvertMonochrome1d("image", photometric_key="photometric"),
                    ToModelInputd("image", size)])


def _to_model_input(values: np.ndarray, window: Window | None, source: str, photometric: str,
                    size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the display pipeline; return the image and the record of the window applied."""
    out = _display_pipeline(size)({"image": values, "image_window": window, "photometric": photometric})
    return out["image"], _window_meta(out["image_window"], source)


# --- image files


def _iter_image(source: Source, size: int, windows: Mapping[str, Window]) -> Iterator[SliceItem]:
    """PNG/JPEG/BMP/TIFF, one item per frame (multi-page TIFF).

    8-bit modes go straight to `pil_to_tensor_array`, exactly like `load_image`. For
    16-bit, 32-bit and float modes (which ``convert('RGB')`` would clip) the values are
    mapped to 0..255 first: min..max of the frame, or the ``"*"`` override window
    ``(center, width)``, rounded to nearest, then the same PIL path.
    """
    path = source.path
    try:
        im = Image.open(path)
    except _FILE_ERRORS as exc:
        yield SliceItem(str(path), source.name, None, error=f"{path}: cannot decode image ({_describe(exc)})")
        return
    with im:
        try:
            frames = getattr(im, "n_frames", 1)
        except _FILE_ERRORS as exc:
            yield SliceItem(str(path), source.name, None, error=f"{path}: cannot decode image ({_describe(exc)})")
            return
        for frame in range(frames):
            key, index = (str(path), None) if frames == 1 else (f"{path}#{frame}", frame)
            meta: dict[str, Any] = {"format": im.format, "frames": frames}
            try:
                im.seek(frame)
                im.load()
                meta["mode"] = im.mode  # pages of a TIFF may differ
                pixels = np.asarray(im) if im.mode in HIGH_BIT_MODES else None
                image = pil_to_tensor_array(im, size) if pixels is None else None
            except _FILE_ERRORS as exc:
                yield SliceItem(key, source.name, index, error=f"{key}: cannot decode image ({_describe(exc)})",
                                meta=meta)
                continue
            if pixels is not None:
                override, label = _window_for("", windows)
                scale = ScaleToUint8(override, percentiles=MIN_MAX)
                window = scale.window_for(pixels)
                image = Compose([scale, ToModelInput(size)])(pixels)
                meta["window"] = _window_meta(window, label or "min-max")
            yield SliceItem(key, source.name, index, image=image, meta=meta)


# --- DICOM


def _iter_dicom_series(source: Source, size: int, windows: Mapping[str, Window]) -> Iterator[SliceItem]:
    """The files of a series in volume order; index = running slice index (frames count)."""
    index = 0
    for path in source.files:
        for item in _iter_dicom_file(source, path, index, size, windows):
            item.meta["ordered_by"] = source.ordered_by
            index += 1
            yield item


def _iter_dicom_file(source: Source, path: Path, first_index: int | None, size: int,
                     windows: Mapping[str, Window]) -> Iterator[SliceItem]:
    """One DICOM file -> one item per frame.

    `first_index` None: a standalone file (key = path, ``path#frame`` when multi-frame).
    Otherwise a series member (key = ``SeriesInstanceUID#index``).
    """
    def name_of(frame: int, frames: int) -> tuple[str, int | None, str]:
        """(key, index, label for messages) of a frame."""
        if first_index is None:
            if frames == 1:
                return str(path), None, str(path)
            return f"{path}#{frame}", frame, f"{path} (frame {frame})"
        i = first_index + frame
        return f"{source.series_uid}#{i}", i, f"{path} (series {source.series_uid}, slice {i})"

    key, index, label = name_of(0, 1)
    try:
        ds = _read_dicom(path, header_only=False)
    except InputError as exc:
        yield SliceItem(key, source.name, index, error=str(exc))
        return
    except _FILE_ERRORS as exc:
        yield SliceItem(key, source.name, index, error=f"{label}: cannot read DICOM file ({_describe(exc)})")
        return
    meta = _dicom_meta(ds)
    reason = _not_decodable(ds)
    if reason is not None:
        yield SliceItem(key, source.name, index, error=f"{label}: {reason}", meta=meta)
        return
    try:
        pixels = ds.pixel_array
    except _FILE_ERRORS as exc:
        yield SliceItem(key, source.name, index, meta=meta,
                        error=f"{label}: cannot decode pixel data ({_describe(exc)}){_codec_hint(ds)}")
        return

    frames = _frame_count(ds)
    for frame in range(frames):
        key, index, label = name_of(frame, frames)
        frame_meta = dict(meta, frame=frame, frames=frames)
        try:
            display = _dicom_display_input(pixels[frame] if frames > 1 else pixels, ds, windows)
        except _FILE_ERRORS as exc:
            yield SliceItem(key, source.name, index, error=f"{label}: cannot apply the header's LUTs "
                            f"({_describe(exc)})", meta=frame_meta)
            continue
        image, record = _to_model_input(display.values, display.window, display.window_source,
                                        display.photometric, size)
        frame_meta["window"] = display.file_record or record
        yield SliceItem(key, source.name, index, image=image, meta=frame_meta)


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
        return (f"unsupported transfer syntax {ts.name} ({ts}): no decoder installed; "
                f"install iqe-engine[dicom-codecs]")
    return None


def _codec_hint(ds: Dataset) -> str:
    """The near miss when an installed decoder failed: the optional codecs may decode it (e.g. 12-bit JPEG)."""
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed and any(dep.startswith("pylibjpeg") for dep in get_decoder(ts).missing_dependencies):
        return "; other decoders: install iqe-engine[dicom-codecs]"
    return ""


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


@dataclass
class _DisplayInput:
    """What the display pipeline needs for one DICOM frame, read off the header."""

    values: np.ndarray  # after Modality LUT (and the file's VOI, when that is what applies)
    window: Window | None  # None: percentiles of the frame
    window_source: str  # how the window was chosen, for the record
    photometric: str  # "MONOCHROME1" is inverted after windowing; colour passes as "RGB"
    file_record: dict[str, Any] | None = None  # the file's own window values, reported instead


def _dicom_display_input(pixels: np.ndarray, ds: Dataset, windows: Mapping[str, Window]) -> _DisplayInput:
    """Apply the header's LUTs (pydicom) to one decoded frame and choose its window.

    Raises:
        Any of `_FILE_ERRORS`: the header's LUT attributes do not fit the pixels.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if not photometric.startswith("MONOCHROME"):
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
            bits = 8 * pixels.dtype.itemsize  # the palette's entries are 8 or 16 bit
        else:  # RGB, or YBR that pydicom already converted to RGB
            bits = int(ds.get("BitsStored", 8 * pixels.dtype.itemsize))
        full = 2.0 ** bits - 1
        return _DisplayInput(pixels, (full / 2, full), f"{bits}-bit colour", "RGB")

    modality = str(ds.get("Modality", "") or "").upper()
    values = apply_modality_lut(pixels, ds)
    override, label = _window_for(modality, windows)
    if override is not None:
        return _DisplayInput(values, override, label or "", photometric)
    file_voi = _file_voi(values, ds)
    if file_voi is not None:
        display, (lo, hi), record = file_voi
        return _DisplayInput(display, ((lo + hi) / 2, hi - lo), record["source"], photometric, record)
    window, window_source = _fallback_window(modality)
    return _DisplayInput(values, window, window_source, photometric)


def _file_voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, Window, dict[str, Any]] | None:
    """The file's VOI applied by pydicom: (display values, their output range, record), or None.

    pydicom's `apply_voi_lut` prefers a VOI LUT Sequence over a window (first of each) and
    keeps its output in the units of its input: a window maps onto the stored (or
    rescaled) range, a VOI LUT onto its entries. That output range, which we map onto
    0..255, is found by passing the whole input domain through the same call: every LUT
    index, or two values far outside the window. An unusable VOI (e.g. width 0) is
    ignored, so the modality default applies.
    """
    lut_items = ds.get("VOILUTSequence")
    has_lut = bool(lut_items) and all(lut_items[0].get(k) is not None for k in ("LUTDescriptor", "LUTData"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_lut or has_window):
        return None
    try:
        if has_lut:
            entries, first = int(lut_items[0].LUTDescriptor[0]) or 2 ** 16, int(lut_items[0].LUTDescriptor[1])
            probe = np.arange(first, first + entries)
            record: dict[str, Any] = {"center": None, "width": None, "source": "file VOI LUT"}
        else:
            center, width = float(_first(ds.WindowCenter)), float(_first(ds.WindowWidth))
            probe = np.array([center - 10 * abs(width) - 1, center + 10 * abs(width) + 1])
            record = {"center": center, "width": width,
                      "source": f"file window ({ds.get('VOILUTFunction', 'LINEAR')})"}
        display = apply_voi_lut(values, ds)
        with np.errstate(over="ignore"):  # a SIGMOID window's exp overflows to inf at the probe: its limit
            limits = apply_voi_lut(probe, ds)
    except _FILE_ERRORS:
        return None
    return display, (float(limits.min()), float(limits.max())), record


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
        except (TypeError, ValueError):  # malformed value in the header: leave it out
            continue
    geometry = _geometry(ds)
    if geometry is not None:
        meta["slice_position"] = float(np.dot(*geometry))
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
            ds = _read_dicom(path, header_only=False)
            reason = _not_decodable(ds)
            if reason is not None:
                raise InputError(f"{label}: {reason}")
            pixels = ds.pixel_array
            slice_values = apply_modality_lut(pixels, ds)
        except _FILE_ERRORS as exc:
            raise InputError(f"{label}: cannot decode pixel data ({_describe(exc)})") from None
        geometry = _geometry(ds)
        if pixels.ndim != 2 or geometry is None or "PixelSpacing" not in ds:
            raise InputError(f"{label}: need single-frame greyscale slices with ImagePositionPatient, "
                             f"ImageOrientationPatient and PixelSpacing to build a volume")
        if values and slice_values.shape != values[0].shape:
            raise InputError(f"{label}: slice shape {slice_values.shape} differs from {values[0].shape}")
        if first is None:
            first = ds
        values.append(slice_values)
        geometries.append(geometry)
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


# --- NIfTI


@functools.lru_cache(maxsize=1)
def _nifti_loader() -> Compose:
    """LoadImage (nibabel, channel first) -> Orientation to LPS, built once.

    LPS is DICOM's patient frame, so ``volume[0, :, :, k].T`` reads like a DICOM axial
    image: rows run anterior -> posterior, columns patient right -> left. Orientation
    only permutes and flips axes (an oblique volume goes to its closest axes, no
    resampling), so slice values are the stored voxels. LoadImage
    instantiates every registered MONAI reader, including the GPU DICOM one, which warns
    when nvImageCodec is absent; that concerns DICOM, which we decode with pydicom, so
    the warning is silenced here.
    """
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            load = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)
    finally:
        plugin_log.setLevel(level)
    return Compose([load, Orientation(axcodes=NIFTI_DISPLAY_AXCODES, labels=_AXIS_LABELS)])


def nifti_display_ornt(affine: np.ndarray) -> np.ndarray:
    """The axis flips and permutation `iter_slices` applies to a NIfTI volume before slicing.

    The rule of MONAI's `Orientation` in `_nifti_loader`: the stored axes' closest world
    axes (`nibabel.io_orientation`, so an oblique volume is never resampled) taken to
    `NIFTI_DISPLAY_AXCODES`. ``nibabel.orientations.apply_orientation(stored, ornt)`` is
    the reoriented volume, whose ``[:, :, k].T`` is slice k as shown to the model.

    Args:
        affine: the file's affine, ``nib.load(path).affine`` (what MONAI's NibabelReader uses).

    Returns:
        nibabel orientation transform, int [3, 2]: row i = (display axis of stored axis i,
        1 or -1 when that axis is flipped).
    """
    start = nib.io_orientation(np.asarray(affine, dtype=np.float64))
    return nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(NIFTI_DISPLAY_AXCODES,
                                                                                labels=_AXIS_LABELS)).astype(int)


def _nifti_modality(header: nib.Nifti1Header) -> str:
    """"CT" when the header says the values are Hounsfield units, else "".

    NIfTI has no standard field for intensity units; the intent name or description
    reading ``HU`` / ``Hounsfield`` is the convention recognized here. Anything else is
    windowed per slice by percentiles (or by the ``"*"`` override).
    """
    text = f"{header.get_intent()[2]} {header['descrip'].item().decode('latin-1', 'replace')}".upper()
    return "CT" if "HOUNSFIELD" in text or "HU" in text.replace(",", " ").replace(";", " ").split() else ""


def _iter_nifti(source: Source, size: int, windows: Mapping[str, Window]) -> Iterator[SliceItem]:
    """Axial slices (last axis after reorientation to LPS), inferior to superior."""
    path = source.path
    try:
        header = nib.load(path).header
    except _FILE_ERRORS as exc:
        yield SliceItem(str(path), source.name, None, error=f"{path}: cannot read NIfTI ({_describe(exc)})")
        return
    shape = tuple(header.get_data_shape())  # type: ignore[attr-defined]  # nib.load of .nii: a NIfTI header
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        yield SliceItem(str(path), source.name, None, error=f"{path}: expected a 3-D volume, got shape {shape}")
        return
    try:
        volume = np.asarray(_nifti_loader()(str(path)).array)[0]
    except _FILE_ERRORS as exc:
        yield SliceItem(str(path), source.name, None, error=f"{path}: cannot read NIfTI ({_describe(exc)})")
        return
    modality = _nifti_modality(header)  # type: ignore[arg-type]
    window, window_source = _window_for(modality, windows)
    if window is None:
        window, window_source = _fallback_window(modality)
    slices = volume.shape[2]
    for k in range(slices):
        image, record = _to_model_input(volume[:, :, k].T, window, window_source or "", "MONOCHROME2", size)
        meta = {"format": "nifti", "modality": modality or None, "slices": slices,
                "display": "axial, anterior up, patient left on the right", "window": record}
        yield SliceItem(f"{path}#{k}", source.name, k, image=image, meta=meta)


def _describe(exc: BaseException) -> str:
    """Innermost cause of an exception as one line ``Type: message`` (MONAI's Compose wraps errors)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
