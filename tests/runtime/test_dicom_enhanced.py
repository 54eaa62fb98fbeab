"""Enhanced multi-frame CT/MR (functional groups) read like their classic single-frame twins.

The enhanced objects are made by highdicom's legacy converters from classic series
written here, with rescale and window changing from slice to slice and instance numbers
that disagree with positions; the classic files, read one by one by pydicom, are the
independent truth: same pixels per slice, same order, same scores.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedMRImage
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from iqe.cli import main
from iqe.model.bundle import save_bundle
from iqe.runtime.sources import discover, iter_slices
from tests.runtime.test_sources import ONE_LEVEL, assert_images_close, model_input, window_u8

SIZE = 240
POSITIONS = [5.0, -5.0, 10.0, 0.0]  # mm along z, shuffled
NUMBERS = [3, 1, 4, 2]  # disagree with the positions


def classic_series(kind: str, folder: Path) -> list[pydicom.Dataset]:
    """Four classic slices; rescale and window differ per slice (CT) or window per slice (MR)."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm" if kind == "CT" else "MR_small.dcm"))
    uid = generate_uid()
    folder.mkdir(parents=True)
    out = []
    for i, z in enumerate(POSITIONS):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = NUMBERS[i]
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        if kind == "CT":
            ds.RescaleIntercept, ds.RescaleSlope = -1024 + 10 * i, [1, 2, 1, 0.5][i]
            ds.WindowCenter, ds.WindowWidth = 40 + 20 * i, 400 - 50 * i
        else:
            ds.WindowCenter, ds.WindowWidth = 300 + 100 * i, 600 + 100 * i
        ds.save_as(folder / f"slice{i}.dcm")
        out.append(ds)
    return out


def enhanced_twin(kind: str, datasets: list[pydicom.Dataset], path: Path) -> Path:
    cls = LegacyConvertedEnhancedCTImage if kind == "CT" else LegacyConvertedEnhancedMRImage
    enhanced = cls(legacy_datasets=datasets, series_instance_uid=generate_uid(), series_number=99,
                   sop_instance_uid=generate_uid(), instance_number=1)
    # the per-frame values really live in functional groups, not at the top level
    assert "WindowCenter" not in enhanced and "PerFrameFunctionalGroupsSequence" in enhanced
    enhanced.save_as(path)
    return path


@pytest.mark.parametrize("kind", ["CT", "MR"])
def test_enhanced_frames_equal_their_classic_slices(kind, tmp_path):
    datasets = classic_series(kind, tmp_path / "classic")
    enhanced = enhanced_twin(kind, datasets, tmp_path / "enhanced.dcm")
    [series] = discover([tmp_path / "classic"])
    classic_items = list(iter_slices(series, SIZE))
    [source] = discover([enhanced])
    frames = list(iter_slices(source, SIZE))
    assert len(frames) == len(classic_items) == 4
    assert all(f.error is None for f in frames), [f.error for f in frames]
    assert [f.index for f in frames] == list(range(4))
    assert [f.meta["slice_position"] for f in frames] == sorted(POSITIONS)
    for k, (frame, slice_) in enumerate(zip(frames, classic_items)):
        assert frame.image.tobytes() == slice_.image.tobytes(), f"frame {k} differs from classic slice {k}"
        assert frame.meta["window"] == slice_.meta["window"]
        assert frame.file == str(enhanced) and slice_.file != frame.file
    # and both equal plain NumPy on the classic file: stored * slope + intercept, then its own window
    lowest = datasets[int(np.argmin(POSITIONS))]
    values = lowest.pixel_array * float(lowest.get("RescaleSlope", 1)) + float(lowest.get("RescaleIntercept", 0))
    expected = model_input(window_u8(values, float(lowest.WindowCenter), float(lowest.WindowWidth)))
    assert_images_close(frames[0].image, expected, ONE_LEVEL, f"{kind} frame 0 vs NumPy")


def test_enhanced_and_classic_score_the_same(tiny_model, tmp_path):
    bundle = save_bundle(tiny_model, tmp_path / "bundle")
    (tmp_path / "enh").mkdir()
    enhanced = enhanced_twin("CT", classic_series("CT", tmp_path / "classic"), tmp_path / "enh" / "ct.dcm")
    out = tmp_path / "out"
    assert main(["score", "--model", str(bundle), str(tmp_path / "classic"), str(enhanced), "--out", str(out),
                 "--quiet", "--batch", "3"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    classic = {r["slice"]: r for r in rows if r["file"] != str(enhanced)}
    frames = {r["slice"]: r for r in rows if r["file"] == str(enhanced)}
    assert sorted(classic) == sorted(frames) == list(range(4))
    for k in range(4):
        assert frames[k]["score"] == pytest.approx(classic[k]["score"], abs=1e-6)
        assert frames[k]["map_max"] == pytest.approx(classic[k]["map_max"], abs=1e-6)
