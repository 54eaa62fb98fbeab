"""Clear errors before any work: environment defaults, missing extras, --compile, backends.

Missing libraries are simulated by hiding the module (None in sys.modules makes `import`
fail), so these run whatever is installed. Messages are compared whole.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iqe.cli import main
from iqe.engine.torch_backend import cxx_compiler

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "iqe" / "data" / "demo_bundle"
ORT_MISSING = "onnxruntime is not installed; install it with `pip install 'iqe-engine[onnx]'`"


@pytest.fixture
def png(tmp_path):
    from tests.conftest import write_test_images

    return write_test_images(tmp_path / "imgs")[0]


def _score(png: Path, tmp_path: Path, *extra: str) -> int:
    return main(["score", str(png), "--model", str(DEMO), "--out", str(tmp_path / "out"), "--quiet", *extra])


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iqe.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_bad_environment_never_breaks_help_and_is_refused_like_a_flag(tmp_path):
    run = _cli("score", "--help", env={"IQE_BATCH": "abc", "IQE_BACKEND": "nope", "IQE_MODEL": "/nonexistent"})
    assert run.returncode == 0 and "usage: iqe score" in run.stdout, run.stderr
    run = _cli("score", "x.png", "--out", str(tmp_path / "o"), env={"IQE_BATCH": "abc", "IQE_MODEL": str(DEMO)})
    assert (run.returncode, run.stderr) == (2, "iqe score: error: environment IQE_BATCH='abc': expected an integer, "
                                               "got 'abc'\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("env, message", [
    ({"IQE_BATCH": "0"}, "environment IQE_BATCH='0': must be >= 1, got 0"),
    ({"IQE_BATCH": "-3"}, "environment IQE_BATCH='-3': must be >= 1, got -3"),
    ({"IQE_BACKEND": "cuda"}, "environment IQE_BACKEND='cuda': unknown backend 'cuda'; choose from torch, "
                              "onnxruntime, tensorrt"),
    ({"IQE_MODEL": "/nonexistent/bundle"}, "environment IQE_MODEL='/nonexistent/bundle': /nonexistent/bundle: "
                                           "no such file or directory"),
])
def test_environment_values_are_validated(png, tmp_path, monkeypatch, capsys, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = ["score", str(png), "--out", str(tmp_path / "out"), "--quiet"]
    if "IQE_MODEL" not in env:
        args += ["--model", str(DEMO)]
    assert main(args) == 2
    assert capsys.readouterr().err == f"iqe score: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_flags_override_the_environment(png, tmp_path, monkeypatch):
    monkeypatch.setenv("IQE_BATCH", "abc")  # not read: --batch is given
    assert _score(png, tmp_path, "--batch", "2") == 0
    assert (tmp_path / "out" / "results.jsonl").is_file()


def test_bad_batch_flag_is_refused(png, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _score(png, tmp_path, "--batch", "0")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "iqe score: error: argument --batch: must be >= 1, got 0"


def test_missing_onnxruntime_is_named_with_its_install_command(png, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SystemExit):
        _score(png, tmp_path, "--backend", "onnxruntime")
    assert capsys.readouterr().err.splitlines()[-1] == f"iqe score: error: argument --backend: {ORT_MISSING}"
    monkeypatch.setenv("IQE_BACKEND", "onnxruntime")
    assert _score(png, tmp_path) == 2
    assert capsys.readouterr().err == f"iqe score: error: environment IQE_BACKEND='onnxruntime': {ORT_MISSING}\n"
    with pytest.raises(SystemExit):
        main(["build", str(tmp_path), "--backend", "onnxruntime"])
    assert capsys.readouterr().err.splitlines()[-1] == f"iqe build: error: argument --backend: {ORT_MISSING}"


def test_tensorrt_is_checked_before_any_export(png, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setenv("IQE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit):
        _score(png, tmp_path, "--backend", "tensorrt")
    assert capsys.readouterr().err.splitlines()[-1] == (
        "iqe score: error: argument --backend: TensorRT is not installed; install it with "
        "`pip install 'iqe-engine[tensorrt]'` on a CUDA machine, or use --backend onnxruntime or torch here")
    assert not (tmp_path / "cache").exists()  # nothing exported


def test_export_without_onnx_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", str(DEMO), "--out", str(tmp_path / "engine")]) == 2
    assert capsys.readouterr().err == ("iqe export: error: iqe export needs onnx, which is not installed; install "
                                       "with `pip install 'iqe-engine[onnx]'`\n")
    assert not (tmp_path / "engine").exists()


def test_an_unchecked_optional_import_is_one_line_not_a_traceback(monkeypatch, capsys):
    import iqe.cli

    def needs_plots(args):
        """Write plots."""
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(iqe.cli, "cmd_synth", needs_plots)
    assert main(["synth", "--out", "x"]) == 2
    assert capsys.readouterr().err == ("iqe synth: error: matplotlib is not installed; install it with "
                                       "`pip install 'iqe-engine[plots]'`\n")


def test_compile_only_where_it_applies(png, tmp_path, monkeypatch, capsys):
    assert _score(png, tmp_path, "--backend", "onnxruntime", "--compile") == 2
    assert capsys.readouterr().err == ("iqe score: error: --compile applies to --backend torch only (torch.compile); "
                                       "--backend onnxruntime engines are compiled by their build\n")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert cxx_compiler() is None
    assert _score(png, tmp_path, "--backend", "torch", "--compile") == 2
    assert capsys.readouterr().err == (
        "iqe score: error: --compile on CPU needs a working C++ compiler (torch.compile generates C++): install g++ "
        "(apt-get install g++) or set CXX, or drop --compile\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ here")
def test_compiler_is_found_when_present(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    assert cxx_compiler() == shutil.which("g++")


def test_build_refuses_torch(tmp_path, capsys):
    assert main(["build", str(tmp_path), "--backend", "torch"]) == 2
    assert capsys.readouterr().err == ("iqe build: error: --backend torch runs the bundle directly; `iqe build` builds "
                                       "onnxruntime or tensorrt engines\n")


def test_default_batch_scores_like_an_explicit_one(png, tmp_path):
    import json

    assert _score(png, tmp_path) == 0  # no --batch, no IQE_BATCH: the runner's preferred batch
    first = (tmp_path / "out" / "results.jsonl").read_text()
    (tmp_path / "out" / "results.jsonl").unlink()
    assert _score(png, tmp_path, "--batch", "4") == 0
    a, b = (json.loads(t.splitlines()[0]) for t in (first, (tmp_path / "out" / "results.jsonl").read_text()))
    assert abs(a["score"] - b["score"]) < 1e-5


def test_export_over_another_bundles_engines_needs_force(tmp_path, capsys):
    import hashlib

    engine = tmp_path / "engine"
    engine.mkdir()
    other = "ab" * 32
    (engine / "bundle.json").write_text(json.dumps({"bundle_sha256": other, "config_sha256": "c" * 64,
                                                    "bundle": "/models/other"}))
    (engine / "export.fp32.json").write_text("{}")
    sha = lambda name: hashlib.sha256((DEMO / name).read_bytes()).hexdigest()  # noqa: E731
    demo = hashlib.sha256((sha("config.json") + sha("model.safetensors")).encode()).hexdigest()
    assert main(["export", str(DEMO), "--out", str(engine), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"iqe export: error: --out {engine}: holds engines of bundle {other[:16]} "
                                       f"(/models/other); pass --force to re-export it for bundle {demo[:16]} "
                                       f"({DEMO})\n")
    assert sorted(p.name for p in engine.iterdir()) == ["bundle.json", "export.fp32.json"]
