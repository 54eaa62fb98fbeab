"""Check an ONNX graph against what TensorRT's ONNX parser accepts, before a GPU build.

The operator table is data: `trt_ops.json` beside this file, transcribed from
onnx/onnx-tensorrt `docs/operators.md` (its `source` block names the TensorRT release).
Three kinds of finding, each naming the node and its operator:

- operators the parser does not support, or does not list, and nodes in other domains
  (those parse only through a registered TensorRT plugin of the same name);
- a default-domain opset outside the parser's range;
- FP16 hazards: float constants whose values do not survive float16 where they reach
  it through a Cast: float32's minimum or -inf (masks built that way turn into -inf, and
  softmax over a fully masked row gives NaN, where PyTorch in float32 did not), other
  values beyond +-65504 (they become +-inf), and float16 constants holding -inf.

    problems = lint(onnx.load("fused.fp16.onnx"))   # [] when nothing was found
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

OPS_FILE = Path(__file__).with_name("trt_ops.json")
DEFAULT_DOMAINS = ("", "ai.onnx")
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP32_MIN = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class OperatorTable:
    """The parser's operator support as recorded in `trt_ops.json`."""

    tensorrt_version: str  # release the table describes
    opset_min: int  # lowest default-domain opset the parser accepts
    opset_max: int  # highest one
    operators: dict[str, dict[str, Any]]  # op_type -> {"supported": bool, "types": [...], "restrictions"?: str}


@cache
def operator_table(path: Path = OPS_FILE) -> OperatorTable:
    """Load the operator table (cached per path).

    Args:
        path: JSON file in the layout of `trt_ops.json`; defaults to the one shipped here.

    Returns:
        The table.
    """
    data = json.loads(Path(path).read_text())
    return OperatorTable(tensorrt_version=data["source"]["tensorrt_version"], opset_min=data["opset"]["min"],
                         opset_max=data["opset"]["max"], operators=data["operators"])


@dataclass(frozen=True)
class _Site:
    """A node and where it sits: 'main', 'main/Loop_3.body', 'function local::Gelu', ..."""

    node: onnx.NodeProto
    scope: str

    def describe(self) -> str:
        name = self.node.name or "<unnamed>"
        op = self.node.op_type if self.node.domain in DEFAULT_DOMAINS else f"{self.node.domain}:{self.node.op_type}"
        where = "" if self.scope == "main" else f" in {self.scope}"
        return f"node '{name}' ({op}){where}"


def _walk(model: onnx.ModelProto) -> Iterator[_Site]:
    """Every node of the model: main graph, control-flow subgraphs, and the bodies of
    model-local functions (the parser inlines those, so a call is not itself an operator)."""
    local = {(f.domain, f.name): f for f in model.functions}
    seen_functions: set[tuple[str, str]] = set()

    def nodes(node_list: Iterable[onnx.NodeProto], scope: str) -> Iterator[_Site]:
        for node in node_list:
            key = (node.domain, node.op_type)
            if key in local:
                if key not in seen_functions:
                    seen_functions.add(key)
                    yield from nodes(local[key].node, f"function {node.domain}::{node.op_type}")
                continue
            yield _Site(node, scope)
            for attr in node.attribute:
                label = f"{scope}/{node.name or node.op_type}.{attr.name}"
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(attr.g.node, label)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for i, sub in enumerate(attr.graphs):
                        yield from nodes(sub.node, f"{label}[{i}]")

    yield from nodes(model.graph.node, "main")


def _operator_problem(site: _Site, table: OperatorTable) -> str | None:
    node = site.node
    if node.domain not in DEFAULT_DOMAINS:
        return (f"{site.describe()}: domain '{node.domain}' is not ONNX's default domain; TensorRT parses it only "
                f"through a registered plugin named '{node.op_type}', otherwise re-export with standard operators")
    entry = table.operators.get(node.op_type)
    if entry is None:
        return (f"{site.describe()}: '{node.op_type}' is not in TensorRT {table.tensorrt_version}'s operator list "
                f"({OPS_FILE.name}); re-export with an equivalent standard operator")
    if not entry["supported"]:
        return (f"{site.describe()}: '{node.op_type}' is not supported by TensorRT {table.tensorrt_version}'s "
                "ONNX parser; re-export without it (or decompose it in the export)")
    return None


