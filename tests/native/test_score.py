"""`iqe-native score` against the Python runtime on the same ONNX engine (tiny preset).

Same results.jsonl rows (paths, order, fields, context, flags, error texts), scores and
the per-item maps/NNNNNN.npz within 1e-6; the engine manifest (schema 2, artefact,
bundle binding) refused with the Python loader's messages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from iqe.engine.build import load_runner
from iqe.engine.manifest import EngineMismatch
from iqe.model.bundle import bundle_sha256
from iqe.runtime.results import SCORE_KEYS
from tests.conftest import write_test_images
from tests.native.conftest import DEMO_BUNDLE, REPO, export_engine, pydicom_file, run_native, write_ct_series

TOL = 1e-6


def python_score(engine_dir: Path, inputs: list, out: Path, *flags: str) -> None:
    """`iqe score --backend onnxruntime` on the same engine directory, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "iqe.cli", "score", "--model", str(DEMO_BUNDLE), "--engine",
                           str(engine_dir), "--backend", "onnxruntime", *map(str, inputs), "--out", str(out),
                           "--save-maps", "--quiet", *flags], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def assert_same_results(native_out: Path, python_out: Path, tol: float = TOL) -> None:
    """Same rows (fields, order, values; scores within `tol`) and the same per-item maps files."""
    native, python = read_rows(native_out), read_rows(python_out)
    assert [r["path"] for r in native] == [r["path"] for r in python]
    for n, p in zip(native, python):
        assert list(n) == list(p), n["path"]  # same fields in the same order
        assert n.get("error") == p.get("error"), n["path"]
        for key in n:
            if key in SCORE_KEYS:
                assert n[key] == pytest.approx(p[key], abs=tol), (n["path"], key)
            elif key == "slice_position":
                assert n[key] == pytest.approx(p[key], abs=1e-9)
            else:
                assert n[key] == p[key], (n["path"], key)
    names = sorted(str(f.relative_to(python_out)) for f in (python_out / "maps").glob("*"))
    assert names == sorted(r["maps"] for r in python if "maps" in r) and names  # one file per scored item
    assert sorted(str(f.relative_to(native_out)) for f in (native_out / "maps").glob("*")) == names
    for name in names:
        with np.load(native_out / name) as a, np.load(python_out / name) as b:
            assert sorted(a.files) == sorted(b.files), name
            for key in b.files:
                assert a[key].dtype == np.float32 and a[key].shape == b[key].shape, (name, key)
                assert np.abs(a[key] - b[key]).max(initial=0) <= tol, (name, key)
    # The run record names every file the run wrote (so a rerun into the folder removes exactly those).
    record = [json.loads(line) for line in (native_out / ".iqe-run.jsonl").read_text().splitlines()]
    assert record[0]["iqe_run"] == 1 and {e["file"] for e in record[1:]} == {"results.jsonl", *names}


def bad_inputs(folder: Path) -> list[Path]:
    """Inputs the runtime must report per item, next to good ones."""
    folder.mkdir()
    (folder / "garbage.png").write_bytes(b"\x89PNG garbage")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: skipped
    shutil.copy(pydicom_file("test-SR.dcm"), folder / "report.dcm")
    data = Path(pydicom_file("CT_small.dcm")).read_bytes()
    (folder / "cut_header.dcm").write_bytes(data[:2000])
    shutil.copy(pydicom_file("MR_small.dcm"), folder / "mr.dcm")
    shutil.copy(pydicom_file("MR_small.dcm"), folder / "mr_copy.dcm")  # same SOPInstanceUID
    (folder / "empty_dir").mkdir()
    return [folder, folder / "empty_dir", folder.parent / "missing.png"]


