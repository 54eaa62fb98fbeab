"""A few hundred damaged DICOM files in one folder: every file gets a result or a one-line error.

Seeds are pydicom's test files (greyscale, multi-frame, RLE and JPEG 2000 compressed,
colour); each mutant gets fresh UIDs (so it is read on its own, not as a duplicate of its
seed) and then one damage: random byte flips, a cut, a spliced-out or repeated chunk, or
a header attribute set to a hostile value. Undamaged copies of the seeds sit in the same
folder: their scores must equal their scores when read alone (no file costs another its
result). The model is a plain-NumPy stand-in, so this checks reading, not inference.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from iqe.runtime.results import RunOutput, read_results
from iqe.runtime.run import score_to_folder

SEEDS = ["CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
         "SC_rgb_rle_2frame.dcm", "JPGExtended.dcm", "MR_small_bigendian.dcm"]
MUTANTS = 300
HOSTILE_VALUES = {
    "Rows": [0, 1, 65535, 3], "Columns": [0, 65535, 7], "BitsAllocated": [0, 1, 7, 12, 64],
    "BitsStored": [0, 1, 9, 40], "HighBit": [0, 63], "SamplesPerPixel": [0, 2, 3, 4],
    "PixelRepresentation": [1, 2], "PhotometricInterpretation": ["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL",
                                                                 "HSV", ""],
    "NumberOfFrames": [0, 2, 1000000, -3], "PlanarConfiguration": [1, 5], "RescaleSlope": [0, -1, 1e300, "nan"],
    "RescaleIntercept": [1e308, "inf"], "WindowCenter": [0, "nan", -1e9], "WindowWidth": [0, -5, 1e-9],
    "VOILUTFunction": ["SIGMOID", "BOGUS"], "ImagePositionPatient": [["a", "b"], [1, 2]],
    "ImageOrientationPatient": [[0, 0, 0, 0, 0, 0]], "Modality": ["CT", "XX"],
}
SIZE = 240


def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
    score = batch.mean(axis=(1, 2, 3)).astype(np.float64)
    return {"score": score, "map": batch[:, 0], "map_smooth": batch[:, 1]}


def fresh(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds = copy.deepcopy(ds)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def mutate(seed: pydicom.Dataset, rng: random.Random, path: Path) -> None:
    ds = fresh(seed)
    kind = rng.choice(["flip", "flip", "cut", "splice", "repeat", "tag", "tag", "tag"])
    if kind == "tag":
        keyword = rng.choice(sorted(HOSTILE_VALUES))
        try:
            setattr(ds, keyword, rng.choice(HOSTILE_VALUES[keyword]))
            ds.save_as(path, enforce_file_format=False)
            return
        except Exception:  # noqa: BLE001  pydicom refused the value: damage the bytes instead
            kind = "flip"
    ds.save_as(path, enforce_file_format=False)
    data = bytearray(path.read_bytes())
    if kind == "flip":
        for _ in range(rng.randint(1, 24)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "cut":
        data = data[: rng.randrange(len(data))]
    else:
        start = rng.randrange(len(data))
        chunk = data[start: start + rng.randint(1, 512)]
        data = data[:start] + data[start + len(chunk):] if kind == "splice" else data[:start] + chunk + data[start:]
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_fuzzed_dicom_folder(tmp_path):
    seeds = {name: pydicom.dcmread(get_testdata_file(name)) for name in SEEDS}
    folder = tmp_path / "fuzz"
    folder.mkdir()
    rng = random.Random(20261130)
    for i in range(MUTANTS):
        name = rng.choice(SEEDS)
        mutate(seeds[name], rng, folder / f"m{i:03d}_{name}")
    intact = {}
    for name, ds in seeds.items():
        intact[name] = folder / f"intact_{name}"
        fresh(ds).save_as(intact[name], enforce_file_format=False)

    out = tmp_path / "out"
    report = score_to_folder([folder], infer, SIZE, RunOutput(out, {}), batch_size=8, progress=False)
    rows = read_results(out)
    assert report.scored + report.failed == len(rows)
    files_seen = {r.get("file") for r in rows}
    for f in folder.iterdir():  # every file is accounted for: scored or a named error
        assert str(f) in files_seen, f"{f.name}: no result"
    for r in rows:
        if "error" in r:
            assert "\n" not in r["error"] and "Traceback" not in r["error"], r["error"]
            assert r["error"].startswith(str(folder)), r["error"]  # names the file (or its series folder)
        else:
            assert r["score"] is None or np.isfinite(r["score"])
    assert report.failed > 50 and report.scored > 100  # the damage is real, and most frames still read

    for name, path in intact.items():  # undamaged files score as they do alone
        alone_out = tmp_path / f"alone_{name}"
        score_to_folder([path], infer, SIZE, RunOutput(alone_out, {}), progress=False)
        alone = {r["path"]: r.get("score") for r in read_results(alone_out)}
        mixed = {r["path"]: r.get("score") for r in rows if r.get("file") == str(path)}
        assert mixed == alone and all(v is not None for v in alone.values()), name