def unsupported_ops(model: onnx.ModelProto, table: OperatorTable | None = None) -> list[str]:
    """Operators in `model` that TensorRT's ONNX parser will not take as they are.

    Walks the main graph, control-flow subgraphs and model-local function bodies.

    Args:
        model: the ONNX model.
        table: operator table; defaults to `trt_ops.json`.

    Returns:
        Sorted, de-duplicated operator names: default-domain operators the table marks
        unsupported or does not list (e.g. ``"BitShift"``), and every operator of another
        domain as ``"domain:OpType"`` (those need a TensorRT plugin). Empty when all parse.
    """
    table = table or operator_table()
    found = set()
    for site in _walk(model):
        if _operator_problem(site, table) is not None:
            node = site.node
            found.add(node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}:{node.op_type}")
    return sorted(found)


def check_opset(model: onnx.ModelProto, table: OperatorTable | None = None) -> list[str]:
    """Check the model's default-domain opset against the parser's supported range.

    Args:
        model: the ONNX model.
        table: operator table; defaults to `trt_ops.json`.

    Returns:
        One message when the opset is missing or outside [opset_min, opset_max], else [].
    """
    table = table or operator_table()
    versions = [imp.version for imp in model.opset_import if imp.domain in DEFAULT_DOMAINS]
    if not versions:
        return ["model imports no default-domain opset (opset_import has no '' / 'ai.onnx' entry); re-export it"]
    opset = max(versions)
    if table.opset_min <= opset <= table.opset_max:
        return []
    return [f"default-domain opset {opset} is outside the range TensorRT {table.tensorrt_version} parses "
            f"({table.opset_min}..{table.opset_max}); export with opset_version between {table.opset_min} "
            f"and {table.opset_max}"]


def _constants(model: onnx.ModelProto) -> dict[str, tuple[str, np.ndarray]]:
    """Constant values by tensor name -> (what produced them, values): initializers of every
    graph and the outputs of Constant / ConstantOfShape nodes. Tensors whose data is not
    loaded are skipped."""
    found: dict[str, tuple[str, np.ndarray]] = {}

    def add_tensor(name: str, origin: str, tensor: onnx.TensorProto) -> None:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return  # weights left on disk (onnx.load(..., load_external_data=False)): nothing to inspect
        found[name] = (origin, numpy_helper.to_array(tensor))

    def visit(graph: onnx.GraphProto) -> None:
        for init in graph.initializer:
            add_tensor(init.name, f"initializer '{init.name}'", init)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub)
            # ConstantOfShape fills its output with its `value`: same hazard, any shape.
            if node.op_type in ("Constant", "ConstantOfShape") and node.domain in DEFAULT_DOMAINS and node.output:
                origin = f"{node.op_type} node '{node.name or node.output[0]}'"
                for attr in node.attribute:
                    if attr.name == "value":
                        add_tensor(node.output[0], origin, attr.t)
                    elif attr.name == "value_float":
                        found[node.output[0]] = (origin, np.array(attr.f, dtype=np.float32))
                    elif attr.name == "value_floats":
                        found[node.output[0]] = (origin, np.array(attr.floats, dtype=np.float32))

    visit(model.graph)
    return found


def _cast_target(node: onnx.NodeProto) -> int | None:
    for attr in node.attribute:
        if attr.name == "to":
            return int(attr.i)
    return None


# Operators whose outputs carry their input values on unchanged (or, for Add/Sub/Min/Max,
# with the same magnitude when one side is huge), so a mask constant keeps its extreme
# values through them. A float32 tensor turns float16 only through a Cast.
_VALUE_CARRYING = frozenset({
    "Identity", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Flatten", "Slice", "Gather", "GatherElements",
    "GatherND", "Concat", "Split", "Transpose", "Tile", "Trilu", "Pad", "Where", "Add", "Sub", "Min", "Max",
})


