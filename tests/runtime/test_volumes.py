"""Per-volume summaries and anomaly volumes, checked against volumes built here with known content.

The truth for `write_anomaly_volume` comes from construction: a bright cube written at
known voxels of a DICOM series / NIfTI file, and (for DICOM) its world position from the
DICOM geometry formula. The "anomaly map" fed back is the model input itself (its first
channel), so the map is bright exactly where the reader put the cube on screen; the
written volume must be bright on the cube's stored voxels.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from iqe.errors import InputError
from iqe.runtime.scoring import score_inputs
from iqe.runtime.sources import Source, discover, iter_slices
from iqe.runtime.volumes import aggregate_series, write_anomaly_volume

SIZE = 240
BRIGHT = 0.5  # threshold on the fake map: cube pixels are 1.0 and background ~0 on screen
# Resizing to 240 (bicubic) and back (bilinear) is close to the identity on the stored grid:
# IoU is 1.0 here; a flip or transpose of the cube gives ~0.
MIN_IOU = 0.9
# Windowed input vs anomaly voxel by voxel: 8-bit display plus the two resamplings. Loose
# only at the cube's sharp corners (measured 0.16: bicubic ringing sampled between pixel
# centres, or PIL's antialiased downsampling of the 300-voxel axis); <= 0.05 away from the
# cube's edges. A misplaced cube is off by ~1.
VALUE_ATOL = 0.2
# Float32 storage of the affine in the NIfTI header (srow), for affines with float64 inputs.
AFFINE_ATOL = 1e-4


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def assert_cube_lands(anomaly: np.ndarray, shown: np.ndarray, cube: np.ndarray, what: str) -> None:
    """The anomaly volume is the input as windowed for the model, voxel for voxel, cube included.

    Args:
        anomaly: the volume read back from the written NIfTI.
        shown: the input volume windowed to 0..1 in plain NumPy (what the fake map shows).
        cube: where the cube was written.
        what: names the case in failure messages.
    """
    assert anomaly.shape == cube.shape, f"{what}: shape {anomaly.shape} != {cube.shape}"
    diff = np.abs(np.nan_to_num(anomaly, nan=np.inf) - shown)
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    assert diff.max() <= VALUE_ATOL, (f"{what}: worst |diff| {diff.max():.3g} at voxel {worst} (anomaly "
                                      f"{anomaly[worst]}, input {shown[worst]}); atol={diff.max():.3g} would pass")
    bright = np.nan_to_num(anomaly, nan=0.0) > BRIGHT
    overlap = iou(bright, cube)
    argmax = np.unravel_index(int(np.nanargmax(anomaly)), anomaly.shape)
    assert overlap >= MIN_IOU, (f"{what}: IoU {overlap:.3f} < {MIN_IOU} "
                                f"({bright.sum()} bright, {cube.sum()} cube voxels)")
    assert cube[argmax], f"{what}: argmax voxel {argmax} outside the cube"


# ------------------------------------------------------------------- aggregate_series


def test_aggregate_series_max_argmax_and_failures():
    rows = [
        {"path": "a.png", "score": 0.9},  # plain 2-D file: no summary even though it scores highest
        {"path": "uid#0", "series": "S", "slice": 0, "score": 0.2},
        {"path": "uid#2", "series": "S", "slice": 2, "score": 0.7},
        {"path": "uid#1", "series": "S", "slice": 1, "error": "uid#1: cannot decode pixel data"},
        {"path": "uid#3", "series": "S", "slice": 3, "score": 0.7},  # tie with slice 2: the lower index wins
        {"path": "v.nii.gz#1", "series": "v.nii.gz", "slice": 1, "score": None},  # non-finite score
        {"path": "v.nii.gz#0", "series": "v.nii.gz", "slice": 0, "error": "boom"},
        {"path": "mf.dcm#4", "series": "mf.dcm", "slice": 4, "score": 0.1},  # slices 0..3 absent
    ]
    assert aggregate_series(rows) == [
        {"series": "S", "slices": 4, "scored": 3, "failed": 1, "score": 0.7, "argmax_slice": 2,
         "argmax_path": "uid#2", "scores": [0.2, None, 0.7, 0.7]},
        {"series": "v.nii.gz", "slices": 2, "scored": 0, "failed": 2, "score": None, "argmax_slice": None,
         "argmax_path": None, "scores": [None, None]},
        {"series": "mf.dcm", "slices": 1, "scored": 1, "failed": 0, "score": 0.1, "argmax_slice": 4,
         "argmax_path": "mf.dcm#4", "scores": [None, None, None, None, 0.1]},
    ]
    assert aggregate_series([{"path": "a.png", "score": 0.3}]) == []


def test_aggregate_series_refuses_a_slice_given_twice():
    rows = [{"path": "uid#1", "series": "S", "slice": 1, "score": 0.5}] * 2
    with pytest.raises(InputError, match=r"S: slice 1 appears twice .* pass each volume once"):
        aggregate_series(rows)


def test_aggregate_series_of_scored_rows_names_the_source(tmp_path):
    """Real rows (score_inputs): `series` is the Source.name that write_anomaly_volume takes."""
    data = np.zeros((30, 20, 5), np.float32)
    data[8:14, 4:9, 3] = 1000.0  # only slice 3 (LPS; superior axis unchanged by this affine) is bright
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)

    def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
        score = batch.mean(axis=(1, 2, 3))
        return {k: score for k in ("score", "score_query", "score_text", "score_few", "map_max")}

    results = score_inputs([path], infer, SIZE, batch_size=2, windows={"*": (500, 1000)}, progress=False)
    [summary] = aggregate_series([r.to_json() for r in results])
    [source] = discover([path])
    assert summary["series"] == source.name
    assert (summary["slices"], summary["scored"], summary["failed"]) == (5, 5, 0)
    assert summary["argmax_slice"] == 3 and summary["argmax_path"] == f"{path}#3"


# ------------------------------------------------------------------- DICOM series

ROWS, COLUMNS = 128, 96  # CT_small cropped: non-square, so a transposed map cannot pass
CUBE_ROWS, CUBE_COLUMNS, CUBE_SLICES = slice(30, 50), slice(60, 80), slice(2, 4)
CUBE_HU = 3000.0  # above CT_small's maximum (1167 HU): the only bright thing in window 2500/1000


def write_cube_series(folder: Path, iop: list[float], spacing: float, count: int = 6) -> tuple[np.ndarray, float]:
    """Slices of a cropped CT_small along the normal of `iop`, files named in reverse order.

    Slice s (s-th along the normal: volume index s) holds the cube when s is in CUBE_SLICES.
    Returns the first ImagePositionPatient and the slice step in mm.
    """
    folder.mkdir(parents=True)
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([-10.0, 20.0, 30.0])
    base = src.pixel_array[:ROWS, :COLUMNS].copy()
    uid = generate_uid()
    for s in range(count):
        ds = copy.deepcopy(src)  # a shallow copy shares the elements: PixelData set here would reach src
        pixels = base.copy()
        if CUBE_SLICES.start <= s < CUBE_SLICES.stop:
            pixels[CUBE_ROWS, CUBE_COLUMNS] = CUBE_HU - float(src.RescaleIntercept)  # slope 1: stored value
        ds.PixelData = pixels.tobytes()
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.PixelSpacing = [0.7, 0.9]  # row spacing != column spacing: a swap moves the world position
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = list(origin + normal * spacing * s)
        ds.InstanceNumber = count - s
        ds.save_as(folder / f"IM{count - s:03d}")
    return origin, spacing


@pytest.mark.parametrize("iop", [[1, 0, 0, 0, 1, 0], [0.8, 0.6, 0, 0, 0, -1]], ids=["axial", "oblique"])
def test_dicom_series_anomaly_volume_lands_on_the_cube(tmp_path, iop):
    origin, step = write_cube_series(tmp_path / "s", iop, spacing=2.5)
    [source] = discover([tmp_path / "s"])
    items = list(iter_slices(source, SIZE, windows={"CT": (2500, 1000)}))
    maps = {i.index: i.image[0] for i in items if i.index != 5}  # slice 5 "failed"

    out = write_anomaly_volume(source, maps, tmp_path / "anomaly.nii.gz")
    img = nib.load(out)
    anomaly = np.asarray(img.dataobj)
    assert anomaly.dtype == np.float32 and anomaly.shape == (COLUMNS, ROWS, 6)  # nibabel layout: [column, row, slice]
    assert np.isnan(anomaly[:, :, 5]).all() and np.isfinite(anomaly[:, :, :5]).all()

    cube = np.zeros(anomaly.shape, bool)
    cube[CUBE_COLUMNS, CUBE_ROWS, CUBE_SLICES] = True  # pixel (row r, column c) of slice s is voxel (c, r, s)
    # window 2500/1000 shows the cube white and all of CT_small black
    assert_cube_lands(anomaly[:, :, :5], cube[:, :, :5].astype(np.float32), cube[:, :, :5], f"DICOM {iop}")

    # World position of the cube's centre by the DICOM formula (PS3.3 C.7.6.2.1.1), LPS -> RAS.
    row_dir, column_dir, normal = np.array(iop[:3]), np.array(iop[3:]), np.cross(iop[:3], iop[3:])
    centre = (CUBE_COLUMNS.start + CUBE_COLUMNS.stop - 1) / 2, (CUBE_ROWS.start + CUBE_ROWS.stop - 1) / 2
    lps = origin + normal * step * 2.5 + centre[0] * 0.9 * row_dir + centre[1] * 0.7 * column_dir
    bright = np.argwhere(np.nan_to_num(anomaly) > BRIGHT).mean(axis=0)
    np.testing.assert_allclose((img.affine @ [*bright, 1])[:3], lps * [-1, -1, 1], atol=0.5)  # mm; edges blur
    assert int(img.header["sform_code"]) == 1  # scanner coordinates


# ------------------------------------------------------------------- NIfTI


def rotation_z(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


# (affine, shape, cube) with stored axes mapped differently to the world each time
NIFTI_CASES = {
    "RAS": (np.array([[1.2, 0, 0, -30], [0, 0.9, 0, 12], [0, 0, 2.5, 5], [0, 0, 0, 1]]),
            (50, 40, 7), np.s_[10:18, 5:12, 2:5]),
    "LPI": (np.array([[-1.2, 0, 0, 30], [0, -0.9, 0, 12], [0, 0, -2.5, 5], [0, 0, 0, 1]]),
            (50, 40, 7), np.s_[10:18, 5:12, 2:5]),
    # stored i -> anterior, j -> superior, k -> left (a sagittal stack), rotated 10 degrees:
    # the model sees slices along stored j
    "ASL oblique": (rotation_z(10) @ np.array([[0, 0, -2.0, 40], [1.1, 0, 0, -20], [0, 1.3, 0, 8], [0, 0, 0, 1]]),
                    (50, 40, 7), np.s_[30:40, 20:24, 1:5]),
    # 300 voxels along one in-plane axis: the model input is downsampled there
    "large": (np.diag([0.5, -1.0, 3.0, 1.0]), (300, 40, 3), np.s_[100:140, 5:12, 1:2]),
}


@pytest.mark.parametrize("case", NIFTI_CASES)
def test_nifti_anomaly_volume_lands_on_the_cube(tmp_path, case):
    affine, shape, where = NIFTI_CASES[case]
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 50, shape).astype(np.float32)
    data[where] = 1000.0
    path = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    [source] = discover([path])
    items = list(iter_slices(source, SIZE, windows={"*": (500, 1000)}))  # 0..1000 -> 0..255
    assert all(i.error is None for i in items)

    out = write_anomaly_volume(source, {i.index: i.image[0] for i in items}, tmp_path / "anomaly.nii.gz")
    img = nib.load(out)
    anomaly = np.asarray(img.dataobj)
    assert anomaly.dtype == np.float32 and np.isfinite(anomaly).all()
    np.testing.assert_allclose(img.affine, nib.load(path).affine, atol=AFFINE_ATOL)
    cube = np.zeros(shape, bool)
    cube[where] = True
    assert_cube_lands(anomaly, np.clip(data / 1000.0, 0, 1), cube, f"NIfTI {case}")


def test_nifti_missing_slices_are_nan(tmp_path):
    path = tmp_path / "in.nii"
    nib.save(nib.Nifti1Image(np.ones((20, 16, 4), np.float32), np.diag([1.0, 1.0, -2.0, 1.0])), path)
    [source] = discover([path])
    # LPS display runs inferior -> superior; the stored k axis runs superior -> inferior
    maps = {0: np.full((SIZE, SIZE), 0.25, np.float32)}
    anomaly = np.asarray(nib.load(write_anomaly_volume(source, maps, tmp_path / "a.nii")).dataobj)
    np.testing.assert_array_equal(anomaly[:, :, 3], 0.25)
    assert np.isnan(anomaly[:, :, :3]).all()


def test_write_anomaly_volume_refusals(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(b"")
    with pytest.raises(InputError, match=r"x\.png: no anomaly volume for a image source"):
        write_anomaly_volume(Source("image", png, (png,)), {}, tmp_path / "a.nii.gz")

    four_d = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), four_d)
    with pytest.raises(InputError, match=r"fmri\.nii\.gz: expected a 3-D volume, got shape \(4, 4, 3, 2\)"):
        write_anomaly_volume(Source("nifti", four_d, (four_d,)), {}, tmp_path / "a.nii.gz")

    vol = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), vol)
    source = Source("nifti", vol, (vol,))
    with pytest.raises(InputError, match=r"a\.npz: anomaly volumes are NIfTI"):
        write_anomaly_volume(source, {}, tmp_path / "a.npz")
    with pytest.raises(ValueError, match=r"slice 3 outside the volume's 3 slices"):
        write_anomaly_volume(source, {3: np.zeros((SIZE, SIZE))}, tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match=r"slice 0: expected a 2-D map"):
        write_anomaly_volume(source, {0: np.zeros((3, SIZE, SIZE))}, tmp_path / "a.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmri.nii.gz", "v.nii.gz", "x.png"]  # no partial files
