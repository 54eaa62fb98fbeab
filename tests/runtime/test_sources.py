"""Discovery and reading of images, DICOM and NIfTI, checked against plain NumPy/PIL recomputations.

Test data: pydicom's bundled files (`get_testdata_file`), copies of them edited in tmp,
and small PNG / NIfTI files written here.
"""

from __future__ import annotations

import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, generate_uid

from iqe.errors import InputError
from iqe.model.preprocess import load_image, pil_to_tensor_array
from iqe.runtime.sources import (
    Source,
    check_windows,
    discover,
    iter_items,
    iter_slices,
    read_series_volume,
)
from tests.conftest import write_test_images

SIZE = 240
LEVEL = 1 / 255  # one 8-bit grey level in the model input
# An 8-bit value one level off (a .5 rounded differently in float32 vs float64) moves the
# bicubic output by at most one level: the tolerance for recomputations that round.
ONE_LEVEL = LEVEL + 1e-6


def assert_images_close(actual: np.ndarray | None, expected: np.ndarray, atol: float, what: str) -> None:
    """Compare model inputs; on failure name the worst element and the smallest passing atol."""
    assert actual is not None, f"{what}: no image"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual.astype(np.float64) - expected)
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    assert diff.max() <= atol, (f"{what}: worst |diff| {diff.max():.3g} at {worst} "
                                f"(got {actual[worst]}, expected {expected[worst]}); atol={diff.max():.3g} would pass")


def model_input(u8: np.ndarray) -> np.ndarray:
    """The reference PIL path from an independently computed 8-bit image."""
    return pil_to_tensor_array(Image.fromarray(u8), SIZE)


