"""The TensorRT backend without TensorRT (and, on GPU nodes, with it).

- Detection: a stubs-only `tensorrt` package, a library that fails to load and a working
  one are told apart (fake packages on sys.path, so these run everywhere).
- Entry points with TensorRT hidden: the exact "not installed" message, nothing written.
- mypy against `tensorrt-stubs` (strict), proving the stubs are in effect.
- With TensorRT and a GPU (skipped here): build, run, refit, errors; fp32 without TF32.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from iqe.engine.tensorrt_backend import (
    NOT_INSTALLED,
    TrtBuildOptions,
    TrtRunner,
    build_engine,
    refit_engine,
    tensorrt_available,
    tensorrt_version,
)
from iqe.errors import InputError

REPO = Path(__file__).resolve().parents[2]
OPSET = 17


def _model(nodes, inputs, outputs, initializers=(), opset=OPSET):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, elem=TensorProto.FLOAT, shape=("batch", 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _run(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(extra_path)] * bool(extra_path) + [str(REPO)])
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path})


# -- without TensorRT ----------------------------------------------------------------------

def test_tensorrt_and_torch_are_imported_lazily():
    code = ("import sys, iqe.engine.tensorrt_backend, iqe.export.trt_lint\n"
            "from iqe.engine.registry import get_backend\n"
            "get_backend('tensorrt'); get_backend('onnxruntime')\n"
            "print(sorted(m for m in ('tensorrt', 'torch', 'onnxruntime') if m in sys.modules))")
    run = _run(code)
    assert run.stdout.strip() == "[]", run.stderr[-2000:]


@pytest.mark.parametrize("init, expected", [
    (None, "None"),  # tensorrt-stubs alone: `tensorrt/__init__.pyi`, imported as an empty namespace package
    ("raise OSError('libnvinfer.so.10: cannot open shared object file')", "None"),  # wheel without its library
    ("__version__ = '10.13.0.35'\nclass Builder:\n    pass\n", "'10.13.0.35'"),  # a usable library
])
def test_tensorrt_detection(tmp_path, init, expected):
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.pyi").write_text("def Builder() -> None: ...\n")
    if init is not None:
        (package / "__init__.py").write_text(init)
    run = _run("from iqe.engine.tensorrt_backend import tensorrt_version; print(repr(tensorrt_version()))", tmp_path)
    assert run.stdout.strip() == expected, run.stderr[-2000:]


@pytest.fixture
def hidden_tensorrt(monkeypatch):
    """Make `import tensorrt` fail here, whatever is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_entry_points_say_tensorrt_is_not_installed(tmp_path, hidden_tensorrt):
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x")], [_vi("y")]),
              str(tmp_path / "tiny.onnx"))
    assert tensorrt_version() is None
    calls = [lambda: build_engine(tmp_path / "tiny.onnx", tmp_path / "tiny.plan", {"x": (4,)}, TrtBuildOptions()),
             lambda: TrtRunner(tmp_path / "tiny.plan").activate(),
             lambda: refit_engine(tmp_path / "tiny.plan", tmp_path / "tiny.onnx")]
    for call in calls:
        with pytest.raises(InputError) as err:
            call()
        assert str(err.value) == NOT_INSTALLED
    assert NOT_INSTALLED == ("TensorRT is not installed; install it with `pip install 'iqe-engine[tensorrt]'` on a "
                             "CUDA machine, or use --backend onnxruntime or torch here")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


@pytest.mark.parametrize("kwargs, message", [
    ({"min_batch": 4, "opt_batch": 2}, "batch profile min=4 opt=2 max=32: need 1 <= min <= opt <= max"),
    ({"workspace_gib": 0}, "workspace_gib=0: must be positive"),
    ({"builder_optimization_level": 7}, "builder_optimization_level=7: must be 0..5 or None"),
    ({"refit": "sometimes"}, "refit='sometimes': choose 'none', 'weights' or 'identical'"),
])
def test_build_options_are_validated(kwargs, message):
    with pytest.raises(InputError) as err:
        TrtBuildOptions(**kwargs).validate()
    assert str(err.value) == message


