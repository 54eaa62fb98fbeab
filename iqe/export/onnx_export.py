"""Bundle -> ONNX graphs, each checked (onnx.checker + ONNX Runtime vs PyTorch) before use.

Writes, per precision, `image_encoder`, `text_branch`, `head` and `fused` graphs
(opset 17, dynamic batch axis) and `export.<precision>.json` describing them: IO names
and shapes, sha256 of every file, the model config digest, the FP16 precision policy and
its FP16 FLOP fraction, and the verification results.

Verification judges the fused graph (the one engines run) in ONNX Runtime against the
float32 PyTorch model on realistic images (the synthetic set, or the user's `calib`
folder) by the fidelity contract (iqe.export.fidelity), relative to the fp32 noise
floor measured on the same images, and writes `drift.onnxruntime.<precision>.json` + `.md`
next to the graphs. A failure raises `FidelityError`: one line per failing output, with
the numbers, the limit and the way out (another precision, `--tolerance`, `--no-verify`).
Environment defaults (flags override): IQE_TOLERANCE, IQE_CALIB, IQE_NO_VERIFY=1.
"""

from __future__ import annotations

import copy
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
from iqe.export.fidelity import DriftReport, compare, failure_message, write_drift_report
from iqe.export.graphs import (
    HEAD_OUTPUTS,
    FusedGraph,
    HeadGraph,
    ImageEncoderGraph,
    TextBranchGraph,
)
from iqe.export.precision import (
    PrecisionPolicy,
    PrecisionRefused,
    apply_policy,
    calibration_images,
    choose_fp16_policy,
    with_policy,
)
from iqe.model.iqe import IQEModel

OPSET = 17  # LayerNormalization is a native op from 17 on (TensorRT parses it as one layer)
PRECISIONS = ("fp32", "fp16")
GRAPHS = ("image_encoder", "text_branch", "head", "fused")
# Verification images when none are given: the fp16 contract's Spearman needs >= 64.
DEFAULT_CALIB_IMAGES = {"fp32": 16, "fp16": 64}
NOISE_FLOOR_IMAGES = 8  # float64 reference run on this many of them
# The FP16 sweep judges candidates on a working set of this many calibration images (grown
# by the hardest ones where the chosen policy fails on the rest); the chosen policy is
# always gated on all of them. ViT-L on a CPU: about one second per image forward.
SWEEP_IMAGES = 8


class FidelityError(InputError):
    """An exported graph drifts from the float32 PyTorch model past the fidelity contract."""


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
    precision_policy: dict | None = None  # fp16: PrecisionPolicy.to_dict() (blocks, fp16_flop_fraction, sweep)
    fp16_flop_fraction: float | None = None  # of the vision tower's multiply-adds
    drift: dict | None = None  # DriftReport.summary() of the fused graph in ONNX Runtime (None: not verified)

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


def _modules(model: IQEModel, precision: str, policy: PrecisionPolicy | None = None) -> dict[str, torch.nn.Module]:
    vision_model = with_policy(model, policy) if precision == "fp16" else model
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


def _env_tolerance(tolerance: float | None) -> float:
    if tolerance is not None:
        value = tolerance
    else:
        raw = os.environ.get("IQE_TOLERANCE", "1")
        try:
            value = float(raw)
        except ValueError:
            raise InputError(f"IQE_TOLERANCE must be a number >= 1, got '{raw}'") from None
    if not value >= 1:
        raise InputError(f"--tolerance must be >= 1 (a multiplier on the contract's limits), got {value}")
    return value


