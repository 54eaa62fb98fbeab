"""MVFA bundle -> the fused ONNX graph (images -> all outputs), judged by the fidelity gate.

The graph is the model itself: encoder with adapters, the zero-shot head with the text
features as a constant, and, with a bank, the exact 1-NN cosine distance as one MatMul +
ReduceMin per chunk of `chunk_rows` bank rows and level (the L2-normalised bank is a
constant), then the fixed-constant fusion.

FP16 (`precision="fp16"`) follows IQE-CLIP's policy (iqe/export/precision.py): MVFA's
vision blocks are the shared CLIP blocks, so the per-block FP16 policy is chosen by the
same emulated sweep on calibration images and gated by the same contract
(iqe/export/fidelity.py), judged on every MVFA output (raw branches and fused values).
The residual stream, LayerNorm, softmax, the adapters (whose outputs are written back
into the stream), the heads, the bank and its matmuls stay float32. Where no policy
passes, the export is refused with the drift report (PrecisionRefused).

Writes `fused.<precision>.onnx`, `export.<precision>.json` and the drift report in the
same format as `iqe.export.onnx_export`, so `iqe build`, the engine cache and the
runners work unchanged.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iqe.errors import InputError
from iqe.model.mvfa import COS_EPS, MVFAModel, normalize_rows

FUSED = "fused"
# ORT vs PyTorch at the same precision on the example batch (catches graph bugs; fidelity to
# FP32 is the gate's job). FP16: the heads see 100 * cos of FP16-rounded features, so two FP16
# implementations that round differently move the level-summed maps (range 0..4) by up to ~1e-2.
MVFA_VERIFY_ATOL = {"fp32": 1e-4, "fp16": 5e-2}


class MVFAGraph(nn.Module):
    """images [B,3,S,S] float32 -> tuple of `model.output_names()` tensors.

    `policy` (fp16): an `iqe.export.precision.PrecisionPolicy` for the vision blocks; None
    reads the bundle's measured policy from the cache or measures it (`policy_for_model`).
    """

    def __init__(self, model: MVFAModel, precision: str = "fp32", policy: Any = None):
        super().__init__()
        self.model = model
        if precision == "fp16":
            from iqe.export.graphs import cast_vision_fp16

            self.encoder = cast_vision_fp16(model, policy)  # adapters and heads stay float32
        else:
            self.encoder = model
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


def model_outputs(model: MVFAModel, images: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """Every output of the PyTorch model (float32, or float64 for a double model) as float32 arrays."""
    dtype = next(model.parameters()).dtype
    parts = [model.score(torch.from_numpy(images[i:i + batch]).to(dtype)) for i in range(0, len(images), batch)]
    return {k: np.concatenate([p[k] for p in parts]).astype(np.float32) for k in model.output_names()}


def noise_floor(model: MVFAModel, images: np.ndarray, reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output max abs of float32 vs float64 PyTorch on `images` (the first rows of `reference`)."""
    m64 = copy.deepcopy(model).double().eval()
    want = model_outputs(m64, images.astype(np.float64))
    return {k: float(np.abs(reference[k][:len(images)].astype(np.float64) - want[k]).max()) for k in want}


def gate(model: MVFAModel, path: Path, precision: str, images: np.ndarray, names: list[str], tolerance: float,
         policy: Any = None, swept: dict | None = None):
    """The drift report of the ONNX graph at `path` in ONNX Runtime vs the float32 PyTorch model.

    FP16 also judges the policy with FP16 rounding emulated in PyTorch (ONNX Runtime's CPU
    provider computes FP16 GEMMs in float32, so it understates what a GPU rounds), as the
    IQE-CLIP export does. `swept`: the policy sweep's float32 ("reference") and emulated
    ("candidate") outputs on these images, used instead of recomputing them.
    """
    from iqe.export.fidelity import compare
    from iqe.export.onnx_export import NOISE_FLOOR_IMAGES, add_fp16_arithmetic_checks, onnxruntime_outputs
    from iqe.export.precision import apply_policy

    swept = swept or {}
    names_out = model.output_names()
    reference = {k: swept["reference"][k] for k in names_out} if "reference" in swept else model_outputs(model, images)
    floor = noise_floor(model, images[:NOISE_FLOOR_IMAGES], reference)
    rep = compare(reference, onnxruntime_outputs(path, images), precision, names, tolerance, noise_floor=floor,
                  candidate_name=f"onnxruntime {precision} ({path.name})")
    if precision == "fp16" and policy is not None:
        emulated = {k: swept["candidate"][k] for k in names_out} if "candidate" in swept else \
            model_outputs(apply_policy(copy.deepcopy(model), policy, emulate=True), images)
        add_fp16_arithmetic_checks(rep, reference, emulated, names, tolerance)
        rep.extra["policy"] = policy.to_dict()["blocks"]
        rep.extra["fp16_flop_fraction"] = policy.fp16_flop_fraction
    return rep


