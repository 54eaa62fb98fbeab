"""TensorRT checks that run anywhere, and the TensorRT paths that need the real library.

- trt_lint on hand-built graphs and on the project's own exported graphs; expected
  findings come from the operator table in trt_ops.json, so the tests follow the data.
- tensorrt_backend without TensorRT: clear "not installed" errors, type stubs not taken
  for the library, and mypy against `tensorrt-stubs`.
- tensorrt_backend with TensorRT and a GPU (skipped here): build, run, refit, errors.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from iqe.engine import trt_lint
from iqe.engine.tensorrt_backend import (
    TrtBuildOptions,
    TrtRunner,
    build_engine,
    refit_engine,
    tensorrt_available,
    tensorrt_version,
)
from iqe.errors import InputError

REPO = Path(__file__).resolve().parents[2]
TABLE = json.loads(trt_lint.OPS_FILE.read_text())
OPSET = 17  # the project's export opset (iqe.export.onnx_export.OPSET)


def _model(nodes, inputs, outputs, initializers=(), opset=OPSET, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(f.domain, 1) for f in functions]
    return helper.make_model(graph, opset_imports=imports, functions=list(functions))


def _vi(name, elem=TensorProto.FLOAT, shape=("batch", 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _unsupported_op() -> str:
    """An operator the table marks unsupported that ONNX (at our opset) still defines."""
    for name, entry in TABLE["operators"].items():
        if not entry["supported"] and onnx.defs.has(name, OPSET):
            return name
    pytest.fail("trt_ops.json lists no unsupported operator that ONNX defines")


class _Tiny(torch.nn.Module):
    """Linear -> LayerNorm -> GELU -> softmax: the kinds of layers the IQE graphs use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.nn.functional.gelu(self.norm(self.fc(x))), dim=-1)


def _export_tiny(path: Path) -> onnx.ModelProto:
    # The TorchScript exporter, as iqe.export uses it; its deprecation notice is not ours to fix here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_Tiny().eval(), (torch.randn(2, 4),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=OPSET, dynamo=False)
    return onnx.load(str(path))


# -- operator table ------------------------------------------------------------------------

def test_table_names_its_source_and_covers_our_opset():
    src = TABLE["source"]
    assert (src["repo"], src["path"]) == ("onnx/onnx-tensorrt", "docs/operators.md")
    assert src["tensorrt_version"].startswith("10.")
    assert TABLE["opset"]["min"] <= OPSET <= TABLE["opset"]["max"]
    for name, entry in TABLE["operators"].items():
        assert isinstance(entry["supported"], bool) and isinstance(entry["types"], list), name
        assert entry["types"] or not entry["supported"], f"{name}: supported but no types recorded"


# -- trt_lint ------------------------------------------------------------------------------

def test_exported_torch_module_passes(tmp_path):
    model = _export_tiny(tmp_path / "tiny.onnx")
    assert trt_lint.unsupported_ops(model) == []
    assert trt_lint.lint(model) == []


def test_unsupported_op_is_reported_with_its_node_name():
    op = _unsupported_op()
    model = _model([helper.make_node("Relu", ["x"], ["r"], name="fine"),
                    helper.make_node(op, ["r"], ["y"], name="the_offender")], [_vi("x")], [_vi("y")])
    assert trt_lint.unsupported_ops(model) == [op]
    problems = trt_lint.lint(model)
    assert len(problems) == 1
    assert f"node 'the_offender' ({op})" in problems[0] and "not supported" in problems[0]


def test_operator_missing_from_the_table_is_reported():
    model = _model([helper.make_node("NotAnOnnxOp", ["x"], ["y"], name="mystery")], [_vi("x")], [_vi("y")])
    assert trt_lint.unsupported_ops(model) == ["NotAnOnnxOp"]
    assert "node 'mystery' (NotAnOnnxOp)" in trt_lint.lint(model)[0]