def torch_outputs(model: IQEModel, images: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """The float32 (or float64) PyTorch model's outputs, HEAD_OUTPUTS as float32 arrays."""
    parts = [model.score(torch.from_numpy(images[i:i + batch]).to(next(model.parameters()).dtype))
             for i in range(0, len(images), batch)]
    return {k: np.concatenate([p[k] for p in parts]).astype(np.float32) for k in HEAD_OUTPUTS}


def noise_floor(model: IQEModel, images: np.ndarray, reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output max abs of float32 vs float64 PyTorch on `images` (their first rows of `reference`)."""
    m64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        want = torch_outputs(m64, images.astype(np.float64))
    return {k: float(np.abs(reference[k][:len(images)].astype(np.float64) - want[k]).max()) for k in HEAD_OUTPUTS}


def onnxruntime_outputs(path: Path, images: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """Outputs of an ONNX graph with input `images` on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    parts = [sess.run(names, {"images": images[i:i + batch]}) for i in range(0, len(images), batch)]
    return {n: np.concatenate([p[j] for p in parts]).astype(np.float32) for j, n in enumerate(names)}


def verify_graph(model: IQEModel, path: Path, precision: str, images: np.ndarray, names: list[str],
                 tolerance: float = 1.0, labels: np.ndarray | None = None, candidate: str | None = None,
                 reference: dict[str, np.ndarray] | None = None) -> DriftReport:
    """Judge a fused ONNX graph in ONNX Runtime against the float32 PyTorch model on `images`.

    The noise floor (float32 vs float64 PyTorch) is measured on the first NOISE_FLOOR_IMAGES.
    """
    with torch.no_grad():
        reference = reference or torch_outputs(model, images)
        floor = noise_floor(model, images[:NOISE_FLOOR_IMAGES], reference)
    got = onnxruntime_outputs(path, images)
    rep = compare(reference, got, precision, names, tolerance, noise_floor=floor, labels=labels,
                  candidate_name=candidate or f"onnxruntime {precision} ({path.name})")
    return rep


def add_fp16_arithmetic_checks(rep: DriftReport, reference: dict[str, np.ndarray], emulated: dict[str, np.ndarray],
                               names: list[str], tolerance: float) -> None:
    """Judge the policy with FP16 rounding emulated in PyTorch too, as checks marked [fp16 arithmetic]."""
    arith = compare(reference, emulated, "fp16", names, tolerance, noise_floor=rep.noise_floor)
    for c in arith.checks:
        c.output = f"{c.output} [fp16 arithmetic]"
    rep.checks += arith.checks
    rep.metrics.update({f"{k} [fp16 arithmetic]": v for k, v in arith.metrics.items()})
    rep.notes.append("checks marked [fp16 arithmetic]: the policy with FP16 rounding in PyTorch "
                     "(FP16 inputs and outputs, FP32 accumulation, as CUDA/TensorRT compute)")


def export_policy(model, policy: PrecisionPolicy | None, images, names, source: str, tolerance: float, verify: bool,
                  out_dir: Path, info: ExportInfo, say, keep: dict | None = None) -> PrecisionPolicy:
    """The FP16 policy an export uses: `policy`, or measured on `images`; recorded in `info`.

    Shared by every family's exporter (their vision blocks are the same CLIP blocks).
    `keep` receives the sweep's float32 and emulated outputs (see `choose_fp16_policy`).
    Raises PrecisionRefused (drift report `drift.sweep.fp16.json` written) when none passes.
    """
    if policy is None:
        say(f"measuring the FP16 precision policy on {source} ...", flush=True)
        policy, sweep_rep = choose_fp16_policy(model, images, names, tolerance=tolerance, source=source,
                                               sweep_images=SWEEP_IMAGES, keep=keep,
                                               log=lambda m: say("  " + m, flush=True))
        if policy is None:
            from iqe.export.precision import refusal_message

            path = write_drift_report(sweep_rep, out_dir, "sweep", "fp16")
            raise PrecisionRefused(f"{refusal_message(sweep_rep)}\n  drift report: {path}")
    if not policy.fp16_flop_fraction:
        from iqe.export.precision import fp16_flop_fraction

        policy.fp16_flop_fraction = round(fp16_flop_fraction(model.cfg, policy.blocks), 4)
    info.precision_policy = policy.to_dict()
    info.fp16_flop_fraction = policy.fp16_flop_fraction
    say(f"FP16 policy: {policy.describe()}", flush=True)
    return policy


def export_model(model: IQEModel, out_dir: str | Path, precision: str = "fp32", max_batch: int = 32,
                 graphs: tuple[str, ...] = GRAPHS, verify: bool | None = None, progress: bool = True, *,
                 policy: PrecisionPolicy | None = None, calib: str | Path | None = None,
                 calib_images: int | None = None, tolerance: float | None = None) -> ExportInfo:
    """Export `model` to ONNX graphs in `out_dir` and check each one.

    Args:
        model: eval-mode IQEModel (float32).
        out_dir: engine directory; graphs go to `<name>.<precision>.onnx`.
        precision: "fp32" or "fp16" (the bundle's FP16 policy, see iqe.export.precision).
        max_batch: largest batch the engines are built for (recorded for builders).
        graphs: which graphs to write.
        verify: judge the fused graph in ONNX Runtime by the fidelity contract (default: on
            unless IQE_NO_VERIFY=1); component graphs record their max abs vs PyTorch.
        policy: FP16 policy to use instead of measuring one.
        calib: folder of the user's images for the policy sweep and verification (env
            IQE_CALIB); default: the synthetic set.
        calib_images: how many images (default DEFAULT_CALIB_IMAGES[precision]).
        tolerance: multiplier >= 1 on the contract's limits (env IQE_TOLERANCE, default 1).
    Returns:
        ExportInfo, also written to `export.<precision>.json`.
    Raises:
        InputError: unknown precision/graph, bad tolerance. PrecisionRefused: no FP16 policy
        passes. FidelityError: the fused graph fails verification (the drift report is written).
    """
    import onnx

    from iqe.model.families import family_of

    if family_of(model).export is not None:  # e.g. MVFA: its own fused graph, same ExportInfo contract
        return family_of(model).export(model, out_dir, precision, max_batch, graphs, verify, progress, policy=policy,
                                       calib=calib, calib_images=calib_images, tolerance=tolerance)
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    unknown = set(graphs) - set(GRAPHS)
    if unknown:
        raise InputError(f"unknown graph(s) {sorted(unknown)}; known: {', '.join(GRAPHS)}")
    tolerance = _env_tolerance(tolerance)
    if verify is None:
        verify = os.environ.get("IQE_NO_VERIFY", "0") in ("", "0")
    calib = calib if calib is not None else (os.environ.get("IQE_CALIB") or None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    t0 = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    info = ExportInfo(precision, OPSET, model.cfg.digest(), model.cfg.image_size, max_batch)
    n_images = calib_images or DEFAULT_CALIB_IMAGES[precision]
    images = names = labels = None
    source = ""  # no calibration images read (a given policy, no verification)
    swept: dict = {}  # the sweep's float32 and emulated outputs on the calibration images, reused below
    if verify or (precision == "fp16" and policy is None):
        images, names, labels, source = calibration_images(calib, n_images, model.cfg.image_size)
    if precision == "fp16":
        policy = export_policy(model, policy, images, names, source, tolerance, verify, out_dir, info, say, keep=swept)
    specs = graph_specs(model)
    modules = _modules(model, precision, policy)
    for name in graphs:
        in_names, in_shapes, out_names, out_shapes = specs[name]
        module = modules[name].eval()
        feed = _example_inputs(model, in_names, batch=2)
        path = out_dir / f"{name}.{precision}.onnx"
        tmp = path.with_name(f".{path.name}.tmp")
        dynamic = {n: {0: "batch"} for n in in_names + out_names}
        say(f"export {path.name} ...", flush=True)
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
            # Same-precision comparison on the example batch: catches export bugs in components.
            gi.verify_max_abs = verify_with_onnxruntime(path, module, feed, out_names)
        info.graphs[name] = gi
    if verify and "fused" in info.graphs:
        say(f"verify fused.{precision}.onnx on {len(images)} images against the float32 PyTorch model ...", flush=True)
        reference = swept.get("reference") or torch_outputs(model, images)
        rep = verify_graph(model, out_dir / info.graphs["fused"].file, precision, images, names, tolerance,
                           reference=reference)
        rep.notes.append(f"images: {source}")
        if precision == "fp16":
            # ONNX Runtime's CPU provider has no FP16 GEMM: it inserts casts to float32 and drops
            # the FP16 rounding of the GEMM outputs, so it understates what CUDA / TensorRT compute.
            # The same policy with FP16 rounding emulated in PyTorch (equal to real casts within
            # float32 accumulation-order noise) rounds as a GPU does; it is judged too.
            emulated = swept.get("candidate") or torch_outputs(apply_policy(copy.deepcopy(model), policy, emulate=True),
                                                               images)
            add_fp16_arithmetic_checks(rep, reference, emulated, names, tolerance)
        if policy is not None:
            rep.extra["policy"] = policy.to_dict()["blocks"]
            rep.extra["fp16_flop_fraction"] = policy.fp16_flop_fraction
        report_path = write_drift_report(rep, out_dir, "onnxruntime", precision)
        info.drift = rep.summary()
        say(rep.summary_line(), flush=True)
        if not rep.passed:
            raise FidelityError(f"{failure_message(rep, f'fused.{precision}.onnx', precision)}\n"
                                f"  drift report: {report_path}")
    info.export_seconds = round(time.perf_counter() - t0, 2)
    from iqe.atomic import atomic_write_text

    atomic_write_text(out_dir / f"export.{precision}.json", info.to_json() + "\n")
    return info