def export_mvfa(model: MVFAModel, out_dir: str | Path, precision: str = "fp32", max_batch: int = 32,
                graphs: tuple[str, ...] = (FUSED,), verify: bool | None = None, progress: bool = True, *,
                policy: Any = None, calib: str | Path | None = None, calib_images: int | None = None,
                tolerance: float | None = None):
    """Export the fused MVFA graph (the only one engines run); same contract as `export_model`.

    Args as `iqe.export.onnx_export.export_model` (`graphs` must include "fused"; other
    names are skipped). Returns its ExportInfo.
    Raises:
        InputError: unknown precision/graph, bad tolerance. PrecisionRefused: no FP16 policy
        passes. FidelityError: the graph fails the gate (the drift report is written).
    """
    import onnx

    from iqe.atomic import atomic_write_text
    from iqe.export.fidelity import failure_message, write_drift_report
    from iqe.export.onnx_export import (DEFAULT_CALIB_IMAGES, OPSET, PRECISIONS, ExportInfo, FidelityError, GraphInfo,
                                        _env_tolerance, export_policy, sha256_file, verify_with_onnxruntime)
    from iqe.export.precision import calibration_images
    from iqe.export.trt_lint import lint

    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if FUSED not in graphs:
        raise InputError(f"MVFA bundles export only the '{FUSED}' graph, asked for {list(graphs)}")
    tolerance = _env_tolerance(tolerance)
    if verify is None:
        verify = os.environ.get("IQE_NO_VERIFY", "0") in ("", "0")
    calib = calib if calib is not None else (os.environ.get("IQE_CALIB") or None)
    say = print if progress else (lambda *a, **k: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    c = model.cfg
    t0 = time.perf_counter()
    info = ExportInfo(precision, OPSET, c.digest(), c.image_size, max_batch)
    images = names = None
    source = ""  # no calibration images read (a given policy, no verification)
    swept: dict = {}  # the sweep's outputs on the calibration images, reused by the gate
    if verify or (precision == "fp16" and policy is None):
        images, names, _, source = calibration_images(calib, calib_images or DEFAULT_CALIB_IMAGES[precision],
                                                      c.image_size)
    if precision == "fp16":
        policy = export_policy(model, policy, images, names, source, tolerance, verify, out_dir, info, say, keep=swept)
    module = MVFAGraph(model, precision, policy).eval()
    out_names = list(module.names)
    s = c.image_size
    example = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    path = out_dir / f"{FUSED}.{precision}.onnx"
    tmp = path.with_name(f".{path.name}.tmp")
    say(f"export {path.name} ...", flush=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(tmp), input_names=["images"], output_names=out_names,
                          dynamic_axes={n: {0: "batch"} for n in ["images", *out_names]}, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(str(tmp), full_check=True)
    problems = lint(onnx.load(str(tmp)))
    os.replace(tmp, path)
    shapes = [["batch", s, s] if n.startswith("map") and n != "map_max" else ["batch"] for n in out_names]
    gi = GraphInfo(FUSED, path.name, {"images": ["batch", 3, s, s]}, dict(zip(out_names, shapes)), sha256_file(path),
                   trt_lint=problems)
    info.graphs[FUSED] = gi
    if verify:
        gi.verify_max_abs = verify_with_onnxruntime(path, module, {"images": example}, out_names)
        if gi.verify_max_abs > MVFA_VERIFY_ATOL[precision]:
            raise AssertionError(f"{path.name}: ONNX Runtime differs from PyTorch by {gi.verify_max_abs:.3g} "
                                 f"(> {MVFA_VERIFY_ATOL[precision]})")
        assert images is not None and names is not None
        say(f"verify {path.name} on {len(images)} images against the float32 PyTorch model ...", flush=True)
        rep = gate(model, path, precision, images, names, tolerance, policy, swept)
        rep.notes.append(f"images: {source}")
        report_path = write_drift_report(rep, out_dir, "onnxruntime", precision)
        info.drift = rep.summary()
        say(rep.summary_line(), flush=True)
        if not rep.passed:
            raise FidelityError(f"{failure_message(rep, path.name, precision)}\n  drift report: {report_path}")
    info.export_seconds = round(time.perf_counter() - t0, 2)
    atomic_write_text(out_dir / f"export.{precision}.json", info.to_json() + "\n")
    return info
