"""MVFA bundle -> the fused ONNX graph (images -> all outputs), verified against PyTorch.

The graph is the model itself: encoder with adapters, the zero-shot head with the text
features as a constant, and, with a bank, the exact 1-NN cosine distance as one MatMul +
ReduceMin per chunk of `chunk_rows` bank rows and level (the L2-normalised bank is a
constant), then the fixed-constant fusion. FP16 (`precision="fp16"`) casts the encoder and
adapters to half precision (LayerNorm and attention softmax stay float32, as for IQE-CLIP);
the heads, the bank and its matmuls run in float32.
Writes `fused.<precision>.onnx` and `export.<precision>.json` in the same format as
`iqe.export.onnx_export`, so `iqe build`, the engine cache and the runners work unchanged.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from iqe.errors import InputError
from iqe.model.layers import LayerNormFp32
from iqe.model.mvfa import COS_EPS, MVFAModel, normalize_rows

FUSED = "fused"
# ORT vs PyTorch at the same precision. FP16: the heads see 100 * cos of FP16 features, so the
# FP16 rounding noise of the encoder (~1e-3 relative) moves the level-summed maps (range 0..4)
# by up to ~1e-2 between two FP16 implementations; fidelity to FP32 is the export policy's job.
MVFA_VERIFY_ATOL = {"fp32": 1e-4, "fp16": 5e-2}


def cast_encoder_fp16(model: MVFAModel) -> MVFAModel:
    """A copy whose vision tower and adapters compute in FP16 (LayerNorm parameters stay FP32)."""
    model = copy.deepcopy(model)
    for part in (model.visual, model.seg_adapters, model.det_adapters):
        part.half()
    for module in model.visual.modules():
        if isinstance(module, LayerNormFp32):
            module.float()
    return model


class MVFAGraph(nn.Module):
    """images [B,3,S,S] float32 -> tuple of `model.output_names()` tensors."""

    def __init__(self, model: MVFAModel, precision: str = "fp32"):
        super().__init__()
        self.model = model
        self.encoder = cast_encoder_fp16(model) if precision == "fp16" else model
        self.names = model.output_names()
        if model.cfg.bank_rows:
            self.register_buffer("bank_unit", normalize_rows(model.bank.float(), COS_EPS), persistent=False)
        else:
            self.bank_unit = None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.fuse(self.model.heads(*self.encoder.encode(images), self.bank_unit))
        return tuple(out[k] for k in self.names)


def torch_graph(model: MVFAModel, precision: str) -> tuple[nn.Module, tuple[str, ...]]:
    graph = MVFAGraph(model, precision)
    return graph, graph.names


def export_mvfa(model: MVFAModel, out_dir: str | Path, precision: str = "fp32", max_batch: int = 32,
                graphs: tuple[str, ...] = (FUSED,), verify: bool = True, progress: bool = True):
    """Export the fused MVFA graph (the only one engines run); other graph names are skipped.

    Same contract as `iqe.export.onnx_export.export_model`; returns its ExportInfo.
    """
    import onnx

    from iqe.export.trt_lint import lint
    from iqe.export.onnx_export import OPSET, PRECISIONS, ExportInfo, GraphInfo, sha256_file, verify_with_onnxruntime

    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if FUSED not in graphs:
        raise InputError(f"MVFA bundles export only the '{FUSED}' graph, asked for {list(graphs)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    c = model.cfg
    t0 = time.perf_counter()
    info = ExportInfo(precision, OPSET, c.digest(), c.image_size, max_batch)
    module = MVFAGraph(model, precision).eval()
    names = list(module.names)
    s = c.image_size
    images = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    path = out_dir / f"{FUSED}.{precision}.onnx"
    tmp = path.with_name(f".{path.name}.tmp")
    if progress:
        print(f"export {path.name} ...", flush=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (images,), str(tmp), input_names=["images"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["images", *names]}, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(str(tmp), full_check=True)
    problems = lint(onnx.load(str(tmp)))
    os.replace(tmp, path)
    shapes = [["batch", s, s] if n.startswith("map") and n != "map_max" else ["batch"] for n in names]
    gi = GraphInfo(FUSED, path.name, {"images": ["batch", 3, s, s]}, dict(zip(names, shapes)), sha256_file(path),
                   trt_lint=problems)
    if verify:
        gi.verify_max_abs = verify_with_onnxruntime(path, module, {"images": images}, names)
        if gi.verify_max_abs > MVFA_VERIFY_ATOL[precision]:
            raise AssertionError(f"{path.name}: ONNX Runtime differs from PyTorch by {gi.verify_max_abs:.3g} "
                                 f"(> {MVFA_VERIFY_ATOL[precision]})")
    info.graphs[FUSED] = gi
    info.export_seconds = round(time.perf_counter() - t0, 2)
    (out_dir / f"export.{precision}.json").write_text(info.to_json() + "\n")
    return info