def test_custom_domain_is_reported():
    node = helper.make_node("FusedGelu", ["x"], ["y"], name="ort_fused", domain="com.microsoft")
    model = _model([node], [_vi("x")], [_vi("y")])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert trt_lint.unsupported_ops(model) == ["com.microsoft:FusedGelu"]
    (problem,) = trt_lint.lint(model)
    assert "node 'ort_fused' (com.microsoft:FusedGelu)" in problem and "plugin" in problem


def test_subgraphs_and_local_functions_are_walked():
    op = _unsupported_op()
    then_branch = helper.make_graph([helper.make_node(op, ["x"], ["t"], name="deep")], "then", [], [_vi("t")])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="id")], "else", [], [_vi("e")])
    cond = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)
    body = helper.make_function("local", "Wrapped", ["a"], ["b"], [helper.make_node(op, ["a"], ["b"], name="inner")],
                                [helper.make_opsetid("", OPSET)])
    call = helper.make_node("Wrapped", ["y"], ["z"], name="call", domain="local")
    model = _model([cond, call], [_vi("c", TensorProto.BOOL, ()), _vi("x")], [_vi("z")], functions=[body])
    problems = trt_lint.lint(model)
    assert any("node 'deep'" in p and "main/branch.then_branch" in p for p in problems)
    assert any("node 'inner'" in p and "function local::Wrapped" in p for p in problems)
    # The function call is inlined by the parser: it is not itself a custom-domain finding.
    assert not any("node 'call'" in p for p in problems)
    assert trt_lint.unsupported_ops(model) == [op]


@pytest.mark.parametrize("shift", [-1, 1])
def test_opset_outside_the_parser_range_is_reported(shift):
    bound = TABLE["opset"]["min"] if shift < 0 else TABLE["opset"]["max"]
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x")], [_vi("y")], opset=bound + shift)
    (problem,) = trt_lint.check_opset(model)
    assert f"opset {bound + shift}" in problem and f"{TABLE['opset']['min']}..{TABLE['opset']['max']}" in problem
    assert trt_lint.lint(model)[0] == problem
    assert trt_lint.check_opset(_model([], [_vi("x")], [_vi("x")], opset=bound)) == []


def _mask_model(mask: np.ndarray, cast_to_fp16: bool) -> onnx.ModelProto:
    """x (fp16 or fp32) + a Trilu'd constant mask, cast to fp16 when x is fp16."""
    elem = TensorProto.FLOAT16 if cast_to_fp16 else TensorProto.FLOAT
    nodes = [helper.make_node("Constant", [], ["mask"], name="mask_const", value=numpy_helper.from_array(mask)),
             helper.make_node("Trilu", ["mask"], ["upper"], name="triu", upper=1)]
    added = "upper"
    if cast_to_fp16:
        nodes.append(helper.make_node("Cast", ["upper"], ["upper16"], name="to_half", to=TensorProto.FLOAT16))
        added = "upper16"
    nodes.append(helper.make_node("Add", ["x", added], ["y"], name="masked"))
    return _model(nodes, [_vi("x", elem, (4, 4))], [_vi("y", elem, (4, 4))])


def test_fp16_graph_with_float32_min_mask_is_flagged():
    mask = np.full((4, 4), np.finfo(np.float32).min, dtype=np.float32)
    (problem,) = trt_lint.lint(_mask_model(mask, cast_to_fp16=True))
    assert "Constant node 'mask_const'" in problem and "float32's minimum" in problem
    assert "node 'to_half' (Cast)" in problem and "Trilu 'triu'" in problem
    # The same mask kept in float32 (as the text branch of an fp16 export does) is fine.
    assert trt_lint.lint(_mask_model(mask, cast_to_fp16=False)) == []
    # A mask built in the compute dtype is what the message recommends.
    assert trt_lint.lint(_mask_model(np.full((4, 4), -1e4, dtype=np.float32), cast_to_fp16=True)) == []


def test_cast_of_out_of_range_constant_is_flagged():
    big = numpy_helper.from_array(np.array([1.0, 1e5], dtype=np.float32), name="scale")
    nodes = [helper.make_node("Cast", ["scale"], ["scale16"], name="scale_to_half", to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["x", "scale16"], ["y"], name="scaled")]
    model = _model(nodes, [_vi("x", TensorProto.FLOAT16, (2,))], [_vi("y", TensorProto.FLOAT16, (2,))], [big])
    (problem,) = trt_lint.fp16_hazards(model)
    assert "initializer 'scale'" in problem and "node 'scale_to_half' (Cast)" in problem and "+-inf" in problem