def test_scores_maps_and_errors_equal_python(native_bin, engine_dir, tmp_path):
    images = write_test_images(tmp_path / "png")
    Image.fromarray(np.asarray(Image.open(images[3]))).save(tmp_path / "png" / "photo.jpg", quality=90)
    write_ct_series(tmp_path / "series", [7.5, 0.0, 2.5, 5.0, 10.0, 12.5, 15.0, 17.5, 20.0])
    multi = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    frame = multi.pixel_array
    multi.NumberOfFrames = 2
    multi.PixelData = np.stack([frame, frame.T]).tobytes()
    multi.SOPInstanceUID = multi.SeriesInstanceUID = pydicom.uid.generate_uid()
    multi.save_as(tmp_path / "multiframe.dcm")
    # A constant image (scored, flagged "empty") and an 8-bit greyscale DICOM without a window
    # (shown over its full stored range, like its PNG twin).
    Image.fromarray(np.full((64, 64), 77, np.uint8)).save(tmp_path / "flat.png")
    eight = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    eight.PixelData = (eight.pixel_array // 8).clip(0, 255).astype(np.uint8).tobytes()
    eight.BitsAllocated, eight.BitsStored, eight.HighBit, eight.PixelRepresentation = 8, 8, 7, 0
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in eight:
            delattr(eight, keyword)
    eight.SOPInstanceUID = eight.SeriesInstanceUID = pydicom.uid.generate_uid()
    eight.save_as(tmp_path / "eight_bit.dcm")
    inputs = [tmp_path / "png", tmp_path / "series", tmp_path / "multiframe.dcm", *bad_inputs(tmp_path / "bad"),
              tmp_path / "flat.png", tmp_path / "eight_bit.dcm", tmp_path / "png"]  # a repeated argument is read once
    run_native(native_bin, "score", engine_dir, *inputs, "--out", tmp_path / "native", "--save-maps", "--quiet")
    python_score(engine_dir, inputs, tmp_path / "python")
    assert_same_results(tmp_path / "native", tmp_path / "python")
    rows = read_rows(tmp_path / "native")
    assert sum("error" in r for r in rows) == 8 and sum("score" in r for r in rows) == 5 + 9 + 2 + 1 + 2
    assert [r["path"] for r in rows if r.get("flags") == ["empty"]] == [str(tmp_path / "flat.png")]
    assert [r["window"]["source"] for r in rows if r["path"].endswith("eight_bit.dcm")] == ["8-bit full range"]
    assert [r["item"] for r in rows] == list(range(len(rows)))
    series = [r for r in rows if "series" in r and "(series" in r["series"]]
    assert [r["slice"] for r in series] == list(range(9))
    assert [r["slice_position"] for r in series] == sorted(r["slice_position"] for r in series)


def test_fp16_engine_equal_python(native_bin, tmp_path):
    engine = tmp_path / "engine16"
    engine.mkdir()
    export_engine(engine, "fp16", max_batch=4)
    images = write_test_images(tmp_path / "png")[1:3]
    run_native(native_bin, "score", engine, *images, "--out", tmp_path / "native", "--precision", "fp16",
               "--save-maps", "--quiet")
    python_score(engine, images, tmp_path / "python", "--precision", "fp16")
    assert_same_results(tmp_path / "native", tmp_path / "python")


def python_refusal(engine_dir: Path, bundle: Path | None = None) -> str:
    with pytest.raises(EngineMismatch) as info:
        load_runner(engine_dir, "onnxruntime", "fp32", bundle=bundle)
    return str(info.value)


def test_engine_refused_with_the_python_loaders_message(native_bin, engine_dir, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(engine_dir, engine)
    image = write_test_images(tmp_path / "png")[0]
    manifest_path = engine / "manifest.onnxruntime.fp32.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["artefact"] != manifest["onnx_file"] and manifest["extra"]["optimized"]  # the optimised graph

    def refusal(*flags: str | Path) -> str:
        proc = run_native(native_bin, "score", engine, image, "--out", tmp_path / "out", *flags, check=False)
        assert proc.returncode == 2
        prefix = "iqe-native score: error: "
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(prefix), proc.stderr
        return line[len(prefix):]

    stale = [("iqe_version", "0.0.0"), ("backend_version", "0.0.1"), ("onnx_file", "gone.onnx"),
             ("onnx_sha256", "0" * 64), ("artefact_sha256", "0" * 64), ("artefact", "gone.optimized.onnx"),
             ("extra", dict(manifest["extra"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])),
             ("extra", dict(manifest["extra"], artefact_data="gone.optimized.onnx.data")),
             ("device", "cpu (x86_64, another CPU)"), ("schema", 1), ("schema", None), ("future_field", {"a": 1})]
    seen = set()
    for field, value in stale:
        manifest_path.write_text(json.dumps(dict(manifest, **{field: value})))
        expected = python_refusal(engine)
        assert refusal() == expected
        seen.add(expected)
    assert len(seen) == len(stale)  # each case refused for its own reason
    manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "built_at"}))
    assert refusal() == python_refusal(engine)
    manifest_path.write_text("{not json")
    assert refusal() == python_refusal(engine)
    manifest_path.unlink()
    assert refusal() == python_refusal(engine)

    # The bundle binding (--model): an engine that records no bundle, or another one, is refused.
    manifest_path.write_text(json.dumps(manifest))
    other = tmp_path / "other_bundle"
    shutil.copytree(DEMO_BUNDLE, other)
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")  # same model, other bytes
    assert manifest["bundle_sha256"] == bundle_sha256(DEMO_BUNDLE)
    assert refusal("--model", other) == python_refusal(engine, other)
    assert "was built from bundle" in python_refusal(engine, other)
    ok = run_native(native_bin, "score", engine, image, "--out", tmp_path / "ok", "--model", DEMO_BUNDLE, "--quiet")
    assert ok.returncode == 0
    manifest_path.write_text(json.dumps(dict(manifest, bundle_sha256=None)))
    assert refusal("--model", DEMO_BUNDLE) == python_refusal(engine, DEMO_BUNDLE)


