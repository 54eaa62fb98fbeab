"""`iqe bench` smoke test at the tiny preset: report structure and engine == reference loop.

No timing is asserted anywhere: the numbers depend on the machine and its load. What is
checked is that the sweep produces every file and entry it promises, that a failing
configuration is recorded without stopping the sweep, and that the engine's scores equal
the reference loop's on the benchmark inputs.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from iqe.bench import add_bench_arguments, run_bench
from iqe.bench.core import parity
from iqe.bench.reference_loop import ReferenceLoopRunner
from iqe.errors import InputError
from iqe.model.iqe import smooth_outputs

pytest.importorskip("onnxruntime")

SCORE_TOL = 1e-4  # REFERENCE.md: scores within 1e-4 in float32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def one_torch_thread():
    """Tiny models on a loaded 2-core machine run several times faster on one thread (no timing is asserted)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reference_loop_equals_model(tiny_model, one_torch_thread):
    """The baseline's own math (per-image text, per-layer IQM, per-layer maps) equals IQEModel + smoothing."""
    torch.manual_seed(0)
    images = torch.rand(3, 3, 240, 240)
    with torch.no_grad():
        want = smooth_outputs({k: v.numpy() for k, v in tiny_model(images).items()}, tiny_model.cfg.sigma)
    with torch.no_grad(), ReferenceLoopRunner(tiny_model) as runner:
        got = runner.infer(images.numpy())
    for key, value in want.items():
        err = float(np.abs(got[key] - value).max())
        assert err <= 1e-5, f"{key}: reference loop vs model max abs diff {err:.3g} (tolerance 1e-5)"


def test_parity_reports_worst_difference():
    a = {"score": np.array([0.1, 0.2]), "map": np.zeros((2, 4, 4))}
    b = {"score": np.array([0.1, 0.2 + 3e-4]), "map": np.zeros((2, 4, 4))}
    p = parity(a, b, tol=1e-4)
    assert p["scores_max_abs"] == pytest.approx(3e-4) and p["maps_max_abs"] == 0.0 and not p["ok"]


def test_bad_options_name_the_way_out():
    with pytest.raises(SystemExit):
        _parse("--backends", "torch,cuda")  # argparse lists the known backends
    with pytest.raises(SystemExit):
        _parse("--ort-variants", "fastest")
    with pytest.raises(InputError, match="known presets"):
        run_bench(_parse("--preset", "vit-h-14"))


@pytest.mark.slow
def test_bench_tiny_report(tmp_path, one_torch_thread):
    from iqe.engine.tensorrt_backend import tensorrt_available

    # TensorRT is absent on CPU machines: its configuration must fail, be recorded, and not stop the sweep.
    backends = "torch,onnxruntime" + ("" if tensorrt_available() else ",tensorrt")
    out = tmp_path / "report"
    args = _parse("--preset", "tiny", "--backends", backends, "--batches", "1,2", "--warmup", "0", "--iters", "2",
                  "--series-slices", "3", "--series-size", "64", "--e2e-repeats", "1", "--gemm-seconds", "0", "--out", str(out),
                  "--engine-dir", str(tmp_path / "engine"), "--quiet")
    rc = run_bench(args)
    assert rc == (0 if tensorrt_available() else 1)

    report = json.loads((out / "report.json").read_text())
    assert {"schema", "machine", "model", "settings", "configs", "results", "targets", "files"} <= set(report)
    assert {"cpu_model", "usable_cpus", "python", "torch", "onnxruntime", "numpy", "gpu"} <= set(report["machine"])
    assert report["model"]["gflops_per_image"]["reference_total"] > report["model"]["gflops_per_image"]["engine_total"]

    results = report["results"]
    by_key = {(r["kind"], r["label"], r["batch"], r.get("format")): r for r in results}
    labels = ["reference-loop/fp32", "torch/fp32", "onnxruntime/fp32"]
    for label in labels:
        for batch in (1, 2):
            r = by_key[("model", label, batch, None)]
            assert r["status"] == "ok", r["error"]
            assert {"p50", "p95", "p99", "n"} <= set(r["latency_ms"]) and r["latency_ms"]["n"] == len(r["samples_ms"]) == 2
            assert r["images_per_s"] > 0 and r["ratio_vs_baseline"] > 0
        for fmt in ("png", "dicom"):
            assert by_key[("e2e_single", label, 1, fmt)]["status"] == "ok"
        series = by_key[("e2e_series", label, 2, "dicom")]
        assert series["status"] == "ok" and series["images"] == 3 and series["errors"] == 0
    if not tensorrt_available():
        failed = [r for r in results if r["backend"] == "tensorrt"]
        assert failed and all(r["status"] == "error" and "TensorRT" in r["error"] for r in failed)

    # Same scores as the reference loop on the benchmark inputs (model-only batches and the series).
    for r in results:
        if r["status"] == "ok" and r["backend"] in ("torch", "onnxruntime") and r["kind"] in ("model", "e2e_series"):
            assert r["parity"]["scores_max_abs"] <= SCORE_TOL, (r["label"], r["kind"], r["parity"])
    # ... and, independently of the parity bookkeeping, the single-image scores of separate runs.
    for fmt in ("png", "dicom"):
        ref = by_key[("e2e_single", "reference-loop/fp32", 1, fmt)]["score"]
        for label in labels[1:]:
            got = by_key[("e2e_single", label, 1, fmt)]["score"]
            assert abs(got - ref) <= SCORE_TOL, f"{label} {fmt}: score {got} vs reference loop {ref}"

    md = (out / "report.md").read_text()
    assert "| configuration | batch | images/s |" in md
    assert all(f"| {label} | 2 |" in md for label in labels)
    assert (out / "report.csv").read_text().startswith("kind,label,backend")
    pytest.importorskip("matplotlib")
    for name in ("throughput_vs_batch.png", "latency_distribution.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
