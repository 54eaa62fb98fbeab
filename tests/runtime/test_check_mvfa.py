"""`iqe check` on an MVFA bundle: every MVFA output is judged (raw branches and fused values)."""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from iqe.cli import main  # noqa: E402
from PIL import Image  # noqa: E402
from tests.model.test_mvfa_export import sharpen_attention_, small_mvfa  # noqa: E402

MVFA_OUTPUTS = {"score", "score_zero", "score_few", "map_max", "map", "map_zero", "map_few"}


def test_check_judges_mvfa_branches_fp32_passes_broken_fp16_fails(tmp_path, monkeypatch, capsys):
    from iqe.export.precision import PrecisionPolicy, weights_digest
    from iqe.model.bundle import load_bundle, save_bundle

    monkeypatch.setenv("IQE_CACHE", str(tmp_path / "cache"))
    bundle = save_bundle(sharpen_attention_(small_mvfa(), block=1), tmp_path / "bundle")
    from iqe.export.precision import synthetic_images

    (tmp_path / "imgs").mkdir()
    images, names, _ = synthetic_images(6, 112)  # organ-like images: the sharp block's FP16 error shows on them
    for img, name in zip(images, names):
        Image.fromarray(np.rint(img[0] * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"{name.split('/')[1]}.png")
    rc = main(["check", "--model", str(bundle), str(tmp_path / "imgs"), "--b", "onnxruntime:fp32",
               "--out", str(tmp_path / "fp32"), "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "fp32" / "check.json").read_text())
    assert data["passed"] and data["images"] == 6 and MVFA_OUTPUTS <= set(data["metrics"])
    assert MVFA_OUTPUTS - {"score"} <= {c["output"] for c in data["checks"]}
    assert max(data["metrics"][k]["max_abs"] for k in ("map_zero", "map_few")) < 1e-4
    # The torch backend's FP16 runs the bundle's policy from the cache: a deliberately broken one
    # (every GEMM in FP16, the sharp block included) must show up in the raw zero-shot map too.
    policies = tmp_path / "cache" / "policies"
    policies.mkdir(parents=True)
    (policies / f"{weights_digest(load_bundle(bundle))}.fp16.json").write_text(
        json.dumps({"policy": PrecisionPolicy.everything(2).to_dict()}))
    capsys.readouterr()
    rc = main(["check", "--model", str(bundle), str(tmp_path / "imgs"), "--b", "torch:fp16",
               "--out", str(tmp_path / "fp16"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "past the limit: map_zero: max abs" in err
    data = json.loads((tmp_path / "fp16" / "check.json").read_text())
    worst = data["metrics"]["map_zero"]["max_abs"]
    assert not data["passed"] and worst > 1e-2 and np.isfinite(worst)