def _split_params(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _repair_stub(text: str) -> str:
    """Make tensorrt-stubs' generated .pyi parse: every released version (10.8..10.13) has
    parameters named `in` (a keyword) and non-default parameters after default ones.
    Renaming and giving those parameters `= ...` leaves every signature's types intact."""
    text = re.sub(r"\bin: ", "in_: ", text)
    lines = text.split("\n")
    while True:
        try:
            ast.parse("\n".join(lines))
            return "\n".join(lines)
        except SyntaxError as err:
            match = re.match(r"(\s*def \w+\()(.*)(\) -> .*)$", lines[err.lineno - 1]) if err.lineno else None
            if match is None:
                raise
            params, defaulted = [], False
            for param in _split_params(match.group(2)):
                defaulted = defaulted or "=" in param
                params.append(param + " = ..." if defaulted and "=" not in param and ":" in param else param)
            lines[err.lineno - 1] = match.group(1) + ",".join(params) + match.group(3)


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


@pytest.mark.slow
def test_backend_type_checks_against_tensorrt_stubs():
    pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy)")
    try:
        stub_files = [f for f in metadata.files("tensorrt-stubs") or [] if f.suffix == ".pyi"]
    except metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    # Stable paths under mypy's own (git-ignored) cache folder keep its cache valid between
    # runs: a cold check spends most of a minute in torch.
    work = REPO / ".mypy_cache" / "iqe-tensorrt-stubs"
    for f in stub_files:
        _write_if_changed(work / "stubs" / f, _repair_stub(Path(f.locate()).read_text()))
    # untyped_calls_exclude: torch.cuda.Stream's constructor is unannotated in torch itself.
    _write_if_changed(work / "mypy.ini", "[mypy]\nstrict = True\nfollow_imports = silent\n"
                                         "untyped_calls_exclude = torch\n")
    # A deliberate misuse proves the stubs are in effect (else `tensorrt` would be Any and pass).
    probe = work / "trt_stub_probe.py"
    _write_if_changed(probe, "import tensorrt as trt\n\n\n"
                             "def bad(config: trt.IBuilderConfig) -> None:\n"
                             "    config.set_memory_pool_limit('WORKSPACE', 1)\n")
    target = "iqe/engine/tensorrt_backend.py"
    env = {**os.environ, "MYPYPATH": str(work / "stubs")}
    probe_arg = str(probe.relative_to(REPO))  # mypy reports paths as given
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(work / "mypy.ini"), target, probe_arg],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = run.stdout.splitlines()
    # The generated stubs themselves carry hundreds of typing errors; only ours count.
    ours = [line for line in lines if line.startswith(target)]
    assert ours == [], "\n".join(ours)
    assert any(line.startswith(probe_arg) and "set_memory_pool_limit" in line for line in lines), run.stdout[-2000:]


# -- tensorrt_backend with TensorRT (GPU nodes) --------------------------------------------

def needs_tensorrt(test):
    """Mark a test gpu and skip it unless a real TensorRT and a CUDA device are present."""
    test = pytest.mark.skipif(not tensorrt_available(),
                              reason="TensorRT is not installed (only its type stubs, or nothing)")(test)
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test)
    return pytest.mark.gpu(test)


# Tolerances relative to the largest |reference| value. fp32: build_engine clears TF32, so
# only float32 summation order is left (TF32 would need ~5e-3). fp16: the reference takes
# the same fp16-rounded inputs and weights; what is left is fp16 activations.
RTOL = {np.float32: 1e-5, np.float16: 1e-2}


