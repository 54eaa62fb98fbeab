"""`iqe score` on DICOM and NIfTI: every item gets a result or a clear error, the run never aborts."""

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from iqe.cli import main
from iqe.model.bundle import save_bundle
from iqe.runtime.sources import discover, iter_slices


def _series(folder, n=5):
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = generate_uid()
    folder.mkdir(parents=True)
    for i in range(n):
        ds = src.copy()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.InstanceNumber = n - i  # instance numbers disagree with positions: positions must win
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * i]
        ds.save_as(folder / f"s{(i * 3) % n}.dcm")
    return uid


def test_mixed_medical_batch(tiny_model, tmp_path):
    bundle = save_bundle(tiny_model, tmp_path / "bundle")
    odd = tmp_path / "odd"
    odd.mkdir()
    names = ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small.dcm", "test-SR.dcm", "rtdose.dcm",
             "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm"]
    for name in names:
        shutil.copy(get_testdata_file(name), odd / name)
    (odd / "truncated.dcm").write_bytes((odd / "CT_small.dcm").read_bytes()[:3000])
    (odd / "notes.txt").write_text("not an image")
    uid = _series(tmp_path / "series")
    vol = np.zeros((20, 16, 4), np.float32)
    vol[5:9, 4:8, 2] = 100
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "vol.nii.gz")
    out = tmp_path / "out"
    rc = main(["score", "--model", str(bundle), str(odd), str(tmp_path / "series"), str(tmp_path / "vol.nii.gz"),
               "--out", str(out), "--batch", "4", "--quiet", "--save-maps", "--overlays", "--volumes"])
    assert rc == 0
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    errors = {r["path"]: r["error"] for r in rows if "error" in r}
    # every error names its file and a reason
    assert any("truncated.dcm" in p for p in errors) and any("test-SR.dcm" in p for p in errors)
    assert "not an image" in next(e for p, e in errors.items() if "test-SR.dcm" in p)
    for path, err in errors.items():
        assert path.split("#")[0].split("/")[-1] in err or uid in err, (path, err)
    scored = [r for r in rows if "score" in r]
    assert any(r["path"].endswith("CT_small.dcm") for r in scored)
    assert sum("rtdose.dcm#" in r["path"] for r in scored) == 15  # multi-frame: one row per frame
    series_rows = [r for r in rows if r.get("series", "").endswith(f"(series {uid})")]
    assert [r["slice"] for r in series_rows] == list(range(5))
    assert [r["InstanceNumber"] for r in series_rows] == [5, 4, 3, 2, 1]  # ordered by position
    nifti_rows = [r for r in rows if "vol.nii.gz" in r["path"]]
    assert len(nifti_rows) == 4 and all("score" in r for r in nifti_rows)
    # scores are the model on exactly the reader's pixels
    ct = next(iter_slices(discover([odd / "CT_small.dcm"])[0]))
    direct = tiny_model.score(torch.from_numpy(ct.image[None]))
    ct_row = next(r for r in scored if r["path"].endswith("CT_small.dcm"))
    assert ct_row["score"] == pytest.approx(float(direct["score"][0]), abs=1e-5)
    # per-item files, named by the rows; every row names the file it came from
    assert sorted(out.joinpath("maps").iterdir()) == sorted(out / r["maps"] for r in scored)
    assert sorted(out.joinpath("overlays").iterdir()) == sorted(out / r["overlay"] for r in scored)
    with np.load(out / ct_row["maps"]) as m:
        np.testing.assert_allclose(m["map_smooth"], direct["map_smooth"][0], atol=1e-5)
    assert all(r["file"] == str(odd / "rtdose.dcm") for r in rows if "rtdose.dcm#" in r["path"])
    series_files = [r["file"] for r in series_rows]
    assert len(set(series_files)) == 5 and all(f.startswith(str(tmp_path / "series")) for f in series_files)

    # per-volume aggregation and anomaly volumes in the input geometry
    summaries = {json.loads(l)["series"]: json.loads(l) for l in (out / "series.jsonl").read_text().splitlines()}
    summary = next(v for k, v in summaries.items() if uid in k)
    slice_scores = [r["score"] for r in series_rows]
    assert summary["score"] == pytest.approx(max(slice_scores)) and summary["slices"] == 5
    assert summary["argmax_slice"] == int(np.argmax(slice_scores))
    volumes = sorted((out / "volumes").glob("*.nii.gz"))
    assert len(volumes) == 2  # the DICOM series and the NIfTI
    shapes = sorted(nib.load(v).shape for v in volumes)
    assert shapes == sorted([(128, 128, 5), (20, 16, 4)])
    nifti_out = next(v for v in volumes if "vol" in v.name)
    np.testing.assert_allclose(nib.load(nifti_out).affine, np.diag([2.0, 2.0, 3.0, 1.0]))