def window_u8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM LINEAR window (PS3.3 C.11.2.1.2.1) -> 0..255, in plain NumPy, written as the standard states it:
    x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 255; else ((x - (c - 0.5)) / (w-1) + 0.5) * 255."""
    values = np.asarray(values, dtype=np.float64)
    inside = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    out = np.where(values <= center - 0.5 - (width - 1) / 2, 0.0,
                   np.where(values > center - 0.5 + (width - 1) / 2, 255.0, inside))
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def range_u8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Plain range [lo, hi] -> 0..255 (percentile and min-max stretches), in plain NumPy."""
    return np.rint(np.clip((np.asarray(values, np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def percentile_u8(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    a, b = np.percentile(values, [lo, hi])
    return range_u8(values, a, b)


def items_of(path: str | Path, **kwargs) -> list:
    return list(iter_items([path], SIZE, **kwargs))


def one(path: str | Path, **kwargs):
    items = items_of(path, **kwargs)
    assert len(items) == 1, [i.key for i in items]
    return items[0]


def ct_values(ds: pydicom.Dataset) -> np.ndarray:
    """Modality LUT by hand: stored value * slope + intercept (HU)."""
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def save_copy(src: str, dst: Path, **changes) -> Path:
    ds = pydicom.dcmread(src)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(dst)
    return dst


# ------------------------------------------------------------------- image files


def test_8bit_images_equal_load_image_byte_for_byte(tmp_path):
    paths = write_test_images(tmp_path / "img")
    rgb = np.asarray(Image.open(paths[3]))
    Image.fromarray(rgb).save(tmp_path / "img" / "photo.jpg", quality=90)
    Image.fromarray(rgb).save(tmp_path / "img" / "photo.bmp")
    items = items_of(tmp_path / "img")
    assert len(items) == 6
    for item in items:
        assert item.error is None, item.error
        assert item.index is None and item.key == item.source
        assert item.image.tobytes() == load_image(item.key, SIZE).tobytes(), item.key


def test_16bit_png_maps_min_max_to_8bit(tmp_path):
    rng = np.random.default_rng(1)
    values = (1000 + rng.integers(0, 3000, (50, 70))).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    item = one(path)
    assert item.meta["mode"].startswith("I;16")
    lo, hi = float(values.min()), float(values.max())
    assert_images_close(item.image, model_input(range_u8(values, lo, hi)), ONE_LEVEL, "16-bit min-max")
    windowed = one(path, windows={"*": (2000, 1000)})
    assert_images_close(windowed.image, model_input(window_u8(values, 2000, 1000)), ONE_LEVEL, "16-bit window")
    assert windowed.meta["window"] == {"center": 2000.0, "width": 1000.0, "function": "LINEAR",
                                       "source": "override *"}


# ------------------------------------------------------------------- DICOM intensities


def test_ct_default_window_matches_numpy():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds  # so the CT default applies
    item = one(path)
    assert item.meta["window"] == {"center": 40.0, "width": 400.0, "function": "LINEAR", "source": "CT default"}
    assert item.meta["modality"] == "CT" and item.meta["SOPInstanceUID"] == ds.SOPInstanceUID
    assert "PatientName" not in item.meta
    expected = model_input(window_u8(ct_values(ds), 40, 400))
    assert_images_close(item.image, expected, ONE_LEVEL, "CT_small default window")


def test_ct_file_window_follows_dicom_linear_formula(tmp_path):
    path = save_copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct_windowed.dcm",
                     WindowCenter=60, WindowWidth=350)
    hu = ct_values(pydicom.dcmread(path))
    # PS3.3 C.11.2.1.2.1, LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1].
    frac = np.clip((hu - (60 - 0.5)) / (350 - 1) + 0.5, 0, 1)
    expected = model_input(np.rint(frac * 255).astype(np.uint8))
    item = one(path)
    assert item.meta["window"]["source"] == "file window (LINEAR)"
    assert_images_close(item.image, expected, ONE_LEVEL, "file window")

    override = one(path, windows={"ct": (500, 2000)})  # modality keys are case-insensitive
    assert override.meta["window"]["source"] == "override CT"
    assert_images_close(override.image, model_input(window_u8(hu, 500, 2000)), ONE_LEVEL, "override window")
    # the same centre/width from the header and from --window give the same pixels (one formula)
    same = one(path, windows={"CT": (60, 350)})
    assert same.image.tobytes() == item.image.tobytes()


def test_mr_without_window_uses_percentiles(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.WindowCenter, ds.WindowWidth
    path = tmp_path / "mr_nowin.dcm"
    ds.save_as(path)
    item = one(path)
    assert item.meta["window"]["source"] == "percentile 0.5-99.5"
    assert_images_close(item.image, model_input(percentile_u8(ds.pixel_array.astype(np.float64))), 1e-7,
                        "MR percentile window")


def test_monochrome1_is_inverted(tmp_path):
    src = get_testdata_file("MR_small.dcm")
    m1 = one(save_copy(src, tmp_path / "mono1.dcm", PhotometricInterpretation="MONOCHROME1"))
    m2 = one(src)
    # Bicubic of 255 - x equals 255 - bicubic(x) up to PIL's round-half-up: one level.
    assert_images_close(m1.image, 1.0 - m2.image, ONE_LEVEL, "MONOCHROME1 vs inverted MONOCHROME2")
    assert np.abs(m1.image - m2.image).mean() > 0.2  # really inverted, not equal


def test_rgb_dicom_passes_through():
    path = get_testdata_file("SC_rgb_small_odd.dcm")
    item = one(path)
    rgb = pydicom.dcmread(path).pixel_array
    assert item.image.tobytes() == model_input(rgb).tobytes()


def test_multiframe_yields_one_item_per_frame():
    path = get_testdata_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    items = items_of(path)
    assert len(items) == int(ds.NumberOfFrames) == 15
    assert [i.index for i in items] == list(range(15))
    assert [i.key for i in items] == [f"{path}#{k}" for k in range(15)]
    assert "RescaleSlope" not in ds  # RT Dose scales with DoseGridScaling, not a Modality LUT
    for k in (0, 7, 14):
        expected = model_input(percentile_u8(ds.pixel_array[k].astype(np.float64)))
        assert_images_close(items[k].image, expected, ONE_LEVEL, f"rtdose frame {k}")


def test_multiframe_colour_rle():
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    items = items_of(path)
    frames = pydicom.dcmread(path).pixel_array
    assert [i.index for i in items] == [0, 1]
    for item, frame in zip(items, frames):
        assert item.image.tobytes() == model_input(frame).tobytes()


# ------------------------------------------------------------------- DICOM encodings and failures


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_data_set_without_file_meta_is_read(tmp_path, implicit_vr):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.file_meta
    ds.preamble = None
    path = tmp_path / "raw_dataset"  # no suffix, no DICM marker: recognized by content
    ds.save_as(path, enforce_file_format=False, implicit_vr=implicit_vr, little_endian=True)
    assert not pydicom.misc.is_dicom(path)
    item = one(path)
    assert item.error is None, item.error
    assert item.image.tobytes() == one(get_testdata_file("CT_small.dcm")).image.tobytes()


def test_transfer_syntax_without_any_decoder(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([ds.PixelData])  # compressed syntaxes need encapsulated fragments
    path = tmp_path / "video.dcm"
    ds.save_as(path)
    item = one(path)
    assert item.error == (f"{path}: unsupported transfer syntax MPEG2 Main Profile / Main Level "
                          f"(1.2.840.10008.1.2.4.100): pydicom has no decoder for it")


@pytest.mark.parametrize("name, sop", [("test-SR.dcm", "Comprehensive SR Storage"),
                                       ("rtstruct.dcm", "RT Structure Set Storage")])
def test_non_image_objects_are_error_items(name, sop):
    path = get_testdata_file(name)
    item = one(path)
    assert item.image is None
    assert item.error == f"{path}: not an image (SOP Class {sop}): no Pixel Data"


def test_truncated_files_are_error_items(tmp_path):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (tmp_path / "CT_small_cut_pixels.dcm").write_bytes(data[:-5000])
    (tmp_path / "CT_small_cut_header.dcm").write_bytes(data[:2000])
    header, pixels = items_of(tmp_path)
    assert header.error == (f"{tmp_path / 'CT_small_cut_header.dcm'}: not an image (SOP Class CT Image Storage): "
                            f"no Pixel Data; file truncated?")
    ds = pydicom.dcmread(tmp_path / "CT_small_cut_pixels.dcm")
    assert pixels.error == (f"{tmp_path / 'CT_small_cut_pixels.dcm'}: pixel data holds {len(ds.PixelData)} bytes, "
                            f"1 frame(s) of 128 x 128 x 1 samples at 16 bits need {128 * 128 * 2}; file truncated?")


def test_one_bad_file_never_stops_the_others(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("CT_small.dcm", "test-SR.dcm", "MR_small.dcm"):
        (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    (folder / "broken.nii.gz").write_bytes(b"garbage")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: skipped
    (tmp_path / "empty").mkdir()
    items = list(iter_items([folder, tmp_path / "empty", tmp_path / "missing.dcm"], SIZE))
    by_name = {Path(i.key).name: i for i in items}
    assert sorted(by_name) == ["CT_small.dcm", "MR_small.dcm", "broken.nii.gz", "broken.png", "empty",
                               "missing.dcm", "notes.txt", "test-SR.dcm"]
    assert {n for n, i in by_name.items() if i.image is not None} == {"CT_small.dcm", "MR_small.dcm"}
    for name, item in by_name.items():
        assert (item.image is None) != (item.error is None), name
        if item.error:
            assert name in item.error
    assert by_name["empty"].error == f"{tmp_path / 'empty'}: empty folder (no files to read)"
    assert by_name["missing.dcm"].error == f"{tmp_path / 'missing.dcm'}: no such file or folder"
    assert "not DICOM (no DICM marker" in by_name["notes.txt"].error
    assert "cannot decode image" in by_name["broken.png"].error
    assert "cannot read NIfTI" in by_name["broken.nii.gz"].error
    assert discover([folder]) == discover([folder])  # deterministic


def test_windows_are_checked_before_reading():
    with pytest.raises(InputError, match=r"window for 'CT': expected \(center, width\) with width > 0"):
        iter_slices(Source("error", Path("x"), error="x"), windows={"CT": (40, 0)})
    with pytest.raises(InputError, match=r"window for '\*'"):
        iter_items(["x"], windows={"*": ("a", 1)})
    assert check_windows({"mr": (1, 2)}) == {"MR": (1.0, 2.0)}


# ------------------------------------------------------------------- DICOM series


def write_series(folder: Path, iop: list[float], positions: list[list[float]], numbers: list[int]) -> list[int]:
    """Slices cut from CT_small; slice s carries the marker 1000 + 10 s HU in its corner.

    Files are named in shuffled order. Returns the markers.
    """
    folder.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = generate_uid()
    names = list(range(len(positions)))
    random.Random(0).shuffle(names)
    markers = []
    for s, (position, number) in enumerate(zip(positions, numbers)):
        ds = src.copy()
        pixels = src.pixel_array.copy()
        pixels[:8, :8] = 1000 + 10 * s - int(src.RescaleIntercept)  # stored value of that HU (slope 1)
        ds.PixelData = pixels.tobytes()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = position
        ds.InstanceNumber = number
        ds.save_as(folder / f"IM{names[s]:04d}")
        markers.append(1000 + 10 * s)
    return markers


@pytest.mark.parametrize("plane", ["axial", "sagittal"])
def test_series_comes_back_in_position_order(tmp_path, plane):
    if plane == "axial":
        iop, positions = [1, 0, 0, 0, 1, 0], [[0, 0, z] for z in (7.5, -5.0, 2.5, 0.0, 5.0)]
        along = [p[2] for p in positions]
    else:  # normal = row x column = (0,1,0) x (0,0,-1) = (-1, 0, 0): order by -x, not by z
        iop, positions = [0, 1, 0, 0, 0, -1], [[x, 0, 0] for x in (-7.5, 5.0, -2.5, 0.0, -5.0)]
        along = [-p[0] for p in positions]
    numbers = [3, 1, 5, 2, 4]  # shuffled, disagreeing with the positions
    write_series(tmp_path / "series", iop, positions, numbers)
    [source] = discover([tmp_path / "series"])
    assert source.kind == "dicom_series" and source.ordered_by == "ImagePositionPatient"
    items = list(iter_slices(source, SIZE, windows={"CT": (1000, 200)}))  # markers 1000..1040 visible
    assert [i.index for i in items] == list(range(5))
    assert [i.key for i in items] == [f"{source.series_uid}#{k}" for k in range(5)]
    positions_seen = [i.meta["slice_position"] for i in items]
    assert positions_seen == sorted(along)
    # slice s was written with marker 1000 + 10 s; volume order must follow the positions
    order = np.argsort(along)
    corner_levels = [round(float(i.image[0, 0, 0]) * 255) for i in items]
    expected_levels = [window_u8(np.array(1000.0 + 10 * s), 1000, 200).item() for s in order]
    assert corner_levels == expected_levels


def test_series_without_positions_falls_back_to_instance_number(tmp_path):
    write_series(tmp_path / "s", [1, 0, 0, 0, 1, 0], [[0, 0, z] for z in (0.0, 1.0, 2.0)], [2, 3, 1])
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f)
    [source] = discover([tmp_path / "s"])
    assert source.ordered_by == "InstanceNumber"
    assert [i.meta["InstanceNumber"] for i in iter_slices(source, SIZE)] == [1, 2, 3]


def test_folder_with_two_series_gives_two_sources(tmp_path):
    write_series(tmp_path / "study", [1, 0, 0, 0, 1, 0], [[0, 0, z] for z in (0.0, 1.0)], [1, 2])
    write_series(tmp_path / "study" / "other", [1, 0, 0, 0, 1, 0], [[0, 0, z] for z in (0.0, 1.0, 2.0)], [1, 2, 3])
    sources = discover([tmp_path / "study"])
    assert sorted(len(s.files) for s in sources) == [2, 3]
    assert len({s.series_uid for s in sources}) == 2


def test_read_series_volume_matches_dicom_geometry(tmp_path):
    iop = [0.8, 0.6, 0.0, 0.0, 0.0, -1.0]  # oblique rows, columns along -z
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([-10.0, 20.0, 30.0])
    positions = [list(origin + normal * 2.5 * s) for s in (3, 0, 4, 1, 2)]
    write_series(tmp_path / "s", iop, positions, [1, 2, 3, 4, 5])
    [source] = discover([tmp_path / "s"])
    vol = read_series_volume(source)
    assert vol.volume.shape == (128, 128, 5) and vol.volume.dtype == np.float32
    for k, path in enumerate(source.files):
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(vol.volume[:, :, k], ct_values(ds).T.astype(np.float32))
        # PS3.3 C.7.6.2.1.1: P(i, j) = IPP + i * column spacing * row dir + j * row spacing * column dir (LPS)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for i, j in [(0, 0), (127, 0), (5, 99)]:
            lps = np.array([float(v) for v in ds.ImagePositionPatient]) + i * dc * np.array(iop[:3]) \
                + j * dr * np.array(iop[3:])
            ras = vol.affine @ [i, j, k, 1]
            np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-6)

    (tmp_path / "s" / source.files[2].name).unlink()  # a gap in the middle
    with pytest.raises(InputError, match="uneven or zero slice spacing"):
        read_series_volume(discover([tmp_path / "s"])[0])


def test_duplicate_instances_are_reported(tmp_path):
    write_series(tmp_path / "s", [1, 0, 0, 0, 1, 0], [[0, 0, z] for z in (0.0, 1.0)], [1, 2])
    copy = tmp_path / "copy"
    copy.mkdir()
    original = sorted((tmp_path / "s").iterdir())[0]
    (copy / "dup").write_bytes(original.read_bytes())
    sources = discover([tmp_path / "s", copy])
    [error] = [s for s in sources if s.kind == "error"]
    # the first by path is kept, the other reported naming both
    assert error.error.startswith(f"{original} (series ")
    assert error.error.endswith(f"skipped, same SOPInstanceUID as {copy / 'dup'}")


# ------------------------------------------------------------------- NIfTI


def write_volume(path: Path, data: np.ndarray, affine: np.ndarray, descrip: str = "") -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = descrip.encode()
    nib.save(img, path)
    return path


@pytest.mark.parametrize("flip_x", [False, True])
def test_nifti_slices_match_numpy(tmp_path, flip_x):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 500, (20, 24, 6)).astype(np.int16)
    data[:, 18:, :] += 2000  # anterior band (high j, +y): must end up at the top of every slice
    affine = np.diag([-1.0 if flip_x else 1.0, 1.0, 2.0, 1.0])  # LAS or RAS storage
    path = write_volume(tmp_path / "vol.nii.gz", data, affine)
    items = items_of(path)
    assert [i.key for i in items] == [f"{path}#{k}" for k in range(6)]
    for k, item in enumerate(items):
        # Display frame: rows anterior -> posterior, columns patient right -> left.
        # RAS storage flips both axes; LAS storage already runs toward the left.
        ras = data[:, ::-1, k] if flip_x else data[::-1, ::-1, k]
        expected = model_input(percentile_u8(ras.T.astype(np.float64)))
        assert_images_close(item.image, expected, ONE_LEVEL, f"NIfTI slice {k}")
        assert item.image[0, :40].mean() > 0.5 > item.image[0, 80:].mean()  # anterior band is up


def test_nifti_in_hounsfield_units_gets_the_ct_window(tmp_path):
    data = np.linspace(-1000, 1000, 16 * 16 * 3).reshape(16, 16, 3).astype(np.float32)
    path = write_volume(tmp_path / "ct.nii", data, np.eye(4), descrip="CT HU")
    item = items_of(path)[1]
    assert item.meta["modality"] == "CT" and item.meta["window"]["source"] == "CT default"
    expected = model_input(window_u8(data[::-1, ::-1, 1].T.astype(np.float64), 40, 400))
    assert_images_close(item.image, expected, ONE_LEVEL, "NIfTI HU slice")