def test_c_api(native_bin, engine_dir, tmp_path):
    """The ctest program: C callers get status codes and the runtime's messages, and
    iqe_score_files writes what `iqe-native score` writes."""
    images = [str(p) for p in write_test_images(tmp_path / "png")] + [str(tmp_path / "missing.png")]
    proc = run_native(native_bin.parent / "iqe_c_api_test", tmp_path / "c_api", engine_dir, tmp_path / "from_c",
                      *images)
    assert "all checks passed" in proc.stdout
    run_native(native_bin, "score", engine_dir, *images, "--out", tmp_path / "cli", "--save-maps", "--batch", "4",
               "--quiet")
    assert (tmp_path / "from_c" / "results.jsonl").read_text() == (tmp_path / "cli" / "results.jsonl").read_text()


def test_output_folder_rules_like_iqe_score(native_bin, engine_dir, tmp_path):
    """A folder of the user's is refused with check_out_dir's message; a rerun removes exactly the recorded files."""
    from iqe.errors import InputError
    from iqe.runtime.results import check_out_dir

    images = write_test_images(tmp_path / "png")[:2]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = run_native(native_bin, "score", engine_dir, *images, "--out", foreign, check=False)
    with pytest.raises(InputError) as info:
        check_out_dir(foreign)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"iqe-native score: error: {info.value}"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written

    out = tmp_path / "run"
    run_native(native_bin, "score", engine_dir, *images, "--out", out, "--save-maps", "--quiet")
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["000000.npz", "000001.npz"]
    (out / "mine.txt").write_text("kept")
    run_native(native_bin, "score", engine_dir, images[0], "--out", out, "--quiet")  # no maps this time
    assert not (out / "maps").exists() and (out / "mine.txt").read_text() == "kept"
    assert [r["path"] for r in read_rows(out)] == [str(images[0])]
