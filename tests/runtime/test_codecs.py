"""Compressed DICOM decodes out of the box (pylibjpeg + plugins are default dependencies).

pydicom's own compressed test files: the lossless ones equal their uncompressed twins
(or, where pydicom ships no uncompressed twin, another lossless encoding of the same
image); the lossy ones decode, and every one of them is scored by `iqe score`.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from iqe.cli import main
from iqe.model.bundle import save_bundle
from iqe.runtime.sources import discover, iter_slices

SIZE = 240

# (compressed file, transfer syntax, its lossless twin); frames compared one by one
LOSSLESS_TWINS = [
    ("MR_small_RLE.dcm", "RLE Lossless", "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 Image Compression (Lossless Only)", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless Image Compression", "MR_small.dcm"),
    ("rtdose_rle.dcm", "RLE Lossless", "rtdose.dcm"),
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
     "SC_rgb_rle.dcm"),  # no uncompressed SC_rgb ships; RLE is lossless too
]
LOSSY = [
    ("JPGExtended.dcm", "JPEG Extended (Process 2 and 4)"),  # 12-bit JPEG Extended
    ("JPEG2000.dcm", "JPEG 2000 Image Compression"),
    ("693_J2KI.dcm", "JPEG 2000 Image Compression"),
    ("JPEGLSNearLossless_16.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression"),
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG Baseline (Process 1)"),
]


def items(name: str) -> list:
    [source] = discover([get_testdata_file(name)])
    return list(iter_slices(source, SIZE))


@pytest.mark.parametrize("name, syntax, twin", LOSSLESS_TWINS)
def test_lossless_equals_its_twin(name, syntax, twin):
    assert pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True).file_meta.TransferSyntaxUID.name == syntax
    got, expected = items(name), items(twin)
    assert len(got) == len(expected) >= 1
    for a, b in zip(got, expected):
        assert a.error is None, a.error
        assert a.image.tobytes() == b.image.tobytes(), a.key


@pytest.mark.parametrize("name, syntax", LOSSY)
def test_lossy_decodes(name, syntax):
    ds = pydicom.dcmread(get_testdata_file(name))
    assert ds.file_meta.TransferSyntaxUID.name == syntax
    [item] = items(name)
    assert item.error is None, item.error
    assert item.image.shape == (3, SIZE, SIZE) and np.ptp(item.image) > 0.1


def test_every_compressed_syntax_is_scored(tiny_model, tmp_path):
    folder = tmp_path / "compressed"
    folder.mkdir()
    names = [n for n, *_ in LOSSLESS_TWINS] + [n for n, _ in LOSSY]
    for name in names:
        shutil.copy(get_testdata_file(name), folder / name)
    bundle = save_bundle(tiny_model, tmp_path / "bundle")
    out = tmp_path / "out"
    # one argument per file: the MR_small variants share their SOPInstanceUID (one folder would flag duplicates)
    assert main(["score", "--model", str(bundle), *[str(folder / n) for n in names], "--out", str(out), "--quiet",
                 "--batch", "8"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "error" in r]
    assert {r["file"].rsplit("/", 1)[-1] for r in rows} == set(names)
    assert all(isinstance(r["score"], float) for r in rows)
