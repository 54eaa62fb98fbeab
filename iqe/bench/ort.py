"""ONNX Runtime variants for the sweep: session options, the component graphs, op profiles.

The `default` variant is exactly what `iqe score --backend onnxruntime` runs (the runner
`iqe.engine.build.make_runner` returns, opened as an exported graph with ORT's optimisation on). Every other variant re-opens the same engine's
ONNX file with different session options, or chains the separately exported component
graphs, to show which options matter on the machine at hand.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iqe.atomic import atomic_path
from iqe.engine.onnxruntime_backend import OrtRunner, ort_providers
from iqe.engine.runners import Runner
from iqe.errors import InputError
from iqe.export.graphs import HEAD_OUTPUTS

LEVELS = ("disable", "basic", "extended", "layout", "all")
COMPONENT_GRAPHS = ("image_encoder", "text_branch", "head")


@dataclass(frozen=True)
class OrtVariant:
    """Session settings of one ONNX Runtime configuration.

    Attributes:
        name: short label used on the command line and in reports.
        description: one line for the report.
        intra_op_threads: None = the engine's choice (cores this process may use);
            0 = ONNX Runtime's own default (physical cores).
        inter_op_threads: threads across independent nodes (parallel mode only).
        level: graph optimisation level, one of LEVELS.
        parallel: ORT_PARALLEL execution mode instead of sequential.
        spinning: intra-op worker threads spin while waiting for work.
        graph: "fused" (the engine's single graph) or "components" (image encoder, text
            branch and head as three sessions).
        rewrites: graph rewrites applied, in order, to the fused graph before the session
            opens it (see REWRITES); the result is written once next to the graph.
    """

    name: str
    description: str
    intra_op_threads: int | None = None
    inter_op_threads: int = 0
    level: str = "all"
    parallel: bool = False
    spinning: bool = True
    graph: str = "fused"
    rewrites: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d["intra_op_threads"] = self.resolved_threads()
        return d

    def resolved_threads(self) -> int:
        if self.intra_op_threads is None:
            return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return self.intra_op_threads


VARIANTS: dict[str, OrtVariant] = {v.name: v for v in (
    OrtVariant("default", "engine runner as shipped: ORT_ENABLE_ALL, intra-op threads = usable cores, sequential"),
    OrtVariant("threads1", "intra-op threads = 1", intra_op_threads=1),
    OrtVariant("threads-ort", "intra-op threads = 0 (ONNX Runtime picks: physical cores)", intra_op_threads=0),
    OrtVariant("no-spin", "intra-op threads do not spin while idle", spinning=False),
    OrtVariant("parallel", "ORT_PARALLEL execution mode, 2 inter-op threads", parallel=True, inter_op_threads=2),
    OrtVariant("opt-disable", "graph optimisations off (ORT_DISABLE_ALL)", level="disable"),
    OrtVariant("opt-basic", "ORT_ENABLE_BASIC (constant folding, redundant node removal)", level="basic"),
    OrtVariant("opt-extended", "ORT_ENABLE_EXTENDED (+ GELU/LayerNorm/MatMul fusions)", level="extended"),
    OrtVariant("opt-layout", "ORT_ENABLE_LAYOUT (+ layout transformations, no NCHWc)", level="layout"),
    OrtVariant("components", "image encoder, text branch, head as three sessions (default options)", graph="components"),
    OrtVariant("fusion", "graph rewritten offline by onnxruntime.transformers' optimizer (Attention/SkipLayerNorm/"
               "BiasGelu fusions), then default options", rewrites=("fusion",)),
    OrtVariant("sigmoid-maps", "2-channel map softmax rewritten as sigmoid(l1 - l0) (same function; ORT's Softmax "
               "over axis 1 transposes the [K*B, 2, S, S] maps twice)", rewrites=("sigmoid-maps",)),
    OrtVariant("fusion+sigmoid-maps", "both rewrites", rewrites=("sigmoid-maps", "fusion")),
)}


def parse_variants(text: str) -> list[OrtVariant]:
    """Comma-separated variant names -> variants; unknown names raise InputError listing the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise InputError(f"unknown ONNX Runtime variant(s) {unknown or [text]}; known: {', '.join(VARIANTS)}")
    return [VARIANTS[n] for n in dict.fromkeys(names)]


