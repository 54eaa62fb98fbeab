"""One intensity path: an 8-bit picture scores the same as PNG and as DICOM; flat images are flagged."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from iqe.cli import main
from iqe.model.bundle import save_bundle
from iqe.model.preprocess import load_image
from iqe.runtime.scoring import score_inputs
from iqe.runtime.sources import iter_items

SIZE = 240


def picture(rgb: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:180, 0:150]
    grey = (128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).clip(0, 255).astype(np.uint8)
    return np.stack([grey, np.roll(grey, 7, axis=1), 255 - grey], axis=2) if rgb else grey


def dicom_twin(pixels: np.ndarray, path, modality: str = "OT", **extra) -> None:
    """An uncompressed Secondary Capture of `pixels` (8 bits stored, no window, no rescale)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("rgb", [False, True])
def test_8bit_png_and_its_dicom_twin_give_the_same_model_input(rgb, tmp_path):
    pixels = picture(rgb)
    Image.fromarray(pixels).save(tmp_path / "pic.png")
    dicom_twin(pixels, tmp_path / "pic.dcm")
    png_item, dcm_item = (next(iter_items([tmp_path / n], SIZE)) for n in ("pic.png", "pic.dcm"))
    assert dcm_item.error is None, dcm_item.error
    assert png_item.image.tobytes() == load_image(tmp_path / "pic.png", SIZE).tobytes()
    assert dcm_item.image.tobytes() == png_item.image.tobytes()
    expected_source = "8-bit colour" if rgb else "8-bit full range"
    assert dcm_item.meta["window"]["source"] == expected_source


def test_8bit_png_and_dicom_twin_score_identically(tiny_model, tmp_path):
    pixels = picture(False)
    Image.fromarray(pixels).save(tmp_path / "pic.png")
    dicom_twin(pixels, tmp_path / "pic.dcm")
    bundle = save_bundle(tiny_model, tmp_path / "bundle")
    out = tmp_path / "out"
    assert main(["score", "--model", str(bundle), str(tmp_path / "pic.png"), str(tmp_path / "pic.dcm"),
                 "--out", str(out), "--quiet"]) == 0
    png, dcm = (json.loads(line) for line in (out / "results.jsonl").read_text().splitlines())
    for key in ("score", "score_query", "score_text", "score_few", "map_max"):
        assert png[key] == dcm[key], key


def test_an_8bit_dicom_with_a_window_still_uses_it(tmp_path):
    pixels = picture(False)
    dicom_twin(pixels, tmp_path / "w.dcm", WindowCenter=100, WindowWidth=50)
    item = next(iter_items([tmp_path / "w.dcm"], SIZE))
    assert item.meta["window"] == {"center": 100.0, "width": 50.0, "function": "LINEAR",
                                   "source": "file window (LINEAR)"}


def test_empty_slices_are_scored_and_flagged(tmp_path):
    flat = np.full((64, 64), 40, np.uint8)
    noisy = flat.copy()
    noisy[::7, ::5] += 1  # one grey level of noise: still carries nothing
    Image.fromarray(flat).save(tmp_path / "a_flat.png")
    dicom_twin(noisy, tmp_path / "b_noisy.dcm")
    ct = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ct.PixelData = np.full((ct.Rows, ct.Columns), 0, np.int16).tobytes()  # all -1024 HU: air under the CT window
    ct.save_as(tmp_path / "c_air.dcm")
    Image.fromarray(picture(False)).save(tmp_path / "d_picture.png")

    def infer(batch):
        return {"score": batch.mean(axis=(1, 2, 3)), "map": batch[:, 0], "map_smooth": batch[:, 0]}

    results = score_inputs([tmp_path], infer, SIZE, batch_size=2, progress=False)
    by_name = {r.path.rsplit("/", 1)[-1]: r for r in results}
    assert [r.error for r in results] == [None] * 4
    for name in ("a_flat.png", "b_noisy.dcm", "c_air.dcm"):
        assert by_name[name].to_json()["flags"] == ["empty"], name
        assert by_name[name].scores is not None  # scored all the same
    assert "flags" not in by_name["d_picture.png"].to_json()
