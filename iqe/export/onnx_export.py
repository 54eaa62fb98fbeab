"""Bundle -> ONNX graphs, each checked (onnx.checker + ONNX Runtime vs PyTorch) before use.

Writes, per precision, `image_encoder`, `text_branch`, `head` and `fused` graphs
(opset 17, dynamic batch axis) and `export.json` describing them: IO names and shapes,
sha256 of every file, the model config digest and the verification results.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from iqe.errors import InputError
from iqe.export.graphs import (
    HEAD_OUTPUTS,
    FusedGraph,
    HeadGraph,
    ImageEncoderGraph,
    TextBranchGraph,
    cast_vision_fp16,
)
from iqe.model.iqe import IQEModel

OPSET = 17  # LayerNormalization is a native op from 17 on (TensorRT parses it as one layer)
PRECISIONS = ("fp32", "fp16")
# ONNX Runtime vs PyTorch (same precision) tolerance per precision, max abs over all outputs.
VERIFY_ATOL = {"fp32": 1e-4, "fp16": 1e-2}
GRAPHS = ("image_encoder", "text_branch", "head", "fused")


@dataclass
class GraphInfo:
    name: str
    file: str
    inputs: dict[str, list]  # name -> shape ("batch" for the dynamic axis)
    outputs: dict[str, list]
    sha256: str = ""
    verify_max_abs: float | None = None
    trt_lint: list[str] = field(default_factory=list)  # TensorRT ONNX-parser problems (empty = clean)


@dataclass
class ExportInfo:
    precision: str
    opset: int
    config_sha256: str
    image_size: int
    max_batch: int
    graphs: dict[str, GraphInfo] = field(default_factory=dict)
    export_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, path: Path) -> "ExportInfo":
        data = json.loads(Path(path).read_text())
        data["graphs"] = {k: GraphInfo(**v) for k, v in data["graphs"].items()}
        return cls(**data)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def graph_specs(model: IQEModel) -> dict[str, tuple[list[str], list[list], list[str], list[list]]]:
    """(input names, input shapes, output names, output shapes) per graph; 'batch' marks the dynamic axis."""
    c = model.cfg
    s, e, k, t, w = c.image_size, c.embed_dim, len(c.features), c.grid * c.grid + 1, c.vision.width
    head_shapes = [["batch"]] * 4 + [["batch", s, s]] * 4 + [["batch"]]
    return {
        "image_encoder": (["images"], [["batch", 3, s, s]], ["global_feature", "tokens"], [["batch", e], ["batch", k, t, w]]),
        "text_branch": (["global_feature"], [["batch", e]], ["text"], [["batch", 2, e]]),
        "head": (["global_feature", "text", "tokens"], [["batch", e], ["batch", 2, e], ["batch", k, t, w]],
                 list(HEAD_OUTPUTS), head_shapes),
        "fused": (["images"], [["batch", 3, s, s]], list(HEAD_OUTPUTS), head_shapes),
    }


def _modules(model: IQEModel, precision: str) -> dict[str, torch.nn.Module]:
    vision_model = cast_vision_fp16(model) if precision == "fp16" else model
    return {
        "image_encoder": ImageEncoderGraph(vision_model),
        "text_branch": TextBranchGraph(model),
        "head": HeadGraph(model),
        "fused": FusedGraph(model, vision_model),
    }


def _example_inputs(model: IQEModel, names: list[str], batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Realistic example inputs: components downstream of the encoder get real encoder outputs."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, model.cfg.image_size, model.cfg.image_size, generator=g)
    if names == ["images"]:
        return {"images": images}
    with torch.no_grad():
        gf, tokens = ImageEncoderGraph(model)(images)
        text = TextBranchGraph(model)(gf)
    return {k: v for k, v in {"global_feature": gf, "text": text, "tokens": tokens}.items() if k in names}


def verify_with_onnxruntime(path: Path, module: torch.nn.Module, feed: dict[str, torch.Tensor],
                            output_names: list[str]) -> float:
    """Max abs difference between ONNX Runtime (CPU) and the PyTorch module on `feed`."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(output_names, {k: v.numpy() for k, v in feed.items()})
    with torch.no_grad():
        want = module(*feed.values())
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    worst = 0.0
    for name, a, b in zip(output_names, got, want):
        if a.shape != tuple(b.shape):
            raise AssertionError(f"{path.name}: output {name} shape {a.shape} != torch {tuple(b.shape)}")
        worst = max(worst, float(np.abs(a.astype(np.float64) - b.double().numpy()).max()))
    return worst


def export_model(model: IQEModel, out_dir: str | Path, precision: str = "fp32", max_batch: int = 32,
                 graphs: tuple[str, ...] = GRAPHS, verify: bool = True, progress: bool = True) -> ExportInfo:
    """Export `model` to ONNX graphs in `out_dir` and check each one.

    Args:
        model: eval-mode IQEModel (float32).
        out_dir: engine directory; graphs go to `<name>.<precision>.onnx`.
        precision: "fp32" or "fp16" (FP16 vision encoder, see iqe.export.graphs).
        max_batch: largest batch the engines are built for (recorded for builders).
        graphs: which graphs to write.
        verify: compare ONNX Runtime with PyTorch at VERIFY_ATOL[precision].
    Returns:
        ExportInfo, also written to `export.<precision>.json`.
    Raises:
        InputError: unknown precision/graph. AssertionError: a graph failed verification.
    """
    import onnx

    from iqe.model.families import family_of

    if family_of(model).export is not None:  # e.g. MVFA: its own fused graph, same ExportInfo contract
        return family_of(model).export(model, out_dir, precision, max_batch, graphs, verify, progress)
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    unknown = set(graphs) - set(GRAPHS)
    if unknown:
        raise InputError(f"unknown graph(s) {sorted(unknown)}; known: {', '.join(GRAPHS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    t0 = time.perf_counter()
    info = ExportInfo(precision, OPSET, model.cfg.digest(), model.cfg.image_size, max_batch)
    specs = graph_specs(model)
    modules = _modules(model, precision)
    for name in graphs:
        in_names, in_shapes, out_names, out_shapes = specs[name]
        module = modules[name].eval()
        feed = _example_inputs(model, in_names, batch=2)
        path = out_dir / f"{name}.{precision}.onnx"
        tmp = path.with_name(f".{path.name}.tmp")
        dynamic = {n: {0: "batch"} for n in in_names + out_names}
        if progress:
            print(f"export {path.name} ...", flush=True)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(feed.values()), str(tmp), input_names=in_names, output_names=out_names,
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=True)
        onnx.checker.check_model(str(tmp), full_check=True)
        from iqe.export.trt_lint import lint

        trt_problems = lint(onnx.load(str(tmp)))
        os.replace(tmp, path)
        gi = GraphInfo(name, path.name, dict(zip(in_names, in_shapes)), dict(zip(out_names, out_shapes)),
                       sha256_file(path), trt_lint=trt_problems)
        if verify:
            ref = _modules(model, precision)[name].eval() if precision == "fp16" else module
            gi.verify_max_abs = verify_with_onnxruntime(path, ref, feed, out_names)
            if gi.verify_max_abs > VERIFY_ATOL[precision]:
                raise AssertionError(f"{path.name}: ONNX Runtime differs from PyTorch by {gi.verify_max_abs:.3g} "
                                     f"(> {VERIFY_ATOL[precision]})")
        info.graphs[name] = gi
    info.export_seconds = round(time.perf_counter() - t0, 2)
    (out_dir / f"export.{precision}.json").write_text(info.to_json() + "\n")
    return info
