"""Benchmark inputs written to a temporary folder: a synthetic CT series and PNG files.

The series starts from pydicom's `CT_small.dcm` test file (128 x 128, signed 16 bit,
rescale intercept -1024) when pydicom ships it, else from a data set built here; every
slice gets fresh Study/Series/SOP Instance UIDs, its own position along the slice
normal, and pixel data that differ per slice (a shifted copy of the image plus a
moving bright blob and noise), so decoding and windowing do real work and the model
sees different inputs. Slices are resampled to `size` x `size` (512 by default, the
usual CT matrix) so decoding costs what it costs in practice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import zoom

from iqe.errors import InputError


def _template() -> tuple[Dataset, np.ndarray]:
    """(CT data set, its stored pixel values): pydicom's CT_small.dcm or a built one."""
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file("CT_small.dcm")
        if path:
            found = pydicom.dcmread(path)
            return found, found.pixel_array.astype(np.int16)
    except Exception:  # noqa: BLE001, S110 - any failure of the optional test data falls back to a built data set
        pass
    yy, xx = np.mgrid[0:128, 0:128]
    body = ((yy - 64) ** 2 / 50**2 + (xx - 64) ** 2 / 58**2) < 1
    pixels = np.where(body, 1064 + 30 * np.sin(xx / 5.0), 24).astype(np.int16)
    ds: Dataset = Dataset()
    ds.Modality = "CT"
    ds.SOPClassUID = CTImageStorage
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelSpacing = [0.661468, 0.661468]
    ds.SliceThickness = 5.0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-158.1, -179.0, -75.7]
    return ds, pixels


def write_dicom_series(folder: str | Path, slices: int, size: int = 512, seed: int = 0,
                       spacing_mm: float = 2.5) -> list[Path]:
    """Write a synthetic single-frame CT series of `slices` files into `folder`.

    Args:
        folder: created if missing.
        slices: number of slices (files).
        size: rows = columns of every slice.
        seed: noise seed (the series is deterministic for a seed).
        spacing_mm: distance between slice positions.
    Returns:
        The file paths, in slice order.
    Raises:
        InputError: `slices` or `size` is not positive.
    """
    if slices < 1 or size < 1:
        raise InputError(f"series needs >= 1 slice of >= 1 pixel, got {slices} slices of {size} px")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template, pixels = _template()
    base = zoom(pixels.astype(np.float32), size / pixels.shape[0], order=1)
    rng = np.random.default_rng(seed)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    spacing = float(template.PixelSpacing[0]) * pixels.shape[0] / size
    x0, y0, z0 = (float(v) for v in template.ImagePositionPatient)
    yy, xx = np.mgrid[0:size, 0:size]
    paths = []
    for i in range(slices):
        t = i / max(slices - 1, 1)
        img = np.roll(base, (int(6 * np.sin(2 * np.pi * t)), int(6 * np.cos(2 * np.pi * t))), axis=(0, 1))
        cy, cx = size * (0.35 + 0.3 * t), size * (0.6 - 0.2 * t)
        img = img + 180 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 20) ** 2))  # a lesion-like blob
        img = np.clip(img + rng.normal(0, 12, img.shape), -32768, 32767).astype(np.int16)
        ds = template.copy()
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = template.get("SOPClassUID", CTImageStorage)
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.PatientName, ds.PatientID = "Bench^Synthetic", "IQE-BENCH"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.SOPInstanceUID = sop
        ds.SeriesNumber, ds.InstanceNumber = 9001, i + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [x0, y0, z0 + i * spacing_mm]
        ds.SliceLocation = z0 + i * spacing_mm
        ds.PixelSpacing = [spacing, spacing]
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = img.tobytes()
        path = folder / f"slice_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_png(path: str | Path, size: int = 512, seed: int = 0) -> Path:
    """One 8-bit greyscale PNG with organ-like texture and a bright blob (for single-image timing)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = 110 + 50 * np.sin(xx / 13.0) * np.cos(yy / 17.0)
    img = img + 90 * np.exp(-((yy - 0.4 * size) ** 2 + (xx - 0.6 * size) ** 2) / (2 * (size / 18) ** 2))
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="L").save(path)
    return path
