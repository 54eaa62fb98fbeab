"""What every reader shares: the source and item types, window choice, the display pipeline.

    Source       one thing to read (a file, a DICOM series, or why it cannot be read)
    SliceItem    one 2-D model input, or the reason there is none
    check_windows / window_for / fallback_window   which window applies to an item
    to_model_input   values + window -> 8 bits -> MONOCHROME1 inverted -> model input

The readers (`iqe.runtime.images`, `.dicom`, `.nifti`) and discovery
(`iqe.runtime.discovery`) build on these; `iqe.runtime.sources` ties them together.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from nibabel.filebasedimages import ImageFileError
from pydicom.errors import InvalidDicomError

from iqe.errors import InputError
from iqe.runtime.transforms import (
    DEFAULT_PERCENTILES,
    InvertMonochrome1,
    ScaleToUint8,
    ToModelInput,
    Window,
    voi_to_uint8,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DEFAULT_WINDOWS: dict[str, Window] = {"CT": (40.0, 400.0)}  # soft tissue / abdomen, used when the file has none
GLOBAL_WINDOW = "*"  # key of a `windows` override that applies to every modality and format

SourceKind = Literal["image", "nifti", "dicom", "dicom_series", "error"]

# What pydicom, highdicom, PIL, nibabel, zlib and NumPy raise on malformed files. Only calls that
# parse or decode a file are guarded with it; `iqe.runtime.sources` still turns anything else a
# reader raises into an error item for that source (the run goes on) naming it as unexpected.
FILE_ERRORS = (InvalidDicomError, ImageFileError, OSError, EOFError, ValueError, KeyError, IndexError,
               TypeError, AttributeError, NotImplementedError, RuntimeError, SyntaxError, struct.error,
               zlib.error, OverflowError, MemoryError)


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
        index: frame / slice index (position in the volume for series, multi-frame files
            and NIfTI); None for a plain 2-D file.
        image: float32 [3, S, S] in [0, 1], or None when `error` is set.
        error: message naming the item and the reason, or None.
        meta: JSON-friendly facts: format, modality, UIDs, InstanceNumber, slice position,
            the window applied ({center, width, function, source}). Never patient names.
        file: the file the item was read from (a series slice names its own file).
    """

    key: str
    source: str
    index: int | None
    image: np.ndarray | None = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    file: str | None = None


def error_source(path: Path, message: str) -> Source:
    """A source that is only the reason `path` cannot be read."""
    return Source("error", path, error=message)


def describe(exc: BaseException) -> str:
    """Innermost cause of an exception as one line ``Type: message`` (MONAI's Compose wraps errors)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


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


def window_for(modality: str, windows: Mapping[str, Window]) -> tuple[Window | None, str | None]:
    """(override window, its label) for a modality, or (None, None)."""
    if modality in windows:
        return windows[modality], f"override {modality}"
    if GLOBAL_WINDOW in windows:
        return windows[GLOBAL_WINDOW], "override *"
    return None, None


def fallback_window(modality: str) -> tuple[Window | None, str]:
    """Window when neither an override nor the file sets one: the modality default, else percentiles."""
    if modality in DEFAULT_WINDOWS:
        return DEFAULT_WINDOWS[modality], f"{modality} default"
    return None, "percentile {}-{}".format(*DEFAULT_PERCENTILES)


def window_meta(window: Window, source: str, function: str = "LINEAR") -> dict[str, Any]:
    """The record of a window applied, as results.jsonl carries it."""
    return {"center": window[0], "width": window[1], "function": function, "source": source}


@functools.lru_cache(maxsize=8)
def _display_pipeline(size: int) -> tuple[ScaleToUint8, InvertMonochrome1, ToModelInput]:
    """Values + per-item window -> 8 bits -> MONOCHROME1 inverted -> model input.

    Colour goes through it too (photometric "RGB": no inversion), scaled from its bit depth.
    """
    return ScaleToUint8(percentiles=DEFAULT_PERCENTILES), InvertMonochrome1(), ToModelInput(size)


def to_model_input(values: np.ndarray, window: Window | None, source: str, photometric: str, size: int,
                   function: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the display pipeline; return the image and the record of the window applied.

    Args:
        values: intensities (HxW, or HxWx3 colour).
        window: ``(center, width)``; None: the percentile range of `values`.
        source: how the window was chosen, for the record.
        photometric: ``MONOCHROME1`` is inverted after windowing.
        size: model input side.
        function: VOI LUT function of `window` (default ``LINEAR``, the DICOM window).
    """
    scale, invert, to_input = _display_pipeline(size)
    applied = scale.window_for(values, window)
    function = scale.function_for(window, function)
    image = to_input(invert(voi_to_uint8(values, applied, function), photometric))
    return image, window_meta(applied, source, function)