def test_fp16_constant_holding_minus_inf_is_flagged():
    mask = numpy_helper.from_array(np.array([0.0, -np.inf], dtype=np.float16), name="mask16")
    model = _model([helper.make_node("Add", ["x", "mask16"], ["y"], name="add")],
                   [_vi("x", TensorProto.FLOAT16, (2,))], [_vi("y", TensorProto.FLOAT16, (2,))], [mask])
    (problem,) = trt_lint.fp16_hazards(model)
    assert "initializer 'mask16'" in problem and "-inf" in problem


@pytest.mark.slow
def test_project_exports_pass_lint(tiny_model, tmp_path):
    from iqe.export.onnx_export import export_model

    for precision in ("fp32", "fp16"):
        info = export_model(tiny_model, tmp_path, precision, max_batch=4, verify=False, progress=False)
        for graph in info.graphs.values():
            assert trt_lint.lint(onnx.load(str(tmp_path / graph.file))) == [], graph.file


# -- tensorrt_backend without TensorRT ----------------------------------------------------

no_tensorrt = pytest.mark.skipif(tensorrt_available(), reason="a real TensorRT is installed here")


def test_tensorrt_is_imported_lazily():
    code = "import sys, iqe.engine.tensorrt_backend, iqe.engine.trt_lint; print('tensorrt' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.stdout.strip() == "False", run.stderr[-2000:]


@no_tensorrt
def test_type_stubs_are_not_taken_for_tensorrt():
    # With tensorrt-stubs installed, `import tensorrt` succeeds as an empty namespace package.
    assert tensorrt_version() is None and not tensorrt_available()


@no_tensorrt
def test_entry_points_say_tensorrt_is_not_installed(tmp_path):
    onnx_path = tmp_path / "tiny.onnx"
    _export_tiny(onnx_path)
    with pytest.raises(InputError, match="TensorRT is not installed"):
        build_engine(onnx_path, tmp_path / "tiny.plan", {"x": (4,)}, TrtBuildOptions())
    with pytest.raises(InputError, match="TensorRT is not installed"):
        with TrtRunner(tmp_path / "tiny.plan"):
            pass
    with pytest.raises(InputError, match="TensorRT is not installed"):
        refit_engine(tmp_path / "tiny.plan", onnx_path)
    assert not (tmp_path / "tiny.plan").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"min_batch": 4, "opt_batch": 2}, "min <= opt <= max"),
    ({"workspace_gib": 0}, "workspace_gib"),
    ({"builder_optimization_level": 7}, "builder_optimization_level"),
    ({"refit": "sometimes"}, "refit"),
])
def test_build_options_are_validated(kwargs, match):
    with pytest.raises(InputError, match=match):
        TrtBuildOptions(**kwargs).validate()


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


# Tolerances relative to the largest |reference| value. fp32: TensorRT may run MatMul in
# TF32 (10 mantissa bits, ~5e-4 relative per operand) over two layers. fp16: the reference
# takes the same fp16-rounded inputs and weights; what is left is fp16 activations.
RTOL = {np.float32: 5e-3, np.float16: 1e-2}


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
        on_device = runner.infer({"x": torch.from_numpy(x).cuda()})["y"]
        with pytest.raises(InputError, match="input 'x' expects"):
            runner.infer({"x": x.astype(np.float64)})
        with pytest.raises(InputError, match="outside the engine's profile"):
            runner.infer({"x": np.zeros((9, 4), dtype)})
        with pytest.raises(InputError, match="missing \\['x'\\]"):
            runner.infer({"z": x})
    want = _reference(x, w1, w2, dtype)
    _assert_close(got, want, RTOL[dtype])
    _assert_close(on_device.cpu().numpy(), want, RTOL[dtype])


@needs_tensorrt
def test_parser_errors_name_the_node(tmp_path):
    op = _unsupported_op()
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
