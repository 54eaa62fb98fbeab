"""`iqe export-triton` configs against the ONNX graph, and a real Triton server on loopback.

The server is the `tritonserver` 2.51 binary of the nvidia-pytriton wheel (Python backend
only, `.ci/setup` installs it), serving the repository's Python-backend models: the
preprocessing model, the ensemble, and the ONNX Runtime variant of the scorer.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from iqe.cli import main
from iqe.export.triton import ENSEMBLE, PREPROCESS, SCORER, export_triton, parse_config
from iqe.model.bundle import save_bundle
from iqe.runtime.results import read_results
from tests.conftest import write_test_images
from tests.scale import tritonserver

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
onnx = pytest.importorskip("onnx")

ONNX_TYPES = {1: pb.TYPE_FP32, 10: pb.TYPE_FP16}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from tests.conftest import randomize_
    import torch

    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel

    torch.manual_seed(0)
    model = randomize_(IQEModel(load_config("tiny")), seed=1).eval()
    return save_bundle(model, tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("IQE_CACHE")
    os.environ["IQE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("IQE_CACHE")
    else:
        os.environ["IQE_CACHE"] = old


def _graph_io(path: Path) -> tuple[dict, dict]:
    """{name: (onnx elem type, dims without batch)} of inputs and outputs, read with onnx itself."""
    model = onnx.load(str(path), load_external_data=False)

    def io(values):
        return {v.name: (v.type.tensor_type.elem_type, [d.dim_value if d.HasField("dim_value") else d.dim_param
                                                        for d in v.type.tensor_type.shape.dim][1:]) for v in values}

    return io(model.graph.input), io(model.graph.output)


@pytest.mark.parametrize("backend,precision,device", [("onnxruntime", "fp32", "gpu"), ("onnxruntime", "fp16", "gpu"),
                                                      ("python", "fp32", "cpu")])
def test_configs_parse_strictly_and_match_the_graph(bundle, cache, tmp_path, backend, precision, device):
    repo = export_triton(bundle, tmp_path / "repo", backend, precision, instances=2, max_batch=8, device=device,
                         progress=False)
    configs = {name: parse_config((repo / name / "config.pbtxt").read_text()) for name in (SCORER, PREPROCESS, ENSEMBLE)}
    for name, config in configs.items():
        assert config.name == name and (repo / name / "1").is_dir()
    scorer = configs[SCORER]
    inputs, outputs = _graph_io(repo / SCORER / "1" / "model.onnx")
    assert scorer.max_batch_size == 8
    assert {i.name: (i.data_type, list(i.dims)) for i in scorer.input} == \
        {k: (ONNX_TYPES[t], d) for k, (t, d) in inputs.items()}
    for out in scorer.output:  # every output of the graph, its dtype, and its per-row shape
        t, dims = outputs[out.name]
        assert out.data_type == ONNX_TYPES[t]
        if dims == []:  # [B] in the graph: Triton needs dims [1] + reshape to []
            assert list(out.dims) == [1] and out.HasField("reshape") and list(out.reshape.shape) == []
        else:
            assert list(out.dims) == dims and not out.HasField("reshape")
    assert {o.name for o in scorer.output} == set(outputs)
    assert list(scorer.dynamic_batching.preferred_batch_size) == [4, 8]
    assert scorer.dynamic_batching.max_queue_delay_microseconds > 0
    kind = pb.ModelInstanceGroup.KIND_GPU if device == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    assert [(g.count, g.kind) for g in scorer.instance_group] == [(2, kind)]
    assert scorer.version_policy.latest.num_versions == 1
    assert scorer.model_warmup[0].inputs["images"].random_data
    accel = scorer.optimization.execution_accelerators.gpu_execution_accelerator
    if precision == "fp16":
        assert [a.name for a in accel] == ["tensorrt"] and accel[0].parameters["precision_mode"] == "FP16"
    else:
        assert len(accel) == 0
    assert scorer.platform == ("onnxruntime_onnx" if backend == "onnxruntime" else "")
    assert scorer.backend == ("python" if backend == "python" else "")
    # the ensemble wires file -> preprocess.images -> scorer and exposes scores + maps
    steps = configs[ENSEMBLE].ensemble_scheduling.step
    assert [s.model_name for s in steps] == [PREPROCESS, SCORER]
    assert steps[0].output_map["images"] == steps[1].input_map["images"]
    assert configs[PREPROCESS].input[0].data_type == pb.TYPE_STRING
    # provenance travels with the repository
    facts = json.loads((repo / "iqe_repository.json").read_text())
    assert facts["engine_manifest"]["onnx_sha256"] == __import__("hashlib").sha256(
        (repo / SCORER / "1" / "model.onnx").read_bytes()).hexdigest()
    assert facts["bundle_files"]["model.safetensors"] == __import__("hashlib").sha256(
        (bundle / "model.safetensors").read_bytes()).hexdigest()
    assert scorer.parameters["iqe_bundle"].string_value == facts["bundle_key"]
    assert "tritonserver" in (repo / "README.md").read_text()


def test_bad_options_are_one_line_errors(bundle, cache, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    assert main(["export-triton", str(bundle), "--out", str(tmp_path / "taken"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (f"iqe export-triton: error: {tmp_path / 'taken'}: exists and is not a "
                                               "repository written by `iqe export-triton`; choose another --out")
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    assert main(["score", str(tmp_path), "--server", "ftp://x", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == \
        "iqe score: error: --server ftp://x: expected grpc://HOST:PORT or http://HOST:PORT"
    port = tritonserver.free_port()  # nothing listens there
    assert main(["score", str(tmp_path), "--server", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"iqe score: error: --server http://127.0.0.1:{port}: cannot reach the "
                                              "server (")


needs_server = pytest.mark.skipif(not tritonserver.available(),
                                  reason="nvidia-pytriton venv missing (bash .ci/setup installs it)")


@pytest.fixture(scope="module")
def server(bundle, cache, tmp_path_factory):
    if not tritonserver.available():
        pytest.skip("nvidia-pytriton venv missing (bash .ci/setup installs it)")
    repo = export_triton(bundle, tmp_path_factory.mktemp("triton") / "repo", "python", "fp32", instances=1,
                         max_batch=4, device="cpu", progress=False)
    with tritonserver.TritonServer(repo) as srv:
        yield srv


@needs_server
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_score_server_equals_local_scoring(bundle, cache, server, tmp_path, protocol):
    images = write_test_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "zz_bad.png").write_bytes(b"not a png")
    url = server.grpc_url if protocol == "grpc" else server.http_url
    assert main(["score", "--model", str(bundle), "--backend", "onnxruntime", str(tmp_path / "imgs"), "--out",
                 str(tmp_path / "local"), "--save-maps", "--batch", "3", "--quiet"]) == 0
    assert main(["score", "--server", url, str(tmp_path / "imgs"), "--out", str(tmp_path / "remote"), "--save-maps",
                 "--batch", "3", "--quiet"]) == 0
    want, got = read_results(tmp_path / "local"), read_results(tmp_path / "remote")
    assert [r["path"] for r in got] == [str(p) for p in images] + [str(tmp_path / "imgs" / "zz_bad.png")]
    assert [set(r) for r in got] == [set(r) for r in want]
    for a, b in zip(got, want):
        for k, v in b.items():
            if isinstance(v, float):  # same ONNX graph, same ORT: bit-identical on this machine
                assert a[k] == pytest.approx(v, abs=1e-6), (a["path"], k)
            else:
                assert a[k] == v
    scored = [r for r in want if "maps" in r]
    assert len(scored) == len(images)
    for a, b in zip(got, want):  # per-item map files (iqe score streams maps/NNNNNN.npz)
        if "maps" in b:
            ma, mb = np.load(tmp_path / "remote" / a["maps"]), np.load(tmp_path / "local" / b["maps"])
            np.testing.assert_allclose(ma["map_smooth"], mb["map_smooth"], atol=1e-6)


def _stats(server) -> tuple[int, int]:
    import tritonclient.http as http

    stats = http.InferenceServerClient(server.http_url.split("//")[1]).get_inference_statistics(SCORER)
    s = stats["model_stats"][0]
    return int(s["inference_count"]), int(s["execution_count"])


@needs_server
@pytest.mark.slow
def test_dynamic_batching_and_per_item_errors(bundle, cache, server, tmp_path):
    from iqe.engine.triton_runner import TritonRunner
    from iqe.errors import InferenceFailed

    inf0, exe0 = _stats(server)
    rng = np.random.default_rng(0)
    batch = rng.random((1, 3, 240, 240), dtype=np.float32)
    with TritonRunner(server.grpc_url) as runner:
        barrier = threading.Barrier(8)

        def one() -> None:  # 8 concurrent single-image requests, one client per thread
            barrier.wait()
            for _ in range(3):
                runner.infer(batch)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    deadline = time.monotonic() + 10  # the server records statistics after sending the responses
    while (stats := _stats(server))[0] - inf0 < 24 and time.monotonic() < deadline:
        time.sleep(0.1)
    inf1, exe1 = stats
    assert inf1 - inf0 == 24
    assert exe1 - exe0 < 24, "the dynamic batcher never joined requests"
    # a server that goes away mid-run: rows fail alone, named, after the retries
    with TritonRunner(server.grpc_url, retries=1, backoff=0.01) as runner:
        ok = runner.infer(batch)
        runner.model = "no_such_model"
        with pytest.raises(InferenceFailed) as info:
            runner.infer(np.concatenate([batch] * 5))
    assert info.value.errors[0].startswith(f"server {server.grpc_url} failed after 2 attempts: ")
    assert "no_such_model" in info.value.errors[0] and len(info.value.errors) == 5
    assert np.isfinite(ok["score"]).all()


@needs_server
@pytest.mark.slow
def test_ensemble_scores_encoded_files_like_iqe_score(bundle, cache, server, tmp_path):
    import tritonclient.grpc as grpc

    from iqe.engine.build import make_runner
    from iqe.runtime.scoring import score_inputs

    images = write_test_images(tmp_path / "imgs")
    with make_runner(bundle, "onnxruntime", progress=False) as runner:
        want = score_inputs(images, runner.infer, runner.image_size, progress=False)
    client = grpc.InferenceServerClient(server.grpc_url.split("//")[1])
    files = grpc.InferInput("file", [len(images), 1], "BYTES")
    files.set_data_from_numpy(np.array([[p.read_bytes()] for p in images], dtype=object))
    got = client.infer(ENSEMBLE, [files])
    np.testing.assert_allclose(got.as_numpy("score")[:, 0], [r.scores["score"] for r in want], atol=1e-6)
    np.testing.assert_allclose(got.as_numpy("map_max")[:, 0], [r.scores["map_max"] for r in want], atol=1e-6)
    bad = grpc.InferInput("file", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([[b"garbage"]], dtype=object))
    with pytest.raises(Exception, match="row 0: file: not DICOM"):
        client.infer(ENSEMBLE, [bad])
