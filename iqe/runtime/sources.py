"""Files, folders, DICOM series and NIfTI volumes -> a flat stream of 2-D model inputs.

    discover(inputs)          paths -> [Source]            (iqe.runtime.discovery)
    iter_slices(source)       Source -> SliceItem per 2-D image, or error items
    iter_items(inputs)        both, chained
    read_series_volume(src)   a DICOM series -> stacked volume + RAS affine   (iqe.runtime.dicom)
    nifti_display_ornt(aff)   axis flips/permutation applied to NIfTI before slicing (iqe.runtime.nifti)

One reader module per format: `iqe.runtime.images` (PNG/JPEG/BMP/TIFF), `iqe.runtime.dicom`
(files, series, enhanced multi-frame), `iqe.runtime.nifti`; shared types and the display
pipeline live in `iqe.runtime.items`. Every item ends the way the model's training images
did: an 8-bit display image made by one intensity formula
(`iqe.runtime.transforms.voi_to_uint8`), then the exact PIL path of `iqe.model.preprocess`.

Problems with one file become an item with `error` set (naming the file and the reason),
never an exception: a reader's own checks name the reason, and anything unexpected a
reader raises ends that source with one error item while the other sources go on.
Options the caller got wrong raise `InputError`.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping
from pathlib import Path

from iqe.runtime.dicom import SeriesVolume, iter_dicom_file, iter_dicom_series, read_series_volume
from iqe.runtime.discovery import discover
from iqe.runtime.images import iter_image
from iqe.runtime.items import (
    DEFAULT_WINDOWS,
    GLOBAL_WINDOW,
    NIFTI_SUFFIXES,
    SliceItem,
    Source,
    check_windows,
    describe,
)
from iqe.runtime.nifti import iter_nifti, nifti_display_ornt
from iqe.runtime.transforms import Window

__all__ = ["DEFAULT_WINDOWS", "GLOBAL_WINDOW", "NIFTI_SUFFIXES", "SeriesVolume", "SliceItem", "Source", "Window",
           "check_windows", "discover", "iter_items", "iter_slices", "nifti_display_ornt", "read_series_volume"]


def iter_slices(source: Source, size: int = 240, windows: Mapping[str, Window] | None = None,
                skip: Container[str] = ()) -> Iterator[SliceItem]:
    """Read one source as 2-D model inputs (see `iqe.runtime.dicom` for the DICOM intensity path).

    Args:
        source: from `discover`.
        size: output side length (240 for IQE-CLIP).
        windows: overrides ``{modality: (center, width)}``; ``"*"`` applies to every
            modality, to NIfTI and to high-bit-depth image files. Checked before reading.
        skip: keys of items already done (``--resume``): yielded bare (no image, no
            error) without decoding or preprocessing them.

    Returns:
        An iterator of items, each with an image or an error; reading problems never raise.

    Raises:
        InputError: `windows` is malformed (raised here, before any file is read).
    """
    checked = check_windows(windows)
    if source.kind == "error":
        return iter([SliceItem(str(source.path), source.name, None, error=source.error, file=str(source.path))])
    if source.kind == "image":
        items = iter_image(source, size, checked, skip)
    elif source.kind == "nifti":
        items = iter_nifti(source, size, checked, skip)
    elif source.kind == "dicom":
        items = iter_dicom_file(source, source.files[0], None, size, checked, skip)
    else:
        items = iter_dicom_series(source, size, checked, skip)
    return _guarded(source, items)


def _guarded(source: Source, items: Iterator[SliceItem]) -> Iterator[SliceItem]:
    """Pass items through; an unexpected exception ends this source with one error item, not the run."""
    yielded = 0
    try:
        for item in items:
            yielded += 1
            yield item
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001  a reader or decoder bug on a hostile file must not cost other files
        # BaseException: native decoders surface crashes as such (pyo3's PanicException is not an Exception)
        key = str(source.path) if yielded == 0 else f"{source.name}#after-{yielded}"
        yield SliceItem(key, source.name, None, file=str(source.path),
                        error=f"{source.name}: cannot read ({describe(exc)}); {yielded} item(s) of it read before")


def iter_items(inputs: Iterable[str | Path], size: int = 240,
               windows: Mapping[str, Window] | None = None) -> Iterator[SliceItem]:
    """`discover` then `iter_slices` for every source: the flat stream the runtime batches.

    Discovery runs now (cheap: headers only); pixels are read as the iterator is consumed.

    Raises:
        InputError: `windows` is malformed (raised here, before any file is read).
    """
    checked = check_windows(windows)
    return (item for source in discover(inputs) for item in iter_slices(source, size, checked))