def session_options(variant: OrtVariant, profile_prefix: str | Path | None = None):
    """onnxruntime.SessionOptions for a variant (and profiling, when a file prefix is given)."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "layout": getattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[variant.level]
    opts.intra_op_num_threads = variant.resolved_threads()
    opts.inter_op_num_threads = variant.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL if variant.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if variant.spinning else "0")
    opts.log_severity_level = 3
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return opts


def _save(model, out: Path) -> None:
    """Save an onnx.ModelProto atomically (external data above protobuf's 2 GB limit)."""
    import onnx

    if model.ByteSize() > 1.8e9:  # external data files are named after the target: written in place
        onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + ".data")
        return
    with atomic_path(out, durable=False) as tmp:
        onnx.save_model(model, str(tmp))


def _rewrite_fusion(src: Path, out: Path) -> None:
    """ONNX Runtime's offline transformer optimizer (Attention, SkipLayerNormalization, BiasGelu).

    Head counts and widths are detected per attention from the graph (num_heads=0), so
    the vision (16 heads), text (12) and IQM (8) attentions are all candidates.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    _save(optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=0, use_gpu=False).model, out)


def _rewrite_sigmoid_maps(src: Path, out: Path) -> None:
    """Softmax(axis=1) -> Gather(index 1, axis=1) over 2 channels  ==>  Sigmoid(x[:, 1] - x[:, 0]).

    softmax([a, b])[1] = 1 / (1 + exp(a - b)) = sigmoid(b - a) exactly; only rounding differs.
    Every matched Softmax must feed nothing but that Gather, and its input must have 2
    channels (checked with ONNX shape inference when it can tell; the parity check
    against the reference loop covers the rest).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        dims = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                for vi in inferred.graph.value_info}
    except Exception:  # noqa: BLE001 - shape inference is a best-effort check here
        dims = {}
    graph = model.graph
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    constants.update({i.name: numpy_helper.to_array(i) for i in graph.initializer})

    def attr(node, name, default=None):
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)

    replaced, drop, add = 0, [], []
    for node in graph.node:
        if node.op_type != "Softmax" or attr(node, "axis") != 1:
            continue
        users = consumers[node.output[0]]
        if len(users) != 1 or users[0].op_type != "Gather" or attr(users[0], "axis", 0) != 1:
            continue
        index = constants.get(users[0].input[1])
        shape = dims.get(node.input[0])
        if index is None or index.size != 1 or int(index) != 1 or (shape and len(shape) > 1 and shape[1] not in (2, None)):
            continue
        x, y, tag = node.input[0], users[0].output[0], f"{node.name or node.output[0]}_as_sigmoid"
        one = numpy_helper.from_array(np.array(1, dtype=np.int64), f"{tag}/one")
        zero = numpy_helper.from_array(np.array(0, dtype=np.int64), f"{tag}/zero")
        graph.initializer.extend([one, zero])
        add += [helper.make_node("Gather", [x, one.name], [f"{tag}/x1"], axis=1, name=f"{tag}/Gather1"),
                helper.make_node("Gather", [x, zero.name], [f"{tag}/x0"], axis=1, name=f"{tag}/Gather0"),
                helper.make_node("Sub", [f"{tag}/x1", f"{tag}/x0"], [f"{tag}/diff"], name=f"{tag}/Sub"),
                helper.make_node("Sigmoid", [f"{tag}/diff"], [y], name=f"{tag}/Sigmoid")]
        drop += [node, users[0]]
        replaced += 1
    if not replaced:
        raise RuntimeError(f"{src.name}: no 2-channel Softmax(axis=1) -> Gather(1) pattern to rewrite")
    kept = [n for n in graph.node if all(n is not d for d in drop)]
    del graph.node[:]
    graph.node.extend(kept + add)
    model = _toposort(model)  # the appended nodes must precede their consumers
    if model.ByteSize() < 1.8e9:  # the in-memory checker cannot take more
        onnx.checker.check_model(model)
    _save(model, out)


