"""NIfTI volumes -> axial model inputs.

Loaded with MONAI, reoriented to LPS so axial slices display like a DICOM axial image
(anterior up, patient left on the right), each slice windowed as DICOM would be
(modality "CT" only when the header says its values are HU).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Container, Iterator, Mapping
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from iqe.runtime.items import FILE_ERRORS, SliceItem, Source, describe, fallback_window, to_model_input, window_for
from iqe.runtime.transforms import Window

if TYPE_CHECKING:
    from monai.transforms import Compose

NIFTI_DISPLAY_AXCODES = "LPS"  # frame NIfTI volumes are reoriented to before slicing (DICOM's)
_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of each RAS axis


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
    from monai.transforms import Compose, LoadImage, Orientation  # lazy: MONAI imports torch; only NIfTI needs it

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
    """The axis flips and permutation `iter_nifti` applies to a NIfTI volume before slicing.

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


def iter_nifti(source: Source, size: int, windows: Mapping[str, Window],
               skip: Container[str] = ()) -> Iterator[SliceItem]:
    """Axial slices (last axis after reorientation to LPS), inferior to superior."""
    path = source.path
    file = str(path)
    try:
        header = nib.load(path).header
    except FILE_ERRORS as exc:
        yield SliceItem(file, source.name, None, error=f"{path}: cannot read NIfTI ({describe(exc)})", file=file)
        return
    shape = tuple(header.get_data_shape())  # type: ignore[attr-defined]  # nib.load of .nii: a NIfTI header
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        yield SliceItem(file, source.name, None, error=f"{path}: expected a 3-D volume, got shape {shape}", file=file)
        return
    try:
        volume = np.asarray(_nifti_loader()(str(path)).array)[0]
    except FILE_ERRORS as exc:
        yield SliceItem(file, source.name, None, error=f"{path}: cannot read NIfTI ({describe(exc)})", file=file)
        return
    modality = _nifti_modality(header)  # type: ignore[arg-type]
    window, window_source = window_for(modality, windows)
    if window is None:
        window, window_source = fallback_window(modality)
    slices = volume.shape[2]
    for k in range(slices):
        if f"{path}#{k}" in skip:  # done in an earlier run
            yield SliceItem(f"{path}#{k}", source.name, k, file=file)
            continue
        image, record = to_model_input(volume[:, :, k].T, window, window_source or "", "MONOCHROME2", size)
        meta = {"format": "nifti", "modality": modality or None, "slices": slices,
                "display": "axial, anterior up, patient left on the right", "window": record}
        yield SliceItem(f"{path}#{k}", source.name, k, image=image, meta=meta, file=file)
