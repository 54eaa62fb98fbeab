"""Native (iqe-native, C++) vs Python (`iqe score` runtime) on the same ONNX Runtime engine.

Prints single-image end-to-end latency and series throughput for both, the series'
reading + preprocessing alone (no inference), and the cold start of each command line. End to end = discovery, decoding, window / PIL bicubic
preprocessing, inference (ONNX Runtime, fused graph, CPU) and per-item results; the
engine is loaded once before the warm runs (native: `iqe-native bench`, Python:
`load_runner` + `score_inputs` in this process, the loop `iqe score` runs).

    python benchmarks/native_vs_python.py [--engine ENGINE_DIR] [--repeat 10] [--slices 32]

Without --engine the demo bundle (tiny preset) is exported and built in a temporary
folder; pass an engine directory (`iqe export` + `iqe build --backend onnxruntime`) of the
ViT-L bundle for deployment numbers. Needs the native build (`bash .ci/setup`, or
`cmake -S . -B build/native && cmake --build build/native`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NATIVE = Path(os.environ.get("IQE_NATIVE_BIN", REPO / "build" / "native" / "iqe-native"))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def make_inputs(folder: Path, slices: int) -> tuple[Path, Path]:
    """One 512x512 8-bit PNG and a `slices`-slice 512x512 CT series (from pydicom's CT_small)."""
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:512]
    png = folder / "image.png"
    Image.fromarray(np.clip(128 + 50 * np.sin(xx / 13) * np.cos(yy / 17) + rng.normal(0, 10, (512, 512)), 0, 255)
                    .astype(np.uint8)).save(png)
    src = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    base = np.kron(src.pixel_array, np.ones((4, 4), dtype=src.pixel_array.dtype))  # 128 -> 512
    series = folder / "series"
    series.mkdir()
    uid = generate_uid()
    for s in range(slices):
        ds = copy.deepcopy(src)
        ds.Rows = ds.Columns = 512
        ds.PixelData = (base + rng.integers(-20, 20, base.shape)).astype(base.dtype).tobytes()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * s]
        ds.InstanceNumber = s + 1
        ds.save_as(series / f"IM{s:04d}.dcm")
    return png, series


def python_runs(engine: Path, inputs: list[Path], repeat: int, batch: int, preprocess_only: bool = False) -> dict:
    from iqe.engine.build import load_runner
    from iqe.runtime.scoring import iter_input_items, score_inputs

    t0 = time.perf_counter()
    runner = load_runner(engine, "onnxruntime", "fp32")
    runner.activate()
    load_s = time.perf_counter() - t0
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        if preprocess_only:
            items = len(list(iter_input_items(inputs, runner.image_size)))
        else:
            items = len(score_inputs(inputs, runner.infer, runner.image_size, batch, progress=False))
        runs.append(time.perf_counter() - t)
    runner.deactivate()
    return {"load_s": load_s, "runs_s": runs, "items": items}


def native_runs(engine: Path, inputs: list[Path], repeat: int, batch: int, preprocess_only: bool = False) -> dict:
    flags = ["--preprocess-only"] if preprocess_only else []
    out = subprocess.run([str(NATIVE), "bench", str(engine), *map(str, inputs), "--repeat", str(repeat), "--batch",
                          str(batch), *flags], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def cold(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return time.perf_counter() - t


def summary(runs: list[float]) -> tuple[float, float]:
    """(median, p95) in milliseconds, first run dropped (warm-up)."""
    warm = sorted(runs[1:] or runs)
    return statistics.median(warm) * 1e3, warm[min(len(warm) - 1, int(round(0.95 * (len(warm) - 1))))] * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, help="engine directory (default: demo bundle, tiny preset, built here)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (the first is warm-up)")
    p.add_argument("--slices", type=int, default=32, help="slices of the synthetic 512x512 CT series")
    p.add_argument("--batch", type=int, default=8, help="batch size for the series")
    args = p.parse_args()
    if not NATIVE.is_file():
        sys.exit(f"{NATIVE} missing: build it (bash .ci/setup, or cmake -S . -B build/native && cmake --build build/native)")
    with tempfile.TemporaryDirectory(prefix="iqe-native-bench-") as tmp_name:
        tmp = Path(tmp_name)
        engine = args.engine
        if engine is None:
            from iqe.engine.build import build
            from iqe.export.onnx_export import export_model
            from iqe.model.bundle import load_bundle

            from iqe.engine.manifest import BundleRef

            engine = tmp / "engine"
            export_model(load_bundle(REPO / "iqe" / "data" / "demo_bundle"), engine, "fp32", max_batch=args.batch,
                         graphs=("fused",), progress=False)
            BundleRef.of_bundle(REPO / "iqe" / "data" / "demo_bundle").write(engine)  # as `iqe export` records it
            build(engine, "onnxruntime", "fp32", max_batch=args.batch)
        png, series = make_inputs(tmp, args.slices)
        rows = []
        series_name = f"CT series {args.slices}x512x512"
        for name, inputs, batch, repeat, only in [
                ("single PNG 512x512, batch 1", [png], 1, args.repeat, False),
                (f"{series_name}, batch {args.batch}", [series], args.batch, max(3, args.repeat // 3), False),
                (f"{series_name}, preprocessing only", [series], args.batch, max(3, args.repeat // 3), True)]:
            py = python_runs(engine, inputs, repeat, batch, only)
            na = native_runs(engine, inputs, repeat, batch, only)
            rows.append((name, py, na))
        cold_native = cold([str(NATIVE), "score", str(engine), str(png), "--out", str(tmp / "cold-native"), "--quiet"])
        cold_python = cold([sys.executable, "-m", "iqe.cli", "score", "--model", str(REPO / "iqe/data/demo_bundle"),
                            "--engine", str(engine), "--backend", "onnxruntime", str(png), "--out",
                            str(tmp / "cold-python"), "--quiet"])
    print(f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} CPUs usable, load {os.getloadavg()[0]:.2f}")
    print(f"engine: {args.engine or 'demo bundle (tiny preset), fp32'}; onnxruntime CPU, all intra-op threads\n")
    print("| measurement | python p50 / p95 | native p50 / p95 | native speed-up |")
    print("|---|---|---|---|")
    for name, py, na in rows:
        (pm, pp), (nm, np95) = summary(py["runs_s"]), summary(na["runs_s"])
        line = f"| {name}: ms | {pm:.1f} / {pp:.1f} | {nm:.1f} / {np95:.1f} | {pm / nm:.2f}x |"
        if py["items"] > 1:
            line += f"\n| {name}: slices/s | {py['items'] / (pm / 1e3):.1f} | {na['items'] / (nm / 1e3):.1f} | |"
        print(line)
    print(f"| engine load (manifest check + session) ms | {rows[0][1]['load_s'] * 1e3:.0f} | "
          f"{rows[0][2]['load_s'] * 1e3:.0f} | |")
    print(f"| cold command line, one PNG (process start to results.jsonl) s | {cold_python:.2f} | {cold_native:.2f} | "
          f"{cold_python / cold_native:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
