"""`iqe check`: exit codes, outputs, the operating point from calibration.json."""

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")

from iqe.cli import main  # noqa: E402
from tests.conftest import write_test_images  # noqa: E402


def test_check_passes_fp32_onnxruntime_with_operating_point(tiny_model, tmp_path, monkeypatch):
    from iqe.model.bundle import save_bundle

    monkeypatch.setenv("IQE_CACHE", str(tmp_path / "cache"))
    bundle = save_bundle(tiny_model, tmp_path / "bundle")
    images = write_test_images(tmp_path / "imgs")
    want = tiny_model.score(__import__("torch").from_numpy(
        np.stack([__import__("iqe.model.preprocess", fromlist=["x"]).load_image(p, 240) for p in images])))
    threshold = float(np.median(want["score"]))
    (bundle / "calibration.json").write_text(json.dumps({"operating_point": {"score": "score", "threshold": threshold}}))
    rc = main(["check", "--model", str(bundle), str(tmp_path / "imgs"), "--b", "onnxruntime:fp32",
               "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "check.json").read_text())
    assert data["passed"] and data["images"] == 4 and data["reference"] == "torch fp32"
    assert data["metrics"]["score"]["decision_flips"] == 0 and data["extra"]["operating_point"]["threshold"] == threshold
    assert data["metrics"]["map"]["corr_min"] >= 0.999 and "kendall" in data["metrics"]["score"]
    assert not any("not scored by both" in n for n in data["notes"])  # all 4 were scored by both
    assert (tmp_path / "out" / "check.png").stat().st_size > 0 and (tmp_path / "out" / "check.md").is_file()


def test_check_exit_1_past_limits_and_2_on_bad_config(tmp_path, monkeypatch, capsys):
    from iqe.export.precision import PrecisionPolicy, synthetic_images, weights_digest
    from iqe.model.bundle import load_bundle, save_bundle
    from tests.export.test_fidelity import CALIB, sensitive_tiny

    monkeypatch.setenv("IQE_CACHE", str(tmp_path / "cache"))
    bundle = save_bundle(sensitive_tiny(), tmp_path / "bundle")
    # A deliberately broken policy (every GEMM in fp16) placed where the torch backend finds the bundle's policy.
    policies = tmp_path / "cache" / "policies"
    policies.mkdir(parents=True)
    (policies / f"{weights_digest(load_bundle(bundle))}.fp16.json").write_text(
        json.dumps({"policy": PrecisionPolicy.everything(4).to_dict()}))
    folder = tmp_path / "imgs"
    folder.mkdir()
    images, names, _ = synthetic_images(CALIB, 240)
    for img, name in zip(images, names):  # the synthetic set as 8-bit PNGs (exact: grayscale replicated)
        Image.fromarray(np.rint(img[0] * 255).astype(np.uint8)).save(folder / f"{name.split('/')[1]}.png")
    rc = main(["check", "--model", str(bundle), str(folder), "--b", "torch:fp16", "--out", str(tmp_path / "out"),
               "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "past the limit: map: max abs" in err and "limit <= 0.01" in err
    assert not json.loads((tmp_path / "out" / "check.json").read_text())["passed"]
    with pytest.raises(SystemExit) as exc:
        main(["check", "--model", str(bundle), str(folder), "--b", "onnx:fp16", "--out", str(tmp_path / "o2")])
    assert exc.value.code == 2
    assert "unknown backend 'onnx' in 'onnx:fp16'; known: torch, onnxruntime, tensorrt" in capsys.readouterr().err


def test_check_reports_the_fp16_engines_policy_flops(tiny_model, tmp_path, monkeypatch, capsys):
    from iqe.model.bundle import save_bundle

    monkeypatch.setenv("IQE_CACHE", str(tmp_path / "cache"))
    bundle = save_bundle(tiny_model, tmp_path / "bundle")
    write_test_images(tmp_path / "imgs")
    rc = main(["check", "--model", str(bundle), str(tmp_path / "imgs"), "--b", "onnxruntime:fp16",
               "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "check.json").read_text())
    records = list((tmp_path / "cache").rglob("export.fp16.json"))
    assert len(records) == 1
    want = json.loads(records[0].read_text())["fp16_flop_fraction"]
    assert data["extra"]["fp16_flop_fraction"] == want >= 0.5
    assert f"fp16 FLOPs {100 * want:.0f}%" in capsys.readouterr().err
