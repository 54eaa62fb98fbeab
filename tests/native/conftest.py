"""Fixtures for the native runtime: the built `iqe-native` and a tiny ONNX engine.

The binary comes from `IQE_NATIVE_BIN`, else `build/native/iqe-native` (what
`.ci/setup` builds); when missing it is built here once (`native/fetch_deps.sh`, CMake).
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "native"
DEMO_BUNDLE = REPO / "iqe" / "data" / "demo_bundle"  # the tiny preset
SIZE = 240


def pydicom_file(name: str) -> str:
    """Path of one of pydicom's bundled test files."""
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return path


def build_native() -> Path:
    """Configure and build libiqe + iqe-native (incremental when already built)."""
    subprocess.run(["bash", str(REPO / "native" / "fetch_deps.sh"), sys.executable], check=True)
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(BUILD), "-j", str(max(1, len(os.sched_getaffinity(0))))], check=True,
                   stdout=subprocess.DEVNULL)
    return BUILD / "iqe-native"


@pytest.fixture(scope="session")
def native_bin() -> Path:
    path = Path(os.environ.get("IQE_NATIVE_BIN", BUILD / "iqe-native"))
    if not path.is_file():
        path = build_native()
    return path


def run_native(binary: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"iqe-native {args[0]} failed ({proc.returncode}): {proc.stderr}")
    return proc


def preprocess_native(binary: Path, inputs: list[Path], out: Path, *extra: str) -> list[dict]:
    """Native items: [{key, error, extra, image (float32 [3,S,S]), display (uint8)}]."""
    run_native(binary, "preprocess", *inputs, "--out", out, *extra)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    for item in items:
        if item.get("file"):
            item["image"] = np.load(out / item["file"])
            item["display"] = np.load(out / item["file"].replace(".npy", ".display.npy"))
    return items


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory) -> Path:
    """The demo bundle (tiny preset) exported (fused graph, fp32) and built for onnxruntime."""
    out = tmp_path_factory.mktemp("engine")
    export_engine(out, "fp32", max_batch=8)
    return out


def export_engine(out: Path, precision: str, max_batch: int) -> None:
    """What `iqe export` + `iqe build` write: graphs, bundle.json (the bundle binding), manifest.

    The exporter's own fidelity verification and FP16 policy sweep (minutes on CPU) are left
    to tests/export: parity here is native vs Python on whatever graph the engine holds, so
    fp16 takes the everything-in-FP16 policy.
    """
    from iqe.engine.build import build
    from iqe.engine.manifest import BundleRef
    from iqe.export.onnx_export import export_model
    from iqe.export.precision import PrecisionPolicy
    from iqe.model.bundle import load_bundle

    model = load_bundle(DEMO_BUNDLE)
    policy = PrecisionPolicy.everything(model.cfg.vision.layers) if precision == "fp16" else None
    export_model(model, out, precision, max_batch=max_batch, graphs=("fused",), progress=False, verify=False,
                 policy=policy)
    BundleRef.of_bundle(DEMO_BUNDLE).write(out)
    build(out, "onnxruntime", precision, max_batch=max_batch)


def write_ct_series(folder: Path, positions: list[float], seed: int = 0, sagittal: bool = False) -> str:
    """Slices of pydicom's CT_small at `positions` along z (or x, sagittal), files named in
    shuffled order, InstanceNumbers disagreeing with the positions (position must win).
    Returns the SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    uid = generate_uid()
    names = list(range(len(positions)))
    random.Random(seed).shuffle(names)
    for s, z in enumerate(positions):
        ds = copy.deepcopy(src)
        pixels = src.pixel_array.copy()
        pixels[: 8 + 4 * s, :8] = 900 + 40 * s  # a marker per slice so slices differ
        ds.PixelData = pixels.tobytes()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [float(z), 0.0, 0.0] if sagittal else [0.0, 0.0, float(z)]
        if sagittal:  # rows along y, columns along -z: the normal is -x
            ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        ds.InstanceNumber = len(positions) - s
        ds.save_as(folder / f"IM{names[s]:04d}")
    return uid
