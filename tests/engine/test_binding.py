"""Engines are bound to the bundle they were built from; stale engines are rebuilt; the
ONNX Runtime artefact that `build` writes is the one `load` opens.

Bundle hashes are recomputed here with hashlib from the files; expected scores come from
ONNX Runtime on the exported graph, opened independently of the engine code.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import onnxruntime as ort  # noqa: E402

from iqe.cli import main  # noqa: E402
from iqe.engine import onnxruntime_backend  # noqa: E402
from iqe.engine.build import build, ensure_engine, load_runner, make_runner  # noqa: E402
from iqe.engine.manifest import BundleMismatch, StaleEngine  # noqa: E402
from iqe.export.onnx_export import export_model  # noqa: E402
from iqe.model.bundle import save_bundle  # noqa: E402
from iqe.model.config import load_config  # noqa: E402
from iqe.model.iqe import IQEModel  # noqa: E402
from tests.conftest import randomize_, write_test_images  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundle_hash(bundle: Path) -> str:
    return hashlib.sha256((sha(bundle / "config.json") + sha(bundle / "model.safetensors")).encode()).hexdigest()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, seed in (("A", 1), ("B", 2)):
        torch.manual_seed(0)
        out[name] = save_bundle(randomize_(IQEModel(load_config("tiny")), seed=seed).eval(), root / name)
    return out


@pytest.fixture(scope="module")
def engine_a(bundles, tmp_path_factory):
    """An onnxruntime fp32 engine built from bundle A in an explicit folder."""
    os.environ.setdefault("IQE_CACHE", str(tmp_path_factory.mktemp("cache")))
    engine = tmp_path_factory.mktemp("engines") / "A"
    ensure_engine(bundles["A"], "onnxruntime", "fp32", engine, max_batch=4, progress=False)
    return engine


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 240, 240, generator=g).numpy()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def refusal(engine: Path, a: Path, b: Path) -> str:
    return (f"engine refused: {engine} was built from bundle {bundle_hash(a)[:16]}, not from {b} "
            f"(bundle {bundle_hash(b)[:16]}); build one for this bundle: `iqe export {b} --out NEW_DIR --precision "
            f"fp32 && iqe build NEW_DIR --backend onnxruntime --precision fp32`, or leave out --engine to use the cache")


def test_engine_of_another_bundle_is_refused(bundles, engine_a, tmp_path, capsys):
    a, b = bundles["A"], bundles["B"]
    before = _snapshot(engine_a)
    with pytest.raises(BundleMismatch) as err:
        make_runner(b, "onnxruntime", "fp32", engine_a, progress=False)
    assert str(err.value) == refusal(engine_a, a, b)
    with pytest.raises(BundleMismatch) as err:
        load_runner(engine_a, "onnxruntime", "fp32", bundle=b)
    assert str(err.value) == refusal(engine_a, a, b)

    png = write_test_images(tmp_path / "imgs")[0]
    rc = main(["score", str(png), "--model", str(b), "--engine", str(engine_a), "--backend", "onnxruntime",
               "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 2
    assert capsys.readouterr().err == f"iqe score: error: {refusal(engine_a, a, b)}\n"
    assert not (tmp_path / "out" / "results.jsonl").exists()
    assert _snapshot(engine_a) == before  # nothing rebuilt over A's engine
    with load_runner(engine_a, "onnxruntime", "fp32", bundle=a) as runner:  # A itself still loads
        assert runner.onnx_path.name == "fused.fp32.optimized.onnx"


def test_export_without_bundle_record_is_refused(bundles, tmp_path):
    from iqe.model.bundle import load_bundle

    engine = tmp_path / "engine"
    export_model(load_bundle(bundles["A"]), engine, "fp32", max_batch=2, graphs=("fused",), verify=False,
                 progress=False)
    with pytest.raises(BundleMismatch) as err:
        make_runner(bundles["A"], "onnxruntime", "fp32", engine, progress=False)
    assert str(err.value).startswith(f"engine refused: {engine} does not record the bundle it was built from, "
                                     f"not from {bundles['A']} (bundle {bundle_hash(bundles['A'])[:16]});")


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: m.pop("schema"), "manifest.onnxruntime.fp32.json has manifest schema none, this iqe writes 2"),
    (lambda m: m.update(iqe_version="0.0.0"), "built by iqe 0.0.0, this is iqe {iqe}"),
    (lambda m: m.update(backend_version="0.0.1"), "built with onnxruntime 0.0.1, this machine has {ort}"),
    (lambda m: m.update(artefact_sha256="0" * 64), "fused.fp32.optimized.onnx is missing or changed since the build"),
    (None, "manifest.onnxruntime.fp32.json is unreadable (JSONDecodeError)"),
])
def test_stale_engine_is_rebuilt_with_one_line(bundles, engine_a, images, capsys, mutate, reason):
    import iqe

    path = engine_a / "manifest.onnxruntime.fp32.json"
    data = json.loads(path.read_text())
    if mutate is None:
        path.write_text('{"backend": "onnxruntime", "precis')  # a half-written manifest
    else:
        mutate(data)
        path.write_text(json.dumps(data))
    with pytest.raises(StaleEngine):
        load_runner(engine_a, "onnxruntime", "fp32", bundle=bundles["A"])  # the strict loader refuses it
    capsys.readouterr()
    with make_runner(bundles["A"], "onnxruntime", "fp32", engine_a, progress=False) as runner:
        got = runner.infer(images)["score"]
    note = reason.format(iqe=iqe.__version__, ort=ort.__version__)
    assert capsys.readouterr().err == f"iqe: rebuilding the onnxruntime fp32 engine in {engine_a}: {note}\n"
    rebuilt = json.loads(path.read_text())
    assert rebuilt["schema"] == 2 and rebuilt["bundle_sha256"] == bundle_hash(bundles["A"])
    raw = ort.InferenceSession(str(engine_a / "fused.fp32.onnx"), providers=["CPUExecutionProvider"])
    want = raw.run(["score"], {"images": images})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_build_writes_the_artefact_that_load_opens(bundles, engine_a, images, monkeypatch):
    opened = []
    real = ort.InferenceSession

    def spy(path, opts=None, **kwargs):
        opened.append((Path(path).name, opts.graph_optimization_level if opts else None))
        return real(path, opts, **kwargs)

    manifest = json.loads((engine_a / "manifest.onnxruntime.fp32.json").read_text())
    assert manifest["artefact"] == "fused.fp32.optimized.onnx"
    assert manifest["artefact_sha256"] == sha(engine_a / "fused.fp32.optimized.onnx")
    assert manifest["onnx_sha256"] == sha(engine_a / "fused.fp32.onnx")
    assert manifest["bundle_sha256"] == bundle_hash(bundles["A"])
    assert manifest["batch_profile"] == {"images": [1, 4, 4]}
    monkeypatch.setattr(ort, "InferenceSession", spy)
    with load_runner(engine_a, "onnxruntime", "fp32", bundle=bundles["A"]) as runner:
        got = runner.infer(images)
        assert runner.preferred_batch() == 1  # CPU: batch 1 measured fastest per image
    assert opened == [("fused.fp32.optimized.onnx", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)]
    monkeypatch.setattr(ort, "InferenceSession", real)
    raw = ort.InferenceSession(str(engine_a / "fused.fp32.onnx"), providers=["CPUExecutionProvider"])
    for name, want in zip([o.name for o in raw.get_outputs()], raw.run(None, {"images": images})):
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-5, err_msg=name)
    assert sorted(p.name for p in engine_a.iterdir()) == [
        "bundle.json", "drift.onnxruntime.fp32.json", "drift.onnxruntime.fp32.md", "export.fp32.json",
        "fused.fp32.onnx", "fused.fp32.optimized.onnx", "manifest.onnxruntime.fp32.json"]


class FakeSession:
    """Stands in for a GPU ONNX Runtime session on this CPU machine; records how it was opened."""

    calls: list = []

    def __init__(self, path, opts=None, providers=None, provider_options=None):
        FakeSession.calls.append({"path": Path(path).name, "providers": providers, "options": provider_options,
                                  "saves": bool(opts and opts.optimized_model_filepath)})

    def get_providers(self):
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_outputs(self):
        return []


def test_gpu_providers_get_engine_cache_and_profiles_and_nothing_is_saved(bundles, engine_a, tmp_path, monkeypatch):
    import shutil

    engine = tmp_path / "gpu"
    shutil.copytree(engine_a, engine)
    (engine / "manifest.onnxruntime.fp32.json").unlink()
    (engine / "fused.fp32.optimized.onnx").unlink()
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime_backend, "ort_providers", lambda: gpu)
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu)
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    FakeSession.calls = []
    manifest = build(engine, "onnxruntime", "fp32", min_batch=1, opt_batch=2, max_batch=4)
    runner = load_runner(engine, "onnxruntime", "fp32", bundle=bundles["A"])
    runner.activate()
    trt_options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(engine / "ort-trt-cache"),
                   "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(engine / "ort-trt-cache"),
                   "trt_profile_min_shapes": "images:1x3x240x240", "trt_profile_opt_shapes": "images:2x3x240x240",
                   "trt_profile_max_shapes": "images:4x3x240x240"}
    expected = {"path": "fused.fp32.onnx", "providers": gpu, "options": [trt_options, {"use_tf32": "0"}, {}],
                "saves": False}
    assert FakeSession.calls == [expected, expected]  # build fills the provider's cache; load reuses it
    assert manifest.artefact == "fused.fp32.onnx" and manifest.extra == {"providers": gpu, "optimized": False}
    assert not list(engine.glob("*.optimized.*")) and (engine / "ort-trt-cache").is_dir()
    assert runner.device == "cuda"
    # Back on a CPU-only ONNX Runtime the GPU engine is stale, not silently run elsewhere.
    monkeypatch.undo()
    with pytest.raises(StaleEngine) as err:
        load_runner(engine, "onnxruntime", "fp32", bundle=bundles["A"])
    assert str(err.value) == (
        "engine refused: built for execution providers ['TensorrtExecutionProvider', 'CUDAExecutionProvider'], "
        f"which this ONNX Runtime lacks; run `iqe build {engine} --backend onnxruntime --precision fp32`")


HEAVY = ("torch", "monai", "scipy.ndimage")  # what an ONNX Runtime run of PNG / DICOM files must not import


def run_reporting_heavy_imports(code: str) -> list[str]:
    """Run `code` in a fresh interpreter; return its stdout lines, the last being which of HEAVY it imported."""
    code += f"\nimport sys\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip().splitlines()


def test_onnxruntime_runs_without_importing_torch(bundles, engine_a):
    out = run_reporting_heavy_imports(
        "import numpy as np\n"
        "from iqe.engine.build import make_runner\n"
        f"with make_runner({str(bundles['A'])!r}, 'onnxruntime', 'fp32', {str(engine_a)!r}) as r:\n"
        "    print(sorted(r.infer(np.zeros((1, 3, 240, 240), np.float32))))")
    from iqe.export.graphs import HEAD_OUTPUTS

    assert out == [str(sorted(HEAD_OUTPUTS)), "[]"]


def test_score_pngs_and_dicom_on_onnxruntime_imports_no_heavy_module(bundles, engine_a, tmp_path):
    from pydicom import examples

    inputs = write_test_images(tmp_path / "in")[:2]
    dicom = tmp_path / "in" / "ct.dcm"
    dicom.write_bytes(Path(examples.get_path("ct")).read_bytes())
    out = run_reporting_heavy_imports(
        "from iqe.cli import main\n"
        f"print(main(['score', *{[str(p) for p in inputs]!r}, {str(dicom)!r}, '--model', {str(bundles['A'])!r},"
        f" '--engine', {str(engine_a)!r}, '--backend', 'onnxruntime', '--out', {str(tmp_path / 'out')!r},"
        " '--quiet']))")
    assert out[-2:] == ["0", "[]"]
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in results) == sorted(map(str, [*inputs, dicom]))
    assert all("error" not in r and np.isfinite(r["score"]) for r in results)


def test_large_graphs_keep_their_weights_beside_the_artefact(bundles, engine_a, images, tmp_path, monkeypatch):
    import shutil

    engine = tmp_path / "large"
    shutil.copytree(engine_a, engine)
    monkeypatch.setattr(onnxruntime_backend, "EXTERNAL_DATA_ABOVE", 0)  # as if the graph were near 2 GiB
    manifest = build(engine, "onnxruntime", "fp32")
    assert manifest.extra["artefact_data"] == "fused.fp32.optimized.onnx.data"
    assert (engine / "fused.fp32.optimized.onnx.data").stat().st_size > (engine / "fused.fp32.optimized.onnx").stat().st_size
    with load_runner(engine, "onnxruntime", "fp32", bundle=bundles["A"]) as runner:
        got = runner.infer(images)["score"]
    raw = ort.InferenceSession(str(engine / "fused.fp32.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, raw.run(["score"], {"images": images})[0], rtol=0, atol=1e-5)
    (engine / "fused.fp32.optimized.onnx.data").unlink()
    with pytest.raises(StaleEngine) as err:
        load_runner(engine, "onnxruntime", "fp32", bundle=bundles["A"])
    assert str(err.value) == (f"engine refused: fused.fp32.optimized.onnx.data (the artefact's weights) is missing; "
                              f"run `iqe build {engine} --backend onnxruntime --precision fp32`")