def _assert_close(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    err = np.abs(got.astype(np.float64) - want)
    scale = np.abs(want).max()
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    assert err.max() <= rtol * scale, (f"worst element {worst}: got {got[worst]}, want {want[worst]:.6g}; "
                                       f"passes at rtol >= {err.max() / scale:.3g}, allowed {rtol}")


def _mlp_onnx(path: Path, w1: np.ndarray, w2: np.ndarray, dtype=np.float32) -> None:
    """y = relu(x @ w1) @ w2 with a dynamic batch axis, in `dtype` throughout."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(w1.astype(dtype), "w1"), numpy_helper.from_array(w2.astype(dtype), "w2")]
    onnx.save(_model(nodes, [_vi("x", elem, ("batch", 4))], [_vi("y", elem, ("batch", 3))], inits), str(path))


def _reference(x, w1, w2, dtype=np.float32):
    """The MLP in float64 on the values the engine sees (inputs and weights rounded to dtype)."""
    x, w1, w2 = (a.astype(dtype).astype(np.float64) for a in (x, w1, w2))
    return np.maximum(x @ w1, 0) @ w2


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)


@needs_tensorrt
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_build_and_run_matches_numpy(tmp_path, weights, dtype):
    w1, w2 = weights
    _mlp_onnx(tmp_path / "mlp.onnx", w1, w2, dtype)
    cache = tmp_path / "timing.cache"
    info = build_engine(tmp_path / "mlp.onnx", tmp_path / "mlp.plan", {"x": (4,)},
                        TrtBuildOptions(min_batch=1, opt_batch=4, max_batch=8, timing_cache=cache))
    expected_type = "FLOAT" if dtype == np.float32 else "HALF"
    assert info.inputs == {"x": expected_type} and info.outputs == {"y": expected_type}
    assert (tmp_path / "mlp.plan").is_file() and cache.is_file()
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(dtype)
    with TrtRunner(tmp_path / "mlp.plan") as runner:
        got = runner.infer_numpy({"x": x})["y"]
        on_device = runner.infer_tensors({"x": torch.from_numpy(x).cuda()})["y"]
        with pytest.raises(InputError) as err:
            runner.infer_tensors({"x": x.astype(np.float64)})
        assert str(err.value) == f"mlp.plan: input 'x' expects {torch.from_numpy(x).dtype}, got torch.float64"
        with pytest.raises(InputError) as err:
            runner.infer_tensors({"x": np.zeros((9, 4), dtype)})
        assert str(err.value) == ("mlp.plan: input 'x' shape [9, 4] is outside the engine's profile (min (1, 4), "
                                  "max (8, 4)); rebuild with a larger max batch or split the batch")
        with pytest.raises(InputError) as err:
            runner.infer_tensors({"z": x})
        assert str(err.value) == "mlp.plan: feed must hold exactly the inputs ['x']; missing ['x'], unknown ['z']"
    want = _reference(x, w1, w2, dtype)
    _assert_close(got, want, RTOL[dtype])
    _assert_close(on_device.cpu().numpy(), want, RTOL[dtype])


@needs_tensorrt
def test_parser_errors_name_the_node(tmp_path):
    from iqe.export.trt_lint import operator_table

    table = operator_table()
    op = next(name for name, entry in table.operators.items() if not entry["supported"] and onnx.defs.has(name, OPSET))
    onnx.save(_model([helper.make_node(op, ["x"], ["y"], name="the_offender")], [_vi("x")], [_vi("y")]),
              str(tmp_path / "bad.onnx"))
    with pytest.raises(InputError, match="the_offender"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.plan", {"x": (4,)})
    assert not (tmp_path / "bad.plan").exists()


@needs_tensorrt
def test_refit_loads_new_weights(tmp_path, weights):
    w1, w2 = weights
    _mlp_onnx(tmp_path / "old.onnx", w1, w2)
    build_engine(tmp_path / "old.onnx", tmp_path / "mlp.plan", {"x": (4,)}, TrtBuildOptions(refit="weights"))
    _mlp_onnx(tmp_path / "new.onnx", 2 * w1, -w2)
    refit_engine(tmp_path / "mlp.plan", tmp_path / "new.onnx")
    x = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    with TrtRunner(tmp_path / "mlp.plan") as runner:
        got = runner.infer_numpy({"x": x})["y"]
    _assert_close(got, _reference(x, 2 * w1, -w2), RTOL[np.float32])
