"""Exported graphs vs PyTorch, fused vs components, FP16 tolerances; engines and manifests."""

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr

pytest.importorskip("onnxruntime")

from iqe.engine.build import build, load_runner  # noqa: E402
from iqe.engine.manifest import EngineMismatch  # noqa: E402
from iqe.export.graphs import HEAD_OUTPUTS, gaussian_kernel, gaussian_smooth  # noqa: E402
from iqe.export.onnx_export import export_model  # noqa: E402


def test_separable_smoothing_equals_scipy():
    x = torch.rand(3, 240, 240, dtype=torch.float64)
    got = gaussian_smooth(x, gaussian_kernel(8.0)).numpy()
    want = np.stack([gaussian_filter(m, sigma=8.0) for m in x.numpy()])
    assert np.abs(got - want).max() < 1e-12


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from tests.conftest import randomize_
    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel

    torch.manual_seed(0)
    model = randomize_(IQEModel(load_config("tiny")), seed=1).eval()
    out = tmp_path_factory.mktemp("engine")
    info = {p: export_model(model, out, p, max_batch=8, progress=False) for p in ("fp32", "fp16")}
    return model, out, info


def test_every_graph_checked_and_verified(engines):
    _, out, info = engines
    for precision, tol in (("fp32", 1e-4), ("fp16", 1e-2)):
        assert set(info[precision].graphs) == {"image_encoder", "text_branch", "head", "fused"}
        for g in info[precision].graphs.values():
            assert (out / g.file).is_file() and g.verify_max_abs <= tol
            assert g.trt_lint == [], g.trt_lint  # every operator parses in TensorRT, no FP16 hazard
    meta = json.loads((out / "export.fp32.json").read_text())
    assert meta["opset"] >= 17 and meta["graphs"]["fused"]["inputs"]["images"][0] == "batch"


def _images(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 240, 240, generator=g)
    return base.expand(n, 3, 240, 240).contiguous().numpy()


def test_onnxruntime_fp32_and_fp16_vs_torch(engines):
    model, out, _ = engines
    images = _images()
    want = model.score(torch.from_numpy(images))
    for precision in ("fp32", "fp16"):
        build(out, "onnxruntime", precision)
        with load_runner(out, "onnxruntime", precision) as runner:
            got = runner.infer(images)
        assert set(got) == set(HEAD_OUTPUTS)
        if precision == "fp32":
            for k in ("score", "score_query", "score_text", "score_few", "map_max"):
                np.testing.assert_allclose(got[k], want[k], atol=1e-4, err_msg=k)
            for k in ("map", "map_smooth"):
                assert np.abs(got[k] - want[k]).max() <= 1e-4, k
        else:
            assert np.abs(got["map"] - want["map"]).max() <= 1e-2
            assert np.abs(got["map_smooth"] - want["map_smooth"]).max() <= 1e-2
            rho = spearmanr(got["score"], want["score"]).statistic
            assert rho >= 0.999, rho


def test_fused_equals_components(engines):
    import onnxruntime as ort

    _, out, _ = engines
    images = _images(3, seed=1)
    sess = {n: ort.InferenceSession(str(out / f"{n}.fp32.onnx"), providers=["CPUExecutionProvider"])
            for n in ("image_encoder", "text_branch", "head", "fused")}
    g, tokens = sess["image_encoder"].run(None, {"images": images})
    (text,) = sess["text_branch"].run(None, {"global_feature": g})
    parts = sess["head"].run(None, {"global_feature": g, "text": text, "tokens": tokens})
    fused = sess["fused"].run(None, {"images": images})
    for name, a, b in zip(HEAD_OUTPUTS, parts, fused):
        assert np.abs(a - b).max() <= 1e-5, name


def test_manifest_mismatch_refused(engines):
    _, out, _ = engines
    build(out, "onnxruntime", "fp32")
    manifest = out / "manifest.onnxruntime.fp32.json"
    data = json.loads(manifest.read_text())
    data["onnx_sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(EngineMismatch, match=r"onnx_sha256 of fused\.fp32\.onnx differs.*iqe build"):
        load_runner(out, "onnxruntime", "fp32")
    data = json.loads(manifest.read_text())
    build(out, "onnxruntime", "fp32")
    data = json.loads(manifest.read_text())
    data["backend_version"] = "0.0.1"
    manifest.write_text(json.dumps(data))
    with pytest.raises(EngineMismatch, match="built with onnxruntime 0.0.1"):
        load_runner(out, "onnxruntime", "fp32")
    (out / "manifest.onnxruntime.fp16.json").unlink(missing_ok=True)
    with pytest.raises(EngineMismatch) as err:
        load_runner(out, "onnxruntime", "fp16")
    assert str(err.value) == (f"{out}: no onnxruntime fp16 engine (manifest.onnxruntime.fp16.json missing); "
                              f"run `iqe build {out} --backend onnxruntime --precision fp16`")
