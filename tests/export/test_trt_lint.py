"""trt_lint: TensorRT parser support and FP16 hazards of ONNX graphs, checked without TensorRT.

Hand-built graphs and the project's own exported graphs; expected findings come from the
operator table in trt_ops.json (so the tests follow the data) and are compared as whole
messages.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from iqe.export import trt_lint

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
    trt = TABLE["source"]["tensorrt_version"]
    assert trt_lint.lint(model) == [f"node 'the_offender' ({op}): '{op}' is not supported by TensorRT {trt}'s "
                                    "ONNX parser; re-export without it (or decompose it in the export)"]


def test_operator_missing_from_the_table_is_reported():
    model = _model([helper.make_node("NotAnOnnxOp", ["x"], ["y"], name="mystery")], [_vi("x")], [_vi("y")])
    assert trt_lint.unsupported_ops(model) == ["NotAnOnnxOp"]
    trt = TABLE["source"]["tensorrt_version"]
    assert trt_lint.lint(model) == [f"node 'mystery' (NotAnOnnxOp): 'NotAnOnnxOp' is not in TensorRT {trt}'s "
                                    "operator list (trt_ops.json); re-export with an equivalent standard operator"]


def test_custom_domain_is_reported():
    node = helper.make_node("FusedGelu", ["x"], ["y"], name="ort_fused", domain="com.microsoft")
    model = _model([node], [_vi("x")], [_vi("y")])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert trt_lint.unsupported_ops(model) == ["com.microsoft:FusedGelu"]
    assert trt_lint.lint(model) == [
        "node 'ort_fused' (com.microsoft:FusedGelu): domain 'com.microsoft' is not ONNX's default domain; TensorRT "
        "parses it only through a registered plugin named 'FusedGelu', otherwise re-export with standard operators"]


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
    lo, hi, trt = TABLE["opset"]["min"], TABLE["opset"]["max"], TABLE["source"]["tensorrt_version"]
    (problem,) = trt_lint.check_opset(model)
    assert problem == (f"default-domain opset {bound + shift} is outside the range TensorRT {trt} parses ({lo}..{hi}); "
                       f"export with opset_version between {lo} and {hi}")
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
    assert trt_lint.lint(_mask_model(mask, cast_to_fp16=True)) == [
        "Constant node 'mask_const': 16 value(s) equal float32's minimum or -inf and reach float16 at node "
        "'to_half' (Cast) (via Trilu 'triu' -> Cast 'to_half'); there they are -inf, and a softmax row masked "
        "entirely gives NaN; build the mask in the compute dtype (torch.finfo(dtype).min) or use a finite value "
        "like -1e4"]
    # The same mask kept in float32 (as the text branch of an fp16 export does) is fine.
    assert trt_lint.lint(_mask_model(mask, cast_to_fp16=False)) == []
    # A mask built in the compute dtype is what the message recommends.
    assert trt_lint.lint(_mask_model(np.full((4, 4), -1e4, dtype=np.float32), cast_to_fp16=True)) == []


def test_cast_of_out_of_range_constant_is_flagged():
    big = numpy_helper.from_array(np.array([1.0, 1e5], dtype=np.float32), name="scale")
    nodes = [helper.make_node("Cast", ["scale"], ["scale16"], name="scale_to_half", to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["x", "scale16"], ["y"], name="scaled")]
    model = _model(nodes, [_vi("x", TensorProto.FLOAT16, (2,))], [_vi("y", TensorProto.FLOAT16, (2,))], [big])
    assert trt_lint.fp16_hazards(model) == [
        "initializer 'scale': 1 finite value(s) beyond +-65504 reach float16 at node 'scale_to_half' (Cast) "
        "(via Cast 'scale_to_half') and become +-inf; clamp the constant to the float16 range in the export"]


def test_fp16_constant_holding_minus_inf_is_flagged():
    mask = numpy_helper.from_array(np.array([0.0, -np.inf], dtype=np.float16), name="mask16")
    model = _model([helper.make_node("Add", ["x", "mask16"], ["y"], name="add")],
                   [_vi("x", TensorProto.FLOAT16, (2,))], [_vi("y", TensorProto.FLOAT16, (2,))], [mask])
    assert trt_lint.fp16_hazards(model) == [
        "initializer 'mask16': float16 constant holds 1 -inf value(s); a softmax row masked entirely with -inf "
        "gives NaN; use torch.finfo(torch.float16).min"]


@pytest.mark.slow
def test_project_exports_pass_lint(tiny_model, tmp_path):
    from iqe.export.onnx_export import export_model

    for precision in ("fp32", "fp16"):
        info = export_model(tiny_model, tmp_path, precision, max_batch=4, verify=False, progress=False)
        for graph in info.graphs.values():
            assert trt_lint.lint(onnx.load(str(tmp_path / graph.file))) == [], graph.file