def _toposort(model):
    """Reorder graph nodes topologically (appended nodes must precede their consumers)."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        progress = False
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
                progress = True
            else:
                rest.append(node)
        if not progress:
            raise RuntimeError(f"graph has a cycle or a missing input near node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


REWRITES = {"fusion": _rewrite_fusion, "sigmoid-maps": _rewrite_sigmoid_maps}


def rewritten_graph(onnx_path: str | Path, rewrites: tuple[str, ...]) -> Path:
    """`onnx_path` with `rewrites` applied in order, cached next to it as `<name>.<rewrite>...onnx`."""
    path = Path(onnx_path)
    for name in rewrites:
        out = path.with_name(path.name.removesuffix(".onnx") + f".{name}.onnx")
        if not (out.is_file() and out.stat().st_mtime >= path.stat().st_mtime):
            REWRITES[name](path, out)
        path = out
    return path


class VariantOrtRunner(OrtRunner):
    """OrtRunner on the engine's ONNX file with a variant's session options."""

    def __init__(self, onnx_path: str | Path, image_size: int, variant: OrtVariant, max_batch: int | None = None,
                 profile_prefix: str | Path | None = None):
        super().__init__(onnx_path, image_size, max_batch=max_batch)
        self.variant = variant
        self.profile_prefix = profile_prefix
        self.name = f"onnxruntime[{variant.name}]"

    def _activate(self) -> None:
        import onnxruntime as ort

        path = rewritten_graph(self.onnx_path, self.variant.rewrites)
        self.session = ort.InferenceSession(str(path), session_options(self.variant, self.profile_prefix),
                                            providers=self.providers or ort_providers())
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.outputs = [o.name for o in self.session.get_outputs()]

    def end_profiling(self) -> Path | None:
        """Stop profiling; returns the trace file (None when not profiling)."""
        return Path(self.session.end_profiling()) if self.profile_prefix else None


class ComponentsOrtRunner(Runner):
    """Three ONNX Runtime sessions chained on the host: image encoder -> text branch -> head.

    The fused graph does the same work in one session; this runner shows what keeping
    the stages apart (e.g. to swap one of them, or to place them on different devices)
    costs: the intermediate tensors (tokens: [B, K, 1+G*G, W] float32) cross the session
    boundary as NumPy arrays.
    """

    name = "onnxruntime[components]"

    def __init__(self, graphs: dict[str, Path], image_size: int, variant: OrtVariant, max_batch: int | None = None):
        super().__init__(image_size, max_batch)
        missing = [g for g in COMPONENT_GRAPHS if g not in graphs]
        if missing:
            raise InputError(f"components runner needs graphs {list(COMPONENT_GRAPHS)}; missing {missing}")
        self.graphs = graphs
        self.variant = variant

    def _activate(self) -> None:
        import onnxruntime as ort

        self.sessions = {name: ort.InferenceSession(str(self.graphs[name]), session_options(self.variant),
                                                    providers=ort_providers()) for name in COMPONENT_GRAPHS}

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        g, tokens = self.sessions["image_encoder"].run(["global_feature", "tokens"], {"images": images})
        (text,) = self.sessions["text_branch"].run(["text"], {"global_feature": g})
        values = self.sessions["head"].run(list(HEAD_OUTPUTS), {"global_feature": g, "text": text, "tokens": tokens})
        return {k: np.asarray(v, dtype=np.float32) for k, v in zip(HEAD_OUTPUTS, values)}

    def _deactivate(self) -> None:
        self.sessions = {}


def summarize_ort_profile(trace: str | Path, top: int = 12) -> dict[str, Any]:
    """Kernel time per operator type in the last `model_run` of an ORT profile trace.

    Returns:
        {"total_ms": float, "ops": [{"op", "ms", "pct", "nodes"}...]} sorted by time.
    """
    events = json.loads(Path(trace).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    if not runs:
        return {"total_ms": 0.0, "ops": []}
    last = runs[-1]
    lo, hi = last["ts"], last["ts"] + last["dur"]
    per_op: dict[str, float] = defaultdict(float)
    per_node: dict[tuple[str, str], float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if not lo <= e["ts"] <= hi:
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_op[op] += e["dur"] / 1e3
        per_node[(e["name"].removesuffix("_kernel_time"), op)] += e["dur"] / 1e3
        nodes[op].add(e["name"])
    total = sum(per_op.values())
    ops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    # The slowest single nodes name where in the graph the time goes (e.g. which Softmax).
    slowest = sorted(per_node.items(), key=lambda kv: -kv[1])[:top]
    return {"run_ms": round(last["dur"] / 1e3, 2), "total_ms": round(total, 2),
            "ops": [{"op": op, "ms": round(ms, 2), "pct": round(100 * ms / total, 1) if total else 0.0,
                     "nodes": len(nodes[op])} for op, ms in ops],
            "slowest_nodes": [{"node": name, "op": op, "ms": round(ms, 2),
                               "pct": round(100 * ms / total, 1) if total else 0.0} for (name, op), ms in slowest]}


def summarize_torch_profile(fn, top: int = 12) -> dict[str, Any]:
    """Self CPU time per aten operator for one call of `fn` (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    rows = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
    total = sum(ms for _, ms, _ in rows)
    rows.sort(key=lambda r: -r[1])
    return {"total_ms": round(total, 2),
            "ops": [{"op": op, "ms": round(ms, 2), "pct": round(100 * ms / total, 1) if total else 0.0, "calls": n}
                    for op, ms, n in rows[:top]]}
