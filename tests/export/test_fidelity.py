"""The fidelity gate: FP16 policy on a sensitive model, the gate failing the naive graph,
verification errors as clear lines, --tolerance / --no-verify, drift report round trip."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from iqe.export.fidelity import (  # noqa: E402
    Check,
    DriftReport,
    compare,
    read_drift_report,
    write_drift_report,
)
from iqe.export.onnx_export import FidelityError, export_model  # noqa: E402
from iqe.export.precision import PrecisionPolicy  # noqa: E402
from tests.conftest import REPO, randomize_  # noqa: E402
from tests.export.stress import sharpen_  # noqa: E402

CALIB = 24  # images per gate run in these tests (the CLI default for fp16 is 64)


def sensitive_tiny():
    """Tiny model with very sharp attention in block 1 and text temperature 100."""
    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel

    torch.manual_seed(0)
    return sharpen_(randomize_(IQEModel(load_config("tiny")), seed=1).eval(), {1: 300.0})


@pytest.fixture(scope="module")
def sensitive():
    return sensitive_tiny()


def test_policy_passes_where_naive_fp16_fails(sensitive, tmp_path):
    info = export_model(sensitive, tmp_path, "fp16", max_batch=8, graphs=("fused",), progress=False,
                        calib_images=CALIB)
    assert info.drift["passed"] and info.drift["map_corr_min"] >= 0.99 and info.drift["map_max_abs"] <= 1e-2
    policy = PrecisionPolicy.from_dict(info.precision_policy)
    assert 1 not in policy.blocks or "qkv" not in policy.blocks[1]  # the sharp block keeps q/k in fp32
    assert info.fp16_flop_fraction >= 0.5 and policy.fp16_flop_fraction == info.fp16_flop_fraction
    # The graph really computes GEMMs in fp16: MatMul/Gemm nodes with fp16 inputs exist.
    import onnx

    m = onnx.load(str(tmp_path / "fused.fp16.onnx"))
    fp16_inits = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(fp16_inits) >= 3 * len(policy.blocks)
    with pytest.raises(FidelityError) as err:
        export_model(sensitive, tmp_path / "naive", "fp16", max_batch=8, graphs=("fused",), progress=False,
                     calib_images=CALIB, policy=PrecisionPolicy.everything(4))
    lines = str(err.value).splitlines()
    assert lines[0] == (f"fused.fp16.onnx: onnxruntime fp16 (fused.fp16.onnx) drifts from torch fp32 past the fp16 "
                        f"contract on {CALIB} images:")
    assert len(lines) >= 3 and all("-- try --precision fp32, --tolerance " in ln and ln.endswith(", or --no-verify")
                                   for ln in lines[1:-1])
    assert any(ln.startswith("  map [fp16 arithmetic]: max abs ") for ln in lines[1:-1])
    assert lines[-1].startswith("  drift report: ") and (tmp_path / "naive" / "drift.onnxruntime.fp16.json").is_file()


def _cli(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "iqe.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_cli_error_is_clear_lines_and_tolerance_or_no_verify_pass(sensitive, tmp_path):
    from iqe.model.bundle import save_bundle

    bundle = save_bundle(sensitive, tmp_path / "bundle")
    naive = tmp_path / "naive.json"
    naive.write_text(json.dumps(PrecisionPolicy.everything(4).to_dict()))
    common = ["export", str(bundle), "--precision", "fp16", "--policy", str(naive), "--calib-images", str(CALIB),
              "--quiet"]
    bad = _cli(*common, "--out", str(tmp_path / "e1"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    err = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert err[0].startswith("iqe export: error: fused.fp16.onnx: onnxruntime fp16")
    failing = [ln for ln in err if "limit" in ln]
    assert failing and all(ln.endswith("or --no-verify") for ln in failing)
    tol = failing[0].split("--tolerance ")[1].split(",")[0]
    suggested = max(float(ln.split("--tolerance ")[1].split(",")[0]) for ln in failing)
    ok = _cli(*common, "--out", str(tmp_path / "e2"), "--tolerance", str(suggested))
    assert ok.returncode == 0, ok.stderr
    assert float(tol) > 1
    skipped = _cli(*common, "--out", str(tmp_path / "e3"), "--no-verify")
    assert skipped.returncode == 0, skipped.stderr
    record = json.loads((tmp_path / "e3" / "export.fp16.json").read_text())
    assert record["drift"] is None and record["precision_policy"]["blocks"]["1"]


def test_gate_on_analytic_cases():
    rng = np.random.default_rng(0)
    n = 64
    ref = {"score": rng.uniform(0, 2, n), "map": rng.uniform(0, 1, (n, 8, 8)).astype(np.float32)}
    same = compare(ref, {k: v.copy() for k, v in ref.items()}, "fp16")
    assert same.passed and same.metrics["score"]["spearman"] == pytest.approx(1.0)
    swapped = {"score": -ref["score"], "map": ref["map"] + 0.02}
    rep = compare(ref, swapped, "fp16")
    by = {(c.output, c.metric): c for c in rep.checks}
    assert not by[("score", "Spearman")].passed and by[("score", "Spearman")].value == pytest.approx(-1.0)
    assert not by[("map", "max abs")].passed and by[("map", "max abs")].value == pytest.approx(0.02, abs=1e-6)
    assert by[("map", "per-image correlation (min)")].passed  # a constant offset keeps the pattern
    flips = compare(ref, {"score": ref["score"] + 0.5, "map": ref["map"]}, "fp16", threshold=("score", 1.0))
    n_flip = int(((ref["score"] >= 1.0) != (ref["score"] + 0.5 >= 1.0)).sum())
    assert flips.metrics["score"]["decision_flips"] == n_flip > 0 and not flips.passed
    # fp32 contract: score limit scales with the spread; the noise floor raises abs limits.
    fp32 = compare(ref, {"score": ref["score"] + 1.5e-3, "map": ref["map"]}, "fp32")
    assert [c.passed for c in fp32.checks if c.output == "score"] == [np.ptp(ref["score"]) * 1e-3 >= 1.5e-3]
    floor = compare(ref, {"score": ref["score"], "map": ref["map"] + 5e-3}, "fp32", noise_floor={"map": 1e-3})
    assert floor.passed


def test_drift_report_round_trip(tmp_path):
    rep = DriftReport("torch fp32", "onnxruntime fp16", "fp16", 64, 1.5,
                      checks=[Check("map", "max abs", 0.02, 0.015, "max", False, "a.png")],
                      metrics={"map": {"max_abs": 0.02, "corr_min": 0.995}, "score": {"max_abs": 1e-3, "spearman": 1.0}},
                      noise_floor={"map": 1e-6}, worst_images=[{"image": "a.png", "map_corr": 0.995,
                                                                "map_max_abs": 0.02, "score_abs": 1e-3}],
                      notes=["synthetic"], extra={"fp16_flop_fraction": 0.9})
    path = write_drift_report(rep, tmp_path, "onnxruntime", "fp16")
    assert path.name == "drift.onnxruntime.fp16.json" and path.with_suffix(".md").is_file()
    back = read_drift_report(tmp_path, "onnxruntime", "fp16")
    assert back == rep and not back.passed and json.loads(path.read_text())["passed"] is False
    md = path.with_suffix(".md").read_text()
    assert "| map | max abs | 0.02 | <= 0.015 | NO |" in md and "a.png" in md
    assert read_drift_report(tmp_path, "tensorrt", "fp16") is None


def test_sweep_gates_every_image_and_hands_its_outputs_to_the_verification(sensitive):
    """The chosen policy is judged on all images (not only the working set), and the
    outputs the sweep keeps for the export's verification equal an independent run."""
    import copy

    from iqe.export.precision import apply_policy, calibration_images, choose_fp16_policy

    images, names, _, _ = calibration_images(None, 24, sensitive.cfg.image_size)
    keep: dict = {}
    log: list[str] = []
    policy, rep = choose_fp16_policy(sensitive, images, names, keep=keep, log=log.append, sweep_images=8)
    assert policy is not None and rep.images == 24 and rep.passed
    assert any(ln.startswith("chosen on 8 images") and "gate on all 24" in ln for ln in log), log
    with torch.no_grad():
        want = copy.deepcopy(sensitive).float().score(torch.from_numpy(images))
        got = apply_policy(copy.deepcopy(sensitive), policy, emulate=True).score(torch.from_numpy(images))
    for k in ("score", "map", "map_smooth", "map_max"):
        np.testing.assert_allclose(keep["reference"][k], want[k], atol=1e-5)
        np.testing.assert_allclose(keep["candidate"][k], got[k], atol=1e-5)
    again = compare(keep["reference"], keep["candidate"], "fp16", names)
    assert again.passed and again.metrics["map"] == pytest.approx(rep.metrics["map"])
    # Cheaper than judging every candidate on every image: well under one pass per evaluation.
    assert policy.sweep["image_forwards"] < 24 * (2 + 0.5 * policy.sweep["evaluations"])


def test_evaluator_replays_and_stops_early(sensitive):
    from iqe.export.precision import FP16_OPS, PolicyEvaluator, calibration_images

    images, _, _, _ = calibration_images(None, 12, sensitive.cfg.image_size)
    ev = PolicyEvaluator(sensitive, images, batch=4)
    with torch.no_grad():
        plain = sensitive.score(torch.from_numpy(images[[7, 2, 5]]))
    rows, same = ev.outputs({}, [7, 2, 5])
    assert rows == [7, 2, 5] and np.array_equal(same["map"], ev.reference["map"][[7, 2, 5]])
    np.testing.assert_allclose(same["map"], plain["map"], atol=1e-5)
    before = ev.forwards
    rows, out = ev.outputs({3: list(FP16_OPS)}, list(range(12)), stop=lambda done, got: len(done) >= 4)
    assert rows == [0, 1, 2, 3] and len(out["score"]) == 4
    assert ev.forwards - before == pytest.approx(4 * (1 - 2 / 4))  # blocks 1-2 replayed