def _casts_to_fp16(start: str, consumers: dict[str, list[_Site]]) -> list[tuple[_Site, list[str]]]:
    """Casts to float16 that tensor `start` reaches through value-carrying operators, each
    with the chain of nodes leading to it."""
    found = []
    frontier: list[tuple[str, list[str]]] = [(start, [])]
    seen = {start}
    while frontier:
        tensor, chain = frontier.pop()
        for site in consumers.get(tensor, []):
            node = site.node
            if node.domain not in DEFAULT_DOMAINS:
                continue
            step = chain + [f"{node.op_type} '{node.name or node.output[0]}'"]
            if node.op_type == "Cast":
                target = _cast_target(node)
                if target == onnx.TensorProto.FLOAT16:
                    found.append((site, step))
                    continue
                if target not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
                    continue
            elif node.op_type not in _VALUE_CARRYING:
                continue
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    frontier.append((out, step))
    return found


def fp16_hazards(model: onnx.ModelProto) -> list[str]:
    """Constants whose values break once TensorRT computes with them in float16.

    In a strongly typed TensorRT network a float32 constant stays float32 until a Cast, so
    a constant is a hazard only where its values reach float16:

    - a float32/float64 constant (initializer or Constant node) holding float32's minimum
      or -inf, or other finite values beyond +-65504, that reaches a Cast to float16
      directly or through value-carrying operators (reshapes, slices, Trilu, Where, Add);
      there those values become +-inf, and a softmax row masked entirely gives NaN;
    - a float16 constant holding -inf.

    Args:
        model: the ONNX model.

    Returns:
        One message per constant found, naming it and the Cast node. The fix in the
        export: build masks in the compute dtype (torch.finfo(dtype).min) or use a finite
        value such as -1e4, and clamp other constants to the float16 range.
    """
    consumers: dict[str, list[_Site]] = {}
    for site in _walk(model):
        for name in site.node.input:
            consumers.setdefault(name, []).append(site)
    problems = []
    for name, (origin, values) in _constants(model).items():
        if values.dtype.kind != "f" or values.size == 0:
            continue
        wide = values.astype(np.float64, copy=False)
        neg_inf = int(np.count_nonzero(np.isneginf(wide)))
        if values.dtype == np.float16:
            if neg_inf:
                problems.append(f"{origin}: float16 constant holds {neg_inf} -inf value(s); a softmax row masked "
                                "entirely with -inf gives NaN; use torch.finfo(torch.float16).min")
            continue
        fp32_min = int(np.count_nonzero(wide == FP32_MIN))
        beyond = int(np.count_nonzero(np.isfinite(wide) & (np.abs(wide) > FP16_MAX)))
        if not (neg_inf or beyond):
            continue
        for site, chain in _casts_to_fp16(name, consumers):
            path = " -> ".join(chain)
            if neg_inf or fp32_min:
                problems.append(f"{origin}: {neg_inf + fp32_min} value(s) equal float32's minimum or -inf and reach "
                                f"float16 at {site.describe()} (via {path}); there they are -inf, and a softmax row "
                                "masked entirely gives NaN; build the mask in the compute dtype "
                                "(torch.finfo(dtype).min) or use a finite value like -1e4")
            else:
                problems.append(f"{origin}: {beyond} finite value(s) beyond +-{FP16_MAX:g} reach float16 at "
                                f"{site.describe()} (via {path}) and become +-inf; clamp the constant to the "
                                "float16 range in the export")
    return problems


def lint(model: onnx.ModelProto, table: OperatorTable | None = None) -> list[str]:
    """All findings for `model`: opset range, operator support (per node), FP16 hazards.

    Args:
        model: the ONNX model (load it with its external data to inspect all constants).
        table: operator table; defaults to `trt_ops.json`.

    Returns:
        Human-readable problems, each naming the node and operator it concerns; [] when
        TensorRT should parse the graph and no FP16 hazard was found.
    """
    table = table or operator_table()
    problems = check_opset(model, table)
    problems += [p for p in (_operator_problem(site, table) for site in _walk(model)) if p is not None]
    return problems + fp16_hazards(model)
