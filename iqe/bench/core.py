"""`iqe bench`: model-only and end-to-end timings per backend x precision x batch size.

For a bundle, or a random-weight model of a named preset (so the full ViT-L/14 @240 can
be measured without real weights), the sweep runs, in one process:

1. the reference-loop baseline (`iqe.bench.reference_loop`): same weights, eager
   PyTorch, text branch per image over the full sequence, IQM per layer;
2. every backend x precision (x ONNX Runtime session variant): model-only latency
   (warm-up excluded; CUDA events on GPU) per batch size, with the outputs compared to
   the baseline's on the same inputs. By default all runners are loaded at once and
   the timed calls alternate between configurations round by round, so load drifting
   on a shared machine hits every configuration alike (`--no-interleave`: one
   configuration after the other, less memory);
3. end to end (default variants): one PNG and one DICOM file at batch 1, and a
   synthetic DICOM series at the end-to-end batch size: decode -> preprocess ->
   infer -> results.jsonl + maps.npz;
4. optionally an op-level profile (ONNX Runtime profiler / torch.profiler).

Every figure carries its ratio to the baseline measured in the same run. A failing
configuration records its error and the sweep goes on. Results: report.json,
report.md, report.csv and PNG plots in --out.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from iqe.argtypes import int_at_least
from iqe.bench import report as report_mod
from iqe.bench.data import write_dicom_series, write_png
from iqe.bench.e2e import run_pipeline
from iqe.bench.machine import loadavg, machine_info, sgemm_gflops
from iqe.bench.ort import (
    COMPONENT_GRAPHS,
    VARIANTS,
    ComponentsOrtRunner,
    VariantOrtRunner,
    parse_variants,
    summarize_ort_profile,
    summarize_torch_profile,
)
from iqe.bench.reference_loop import ReferenceLoopRunner
from iqe.bench.stats import Clock, summarize, time_calls
from iqe.engine.registry import BACKENDS
from iqe.engine.runners import Runner
from iqe.errors import InputError

BASELINE = "reference-loop"
PRECISIONS = ("fp32", "fp16")
E2E_MODES = ("single", "series")
SCORE_KEYS = ("score", "score_query", "score_text", "score_few", "map_max")
MAP_KEYS = ("map", "map_query", "map_text", "map_smooth")
# Engine vs baseline, max abs over the benchmark inputs. fp32: REFERENCE.md's parity bound.
# fp16 runs the vision encoder in half precision, so its outputs are compared at a loose
# bound that only catches breakage (NaN, wrong layout), not rounding.
PARITY_TOL = {"fp32": 1e-4, "fp16": 5e-2}
SCHEMA = "iqe-bench/1"


# ------------------------------------------------------------------------------ arguments
def _csv(known: tuple[str, ...] | None = None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got '{text}'")
        if known is not None:
            bad = [v for v in values if v not in known]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown value(s) {bad}; choose from {', '.join(known)}")
        return values

    return parse


def _batches(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes like 1,8, got '{text}'") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got '{text}'")
    return values


def _variants(text: str) -> list[str]:
    try:
        return [v.name for v in parse_variants(text)]
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_nonneg_int = int_at_least(0)
_pos_int = int_at_least(1)


def _e2e(text: str) -> list[str]:
    if text.strip() == "none":
        return []
    if text.strip() == "all":
        return list(E2E_MODES)
    return _csv(E2E_MODES)(text)


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `iqe bench` options to `parser` (defaults keep a full ViT-L run practical on CPU)."""
    src = parser.add_argument_group("model")
    src.add_argument("--model", type=Path, default=None,
                     help="bundle directory to benchmark; without it, a random-weight model of --preset")
    src.add_argument("--preset", default="vit-l-14-336",
                     help="preset for a random-weight model when --model is not given (e.g. tiny, vit-l-14-336)")
    src.add_argument("--seed", type=int, default=0, help="seed of the random weights and the synthetic inputs")

    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--backends", type=_csv(BACKENDS), default="torch,onnxruntime",
                       help=f"comma-separated, from {', '.join(BACKENDS)}")
    sweep.add_argument("--precisions", type=_csv(PRECISIONS), default="fp32", help="comma-separated: fp32, fp16")
    sweep.add_argument("--batches", type=_batches, default="1,8", help="comma-separated batch sizes")
    sweep.add_argument("--warmup", type=_nonneg_int, default=1, help="untimed calls before timing, per batch size")
    sweep.add_argument("--iters", type=_pos_int, default=5, help="timed calls per batch size (at least)")
    sweep.add_argument("--min-time", type=float, default=0.0,
                       help="keep timing past --iters until this many seconds accumulated (fast configs get more samples)")
    sweep.add_argument("--ort-variants", type=_variants, default="default",
                       help=f"ONNX Runtime session variants, comma-separated: {', '.join(VARIANTS)}")
    sweep.add_argument("--no-interleave", dest="interleave", action="store_false",
                       help="time one configuration after the other (otherwise all runners are loaded and timed calls "
                            "alternate between them so load drift on a shared machine hits all alike; needs the "
                            "memory of every configuration at once)")
    sweep.add_argument("--no-baseline", dest="baseline", action="store_false",
                       help="skip the reference-loop baseline (no ratios, no parity check)")
    sweep.add_argument("--fp16-cpu-max-batch", type=_nonneg_int, default=1,
                       help="on CPU, run fp16 only up to this batch (CPU fp16 kernels are slow); larger ones are recorded as skipped")
    sweep.add_argument("--profile", action="store_true",
                       help="also record an op-level profile per configuration (ORT profiler / torch.profiler) at --profile-batch")
    sweep.add_argument("--profile-batch", type=_pos_int, default=None, help="batch size to profile; none given: the largest of --batches")

    e2e = parser.add_argument_group("end to end")
    e2e.add_argument("--e2e", type=_e2e, default="all",
                     help="end-to-end runs: single (one PNG, one DICOM file), series (a DICOM series), all, none; comma-separated")
    e2e.add_argument("--series-slices", type=_pos_int, default=200, help="slices of the synthetic DICOM series")
    e2e.add_argument("--series-size", type=_pos_int, default=512, help="rows = columns of each synthetic slice")
    e2e.add_argument("--e2e-batch", type=_pos_int, default=None, help="batch size for the series; none given: the largest of --batches")
    e2e.add_argument("--e2e-repeats", type=_pos_int, default=3, help="timed repeats of each single-image run (after 1 warm-up)")
    e2e.add_argument("--no-save-maps", dest="save_maps", action="store_false",
                     help="end-to-end runs write results.jsonl only (otherwise also maps.npz, as `iqe score --save-maps`)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("iqe-bench"), help="report directory")
    out.add_argument("--engine-dir", type=Path, default=None,
                     help="engine directory; none given: the IQE_CACHE engine cache when IQE_CACHE is set, else a temporary folder")
    out.add_argument("--target-ratio", type=float, default=2.0,
                     help="target: ONNX Runtime fp32 throughput / reference loop at --target-batch")
    out.add_argument("--target-batch", type=_pos_int, default=8, help="batch size the target is checked at")
    out.add_argument("--gemm-seconds", type=float, default=1.5,
                     help="seconds spent measuring this machine's float32 GEMM rate for the report (0: skip)")
    out.add_argument("--keep-temp", action="store_true", help="keep the temporary folder (bundle, inputs, engines)")
    if "--quiet" not in parser._option_string_actions:  # the CLI adds --quiet to every subcommand itself
        out.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


# ------------------------------------------------------------------------------ settings
@dataclass
class BenchSettings:
    """Everything a sweep needs, validated (built from argparse by `from_args`)."""

    model: Path | None = None
    preset: str = "vit-l-14-336"
    seed: int = 0
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    warmup: int = 1
    iters: int = 5
    min_time: float = 0.0
    ort_variants: list[str] = field(default_factory=lambda: ["default"])
    baseline: bool = True
    interleave: bool = True
    fp16_cpu_max_batch: int = 1
    profile: bool = False
    profile_batch: int | None = None
    e2e: list[str] = field(default_factory=lambda: list(E2E_MODES))
    series_slices: int = 200
    series_size: int = 512
    e2e_batch: int | None = None
    e2e_repeats: int = 3
    save_maps: bool = True
    out: Path = Path("iqe-bench")
    engine_dir: Path | None = None
    target_ratio: float = 2.0
    target_batch: int = 8
    gemm_seconds: float = 1.5
    keep_temp: bool = False
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchSettings:
        known = {f for f in cls.__dataclass_fields__}
        s = cls(**{k: v for k, v in vars(args).items() if k in known})
        return s.validate()

    def validate(self) -> BenchSettings:
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise InputError(f"--model {self.model}: not a bundle directory (no config.json); "
                             f"or drop --model to benchmark a random-weight --preset")
        if self.model is None:
            from iqe.model.config import load_config

            load_config(self.preset)  # unknown presets fail here, listing the known ones
        if self.min_time < 0:
            raise InputError(f"--min-time must be >= 0, got {self.min_time}")
        self.batches = sorted(set(self.batches))
        self.e2e_batch = self.e2e_batch or self.batches[-1]
        self.profile_batch = self.profile_batch or self.batches[-1]
        return self

    @property
    def progress(self) -> bool:
        return not self.quiet


@dataclass(frozen=True)
class ConfigSpec:
    """One column of the sweep: backend, precision and (ONNX Runtime) session variant."""

    backend: str
    precision: str
    variant: str = "default"

    @property
    def label(self) -> str:
        base = f"{self.backend}/{self.precision}"
        return base if self.variant == "default" else f"{base}/{self.variant}"

    @property
    def is_baseline(self) -> bool:
        return self.backend == BASELINE


def plan_configs(s: BenchSettings) -> list[ConfigSpec]:
    """The baseline first (its outputs and timings are what the others are compared with), then the grid."""
    configs = [ConfigSpec(BASELINE, "fp32")] if s.baseline else []
    for backend, precision in itertools.product(s.backends, s.precisions):
        variants = s.ort_variants if backend == "onnxruntime" else ["default"]
        configs.extend(ConfigSpec(backend, precision, v) for v in variants)
    return configs


# ------------------------------------------------------------------------------ model
def estimate_gflops(cfg) -> dict[str, float]:
    """Multiply-add FLOPs (x2) per image of the dominant matmuls, from the config alone.

    Returns vision, text (full sequences, as the reference), text (precomputed prefix, as
    the engine), IQM over all tapped layers, the patch adapters, and the two totals.
    """
    v, t, q = cfg.vision, cfg.text, cfg.iqm
    n = cfg.grid**2 + 1
    w = v.width
    vision = 2 * (n - 1) * 3 * v.patch_size**2 * w + v.layers * (2 * 12 * w * w * n + 2 * 2 * n * n * w)
    tw, ctx, r = t.width, t.context_length, cfg.prompt_len
    plen = cfg.end_position + cfg.deep_prompt_len
    text_full = 2 * t.layers * (2 * 12 * tw * tw * ctx + 2 * 2 * ctx * ctx * tw)
    text_prefixed = 2 * t.layers * (2 * 12 * tw * tw * r + 2 * 2 * r * (plen + r) * tw)
    h, e, lp, k = q.hidden_size, cfg.embed_dim, cfg.grid**2, len(cfg.features)
    per_layer = (2 * 4 * h * h * 2  # self-attention projections on the 2 queries
                 + 2 * 2 * h * h * 2 + 2 * 2 * h * e * lp + 2 * 2 * 2 * lp * h  # patch cross-attention
                 + 2 * 2 * h * h * 2 + 2 * 2 * h * e * 2  # text cross-attention
                 + 2 * 2 * h * q.intermediate_size * 2)  # feed-forward
    iqm = k * q.num_hidden_layers * per_layer
    adapter = k * 2 * lp * w * e
    g = 1e9
    return {"vision": round(vision / g, 2), "text_full": round(text_full / g, 2),
            "text_prefixed": round(text_prefixed / g, 3), "iqm": round(iqm / g, 2), "adapter": round(adapter / g, 2),
            "engine_total": round((vision + text_prefixed + iqm + adapter) / g, 2),
            "reference_total": round((vision + text_full + iqm + adapter) / g, 2)}


def prepare_model(s: BenchSettings, tmp: Path):
    """(model, bundle path, model record): the given bundle, or a random-weight preset saved as one."""
    import torch

    from iqe.model.bundle import load_bundle, save_bundle
    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel

    t0 = time.perf_counter()
    if s.model is not None:
        model = load_bundle(s.model)
        bundle = Path(s.model)
        source = f"bundle {bundle}"
    else:
        cfg = load_config(s.preset)
        torch.manual_seed(s.seed)  # deterministic weights -> the same bundle content -> engine cache hits
        model = IQEModel(cfg).eval()
        bundle = save_bundle(model, tmp / f"bundle-{cfg.name}-seed{s.seed}",
                             extra={"bench": f"random weights, preset {cfg.name}, seed {s.seed}"})
        source = f"preset {cfg.name}, random weights (seed {s.seed})"
    cfg = model.cfg
    record = {
        "source": source, "name": cfg.name, "image_size": cfg.image_size, "config_sha256": cfg.digest(),
        "vision": f"ViT width {cfg.vision.width} x {cfg.vision.layers} blocks, patch {cfg.vision.patch_size}, "
                  f"{cfg.grid}x{cfg.grid} patches",
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "gflops_per_image": estimate_gflops(cfg),
        "prepare_s": round(time.perf_counter() - t0, 1),
    }
    return model, bundle, record


def resolve_engine_dir(s: BenchSettings, bundle: Path, tmp: Path) -> Path:
    """--engine-dir, else the IQE_CACHE cache entry of this bundle, else a temporary folder."""
    if s.engine_dir is not None:
        return Path(s.engine_dir)
    if os.environ.get("IQE_CACHE"):
        from iqe.engine.build import bundle_key, cache_root

        return cache_root() / bundle_key(bundle)
    return tmp / "engine"


def component_graphs(model, engine_dir: Path, precision: str, progress: bool) -> dict[str, Path]:
    """The separately exported (and verified) component graphs, exported on first use."""
    from iqe.export.onnx_export import ExportInfo, export_model, sha256_file

    folder = engine_dir / "components"
    info_path = folder / f"export.{precision}.json"
    if info_path.is_file():
        info = ExportInfo.read(info_path)
        paths = {n: folder / info.graphs[n].file for n in COMPONENT_GRAPHS if n in info.graphs}
        if (info.config_sha256 == model.cfg.digest() and len(paths) == len(COMPONENT_GRAPHS)
                and all(p.is_file() and sha256_file(p) == info.graphs[n].sha256 for n, p in paths.items())):
            return paths
    info = export_model(model, folder, precision, graphs=COMPONENT_GRAPHS, progress=progress)
    return {n: folder / info.graphs[n].file for n in COMPONENT_GRAPHS}


# ------------------------------------------------------------------------------ the sweep
class Sweep:
    """State of one benchmark run: inputs, baseline outputs, results so far."""

    def __init__(self, s: BenchSettings, model, bundle: Path, engine_dir: Path, tmp: Path):
        self.s = s
        self.model = model
        self.bundle = bundle
        self.engine_dir = engine_dir
        self.tmp = tmp
        self.size = model.cfg.image_size
        self.results: list[dict[str, Any]] = []
        self.configs: list[dict[str, Any]] = []
        self.profiles: dict[str, Any] = {}
        self.baseline_outputs: dict[int, dict[str, np.ndarray]] = {}
        self.baseline_series: np.ndarray | None = None
        self._write_inputs()

    # -- inputs -------------------------------------------------------------------------
    def _write_inputs(self) -> None:
        """Synthetic series + PNG; model-only inputs are the series' first slices, preprocessed."""
        from iqe.runtime.sources import iter_items

        s = self.s
        n = s.series_slices if "series" in s.e2e else max(s.batches[-1], 1)
        self.series_dir = self.tmp / "series"
        self.series_files = write_dicom_series(self.series_dir, n, size=s.series_size, seed=s.seed)
        self.png = write_png(self.tmp / "single.png", size=s.series_size, seed=s.seed)
        first = [it for _, it in zip(range(s.batches[-1]), iter_items([self.series_dir], self.size))]
        bad = [it.error for it in first if it.error]
        if bad:
            raise RuntimeError(f"synthetic series unreadable (bug): {bad[0]}")
        images = np.stack([it.image for it in first if it.image is not None])
        reps = math.ceil(s.batches[-1] / len(images))
        self.images = np.ascontiguousarray(np.concatenate([images] * reps)[: s.batches[-1]], dtype=np.float32)

    # -- runners ------------------------------------------------------------------------
    def make_runner(self, spec: ConfigSpec) -> Runner:
        """The runner of a configuration (exporting / building engines as needed)."""
        from iqe.engine.build import make_runner
        from iqe.engine.torch_backend import TorchRunner

        if spec.is_baseline:
            import torch

            return ReferenceLoopRunner(self.model, "cuda" if torch.cuda.is_available() else "cpu")
        if spec.backend == "torch":
            # Same as make_runner(bundle, "torch"), sharing the weights already in memory.
            return TorchRunner(self.model, precision=spec.precision)
        if spec.backend == "onnxruntime" and spec.variant != "default":
            variant = VARIANTS[spec.variant]
            base = make_runner(self.bundle, "onnxruntime", spec.precision, self.engine_dir, progress=self.s.progress)
            if variant.graph == "components":
                graphs = component_graphs(self.model, self.engine_dir, spec.precision, self.s.progress)
                return ComponentsOrtRunner(graphs, self.size, variant, max_batch=base.max_batch)
            return VariantOrtRunner(base.graph_path, self.size, variant, max_batch=base.max_batch)  # type: ignore[attr-defined]
        return make_runner(self.bundle, spec.backend, spec.precision, self.engine_dir, progress=self.s.progress)

    def skip_reason(self, spec: ConfigSpec, device: str, batch: int) -> str | None:
        if spec.precision == "fp16" and device == "cpu" and batch > self.s.fp16_cpu_max_batch:
            return (f"fp16 on CPU runs on slow fallback kernels; measured only up to batch "
                    f"{self.s.fp16_cpu_max_batch} (--fp16-cpu-max-batch)")
        return None

    # -- one configuration ----------------------------------------------------------------
    def setup(self, spec: ConfigSpec) -> Runner | None:
        """Build and activate the runner of `spec`; on failure record the error (all batch sizes) and return None."""
        record: dict[str, Any] = {"label": spec.label, "backend": spec.backend, "precision": spec.precision,
                                  "variant": spec.variant, "status": "ok", "error": None}
        if spec.backend == "onnxruntime":
            record["ort_settings"] = VARIANTS[spec.variant].settings()
        self.configs.append(record)
        t0 = time.perf_counter()
        try:
            runner = self.make_runner(spec)
            runner.activate()
        except Exception as exc:  # noqa: BLE001 - a failing configuration is recorded, the sweep goes on
            record.update(status="error", error=_describe(exc), setup_s=round(time.perf_counter() - t0, 1))
            for b in self.s.batches:
                self.results.append(self._entry("model", spec, b, status="error", error=record["error"]))
            return None
        record.update(setup_s=round(time.perf_counter() - t0, 1), device=runner.device, runner=type(runner).__name__)
        return runner

    @staticmethod
    def teardown(runner: Runner) -> None:
        runner.deactivate()
        gc.collect()  # ViT-L sessions hold GBs; free them before the next configuration

    def run_sequential(self, specs: list[ConfigSpec]) -> None:
        """One configuration at a time: least memory, but load changes between configurations bias ratios."""
        bar = tqdm(specs, desc="bench", unit="config", disable=not self.s.progress)
        for spec in bar:
            bar.set_postfix_str(spec.label)
            runner = self.setup(spec)
            if runner is None:
                continue
            try:
                for b in self.s.batches:
                    self.results.append(self._model_only(spec, runner, b))
                self.run_extras(spec, runner)
            finally:
                self.teardown(runner)

    def run_interleaved(self, specs: list[ConfigSpec]) -> None:
        """All runners active at once; timed calls alternate between configurations round by round.

        On a shared machine the load drifts over minutes; interleaving exposes every
        configuration to the same drift, so ratios measured in one run stay fair.
        """
        active: list[tuple[ConfigSpec, Runner]] = []
        try:
            for spec in tqdm(specs, desc="setup", unit="config", disable=not self.s.progress):
                runner = self.setup(spec)
                if runner is not None:
                    active.append((spec, runner))
            for b in self.s.batches:
                self.results.extend(self._model_only_interleaved(active, b))
            for spec, runner in tqdm(active, desc="end to end", unit="config", disable=not self.s.progress):
                self.run_extras(spec, runner)
        finally:
            for _, runner in active:
                self.teardown(runner)

    def run_extras(self, spec: ConfigSpec, runner: Runner) -> None:
        """End-to-end runs (default variants only) and the optional profile of one configuration."""
        s = self.s
        if spec.variant == "default":
            if "single" in s.e2e:
                for fmt, path in (("png", self.png), ("dicom", self.series_files[0])):
                    self.results.append(self._e2e_single(spec, runner, fmt, path))
            if "series" in s.e2e:
                self.results.append(self._e2e_series(spec, runner))
        if s.profile:
            self.profiles[spec.label] = self._profile(spec, runner)

    def _entry(self, kind: str, spec: ConfigSpec, batch: int, **extra: Any) -> dict[str, Any]:
        return {"kind": kind, "label": spec.label, "backend": spec.backend, "precision": spec.precision,
                "variant": spec.variant, "batch": batch, "status": "ok", "error": None, **extra}

    def _timed_entry(self, spec: ConfigSpec, runner: Runner, batch: int, samples: list[float],
                     out: dict[str, np.ndarray], load: list[float | None], interleaved: bool) -> dict[str, Any]:
        lat = summarize(samples)
        entry = self._entry("model", spec, batch, timing="cuda_events" if runner.device == "cuda" else "perf_counter",
                            warmup=self.s.warmup, interleaved=interleaved, latency_ms=lat,
                            samples_ms=[round(x, 3) for x in samples],
                            images_per_s=round(batch * len(samples) / (sum(samples) / 1e3), 4),
                            ms_per_image=round(lat["mean"] / batch, 3), loadavg=load)
        if spec.is_baseline:
            self.baseline_outputs[batch] = out
        elif batch in self.baseline_outputs:
            entry["parity"] = parity(out, self.baseline_outputs[batch], PARITY_TOL[spec.precision])
        return entry

    def _model_only(self, spec: ConfigSpec, runner: Runner, batch: int) -> dict[str, Any]:
        s = self.s
        reason = self.skip_reason(spec, runner.device, batch)
        if reason:
            return self._entry("model", spec, batch, status="skipped", error=reason)
        images = self.images[:batch]
        load_before = loadavg()
        try:
            samples, out = time_calls(lambda: runner.infer(images), s.warmup, s.iters, s.min_time,
                                      cuda=runner.device == "cuda", desc=f"{spec.label} b{batch}", progress=s.progress)
        except Exception as exc:  # noqa: BLE001
            return self._entry("model", spec, batch, status="error", error=_describe(exc))
        return self._timed_entry(spec, runner, batch, samples, out, [load_before, loadavg()], interleaved=False)

    def _model_only_interleaved(self, active: list[tuple[ConfigSpec, Runner]], batch: int) -> list[dict[str, Any]]:
        """Warm up every configuration, then time rounds of one call each (order reversed every other round)."""
        s = self.s
        images = self.images[:batch]
        entries: dict[ConfigSpec, dict[str, Any]] = {}
        live: list[tuple[ConfigSpec, Runner]] = []
        for spec, runner in active:
            reason = self.skip_reason(spec, runner.device, batch)
            if reason:
                entries[spec] = self._entry("model", spec, batch, status="skipped", error=reason)
                continue
            try:
                for _ in range(s.warmup):
                    runner.infer(images)
                live.append((spec, runner))
            except Exception as exc:  # noqa: BLE001
                entries[spec] = self._entry("model", spec, batch, status="error", error=_describe(exc))
        samples: dict[ConfigSpec, list[float]] = {spec: [] for spec, _ in live}
        outs: dict[ConfigSpec, dict[str, np.ndarray]] = {}
        load_before = loadavg()
        bar = tqdm(total=s.iters * len(live), desc=f"batch {batch}, interleaved", unit="call", leave=False,
                   disable=not s.progress)
        rounds = 0

        def more() -> bool:
            if not live:
                return False
            if rounds < s.iters:
                return True
            return rounds < 10_000 and min(sum(samples[sp]) for sp, _ in live) < s.min_time * 1e3

        while more():
            for spec, runner in list(live if rounds % 2 == 0 else live[::-1]):
                clock = Clock(runner.device == "cuda")
                try:
                    with clock:
                        outs[spec] = runner.infer(images)
                except Exception as exc:  # noqa: BLE001
                    entries[spec] = self._entry("model", spec, batch, status="error", error=_describe(exc))
                    live.remove((spec, runner))
                    continue
                samples[spec].append(clock.ms)
                if rounds < s.iters:
                    bar.update(1)
            rounds += 1
        bar.close()
        load = [load_before, loadavg()]
        for spec, runner in live:  # the baseline comes first in `active`, so its outputs exist for the parity of the rest
            entries[spec] = self._timed_entry(spec, runner, batch, samples[spec], outs[spec], load, interleaved=True)
        return [entries[spec] for spec, _ in active if spec in entries]

    def _e2e_single(self, spec: ConfigSpec, runner: Runner, fmt: str, path: Path) -> dict[str, Any]:
        s = self.s
        reason = self.skip_reason(spec, runner.device, 1)
        if reason:
            return self._entry("e2e_single", spec, 1, format=fmt, status="skipped", error=reason)
        out_dir = self.tmp / "e2e" / spec.label.replace("/", "_") / f"single_{fmt}"
        try:
            runs = [run_pipeline([path], runner.infer, self.size, 1, out_dir, s.save_maps) for _ in range(s.e2e_repeats + 1)]
        except Exception as exc:  # noqa: BLE001
            return self._entry("e2e_single", spec, 1, format=fmt, status="error", error=_describe(exc))
        runs = runs[1:]  # the first pass warms file caches and the runner's input shape
        if any(r.errors for r in runs):
            return self._entry("e2e_single", spec, 1, format=fmt, status="error", error=runs[0].error_messages[0])
        samples = [r.wall_s * 1e3 for r in runs]
        return self._entry("e2e_single", spec, 1, format=fmt, warmup=1, latency_ms=summarize(samples),
                           samples_ms=[round(x, 3) for x in samples],
                           images_per_s=round(len(runs) / sum(r.wall_s for r in runs), 4),
                           stages_ms={k: round(1e3 * float(np.mean([r.stages_s[k] for r in runs])), 2) for k in runs[0].stages_s},
                           score=float(runs[-1].scores[0]))

    def _e2e_series(self, spec: ConfigSpec, runner: Runner) -> dict[str, Any]:
        s = self.s
        batch = s.e2e_batch or s.batches[-1]
        extra = {"format": "dicom", "slices": len(self.series_files), "slice_size": s.series_size, "save_maps": s.save_maps}
        if spec.precision == "fp16" and runner.device == "cpu":
            return self._entry("e2e_series", spec, batch, status="skipped", **extra,
                               error="fp16 on CPU: a whole series on the slow fp16 fallback kernels is not worth the time")
        out_dir = self.tmp / "e2e" / spec.label.replace("/", "_") / "series"
        load_before = loadavg()
        try:
            run = run_pipeline([self.series_dir], runner.infer, self.size, batch, out_dir, s.save_maps)
        except Exception as exc:  # noqa: BLE001
            return self._entry("e2e_series", spec, batch, status="error", error=_describe(exc), **extra)
        entry = self._entry("e2e_series", spec, batch, **extra, wall_s=round(run.wall_s, 3), images=run.images,
                            errors=run.errors, images_per_s=round(run.images / run.wall_s, 4),
                            ms_per_image=round(1e3 * run.wall_s / max(run.images, 1), 2),
                            stages_s=run.stages_s, loadavg=[load_before, loadavg()])
        if run.errors:
            entry.update(status="error", error=f"{run.errors} slices unreadable: {run.error_messages[0]}")
        if spec.is_baseline:
            self.baseline_series = run.scores
        elif self.baseline_series is not None and len(self.baseline_series) == len(run.scores):
            diff = float(np.abs(run.scores - self.baseline_series).max()) if len(run.scores) else 0.0
            tol = PARITY_TOL[spec.precision]
            entry["parity"] = {"max_abs": {"score": diff}, "scores_max_abs": diff, "tolerance": tol, "ok": diff <= tol}
        return entry

    def _profile(self, spec: ConfigSpec, runner: Runner) -> dict[str, Any]:
        """Op-level profile of one warm call at --profile-batch (ORT: a fresh session with profiling on)."""
        batch = min(self.s.profile_batch or self.s.batches[-1], len(self.images))
        reason = self.skip_reason(spec, runner.device, batch)
        if reason:
            return {"status": "skipped", "batch": batch, "error": reason}
        images = self.images[:batch]
        try:
            if spec.backend == "onnxruntime" and VARIANTS[spec.variant].graph == "fused":
                variant = VARIANTS[spec.variant]
                folder = self.s.out / "profiles"
                folder.mkdir(parents=True, exist_ok=True)
                onnx_path = runner.graph_path  # type: ignore[attr-defined]  # OrtRunner or VariantOrtRunner
                prof = VariantOrtRunner(onnx_path, self.size, variant, runner.max_batch,
                                        profile_prefix=folder / f"ort_{spec.label.replace('/', '_')}_b{batch}")
                with prof:
                    prof.infer(images)  # warm-up, inside the trace; only the last run is summarised
                    prof.infer(images)
                    trace = prof.end_profiling()
                summary = summarize_ort_profile(trace) if trace else {}
                summary["trace"] = str(trace)
            elif spec.backend in ("torch", BASELINE):
                runner.infer(images)
                summary = summarize_torch_profile(lambda: runner.infer(images))
            else:
                return {"status": "skipped", "batch": batch, "error": "no profiler hooked up for this runner"}
        except Exception as exc:  # noqa: BLE001
            return {"status": "error", "batch": batch, "error": _describe(exc)}
        return {"status": "ok", "batch": batch, **summary}

    # -- ratios and targets -------------------------------------------------------------------
    def sort_results(self, specs: list[ConfigSpec]) -> None:
        """Model-only rows first, then single images, then series; configurations in plan order."""
        kinds = {"model": 0, "e2e_single": 1, "e2e_series": 2}
        order = {spec.label: i for i, spec in enumerate(specs)}
        self.results.sort(key=lambda r: (kinds.get(r["kind"], 9), order.get(r["label"], 99), r["batch"], r.get("format") or ""))

    def add_ratios(self) -> None:
        """images/s of every entry / the baseline's, same kind, batch and format, same run."""
        base = {(r["kind"], r["batch"], r.get("format")): r for r in self.results
                if r["backend"] == BASELINE and r["status"] == "ok"}
        for r in self.results:
            b = base.get((r["kind"], r["batch"], r.get("format")))
            if r["status"] == "ok" and b is not None and b.get("images_per_s"):
                r["ratio_vs_baseline"] = round(r["images_per_s"] / b["images_per_s"], 3)

    def targets(self) -> list[dict[str, Any]]:
        s = self.s
        out = []
        for r in self.results:
            if (r["kind"] == "model" and r["backend"] == "onnxruntime" and r["precision"] == "fp32"
                    and r["batch"] == s.target_batch):
                ratio = r.get("ratio_vs_baseline")
                out.append({"name": f"{r['label']} throughput >= {s.target_ratio:g}x reference loop at batch {s.target_batch}",
                            "label": r["label"], "target_ratio": s.target_ratio, "measured_ratio": ratio,
                            "met": None if ratio is None else ratio >= s.target_ratio,
                            "shortfall": None if ratio is None else round(max(0.0, s.target_ratio / ratio - 1), 3)})
        return out


def parity(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: float) -> dict[str, Any]:
    """Max abs difference per output key (scores and maps), against a tolerance on the scores and maps."""
    diffs = {}
    for k in SCORE_KEYS + MAP_KEYS:
        if k in got and k in want:
            a, b = np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)
            diffs[k] = float(np.abs(a - b).max()) if a.shape == b.shape else math.inf
    scores = max((diffs[k] for k in SCORE_KEYS if k in diffs), default=math.nan)
    maps = max((diffs[k] for k in MAP_KEYS if k in diffs), default=math.nan)
    return {"max_abs": diffs, "scores_max_abs": scores, "maps_max_abs": maps, "tolerance": tol,
            "ok": bool(scores <= tol and maps <= tol)}


def _command_line() -> str:
    """How this process was started, `iqe ...` when through the console script."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "iqe":
        argv[0] = "iqe"
    elif argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "bench":
        argv[0] = "python -m iqe.bench"
    return " ".join(argv)


def _describe(exc: BaseException) -> str:
    """`Type: message` plus where it was raised (last frame), for the report."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" [{Path(tb[-1].filename).name}:{tb[-1].lineno}]" if tb else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}{where}"


def run_sweep(s: BenchSettings) -> dict[str, Any]:
    """Run the whole benchmark; returns the report (also written to s.out)."""
    t_start = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    machine["sgemm_gflops"] = sgemm_gflops(s.gemm_seconds) if s.gemm_seconds > 0 else None
    tmp = Path(tempfile.mkdtemp(prefix="iqe-bench-"))
    try:
        model, bundle, model_record = prepare_model(s, tmp)
        engine_dir = resolve_engine_dir(s, bundle, tmp)
        sweep = Sweep(s, model, bundle, engine_dir, tmp)
        configs = plan_configs(s)
        if s.interleave:
            sweep.run_interleaved(configs)
        else:
            sweep.run_sequential(configs)
        sweep.sort_results(configs)
        sweep.add_ratios()
        report: dict[str, Any] = {
            "schema": SCHEMA,
            "command": _command_line(),
            "machine": {**machine, "loadavg_end": loadavg()},
            "model": model_record,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
            "engine_dir": str(engine_dir) if (s.engine_dir or os.environ.get("IQE_CACHE") or s.keep_temp) else None,
            "configs": sweep.configs,
            "results": sweep.results,
            "targets": sweep.targets(),
            "profiles": sweep.profiles,
            "parity_tolerance": PARITY_TOL,
            "wall_s": round(time.perf_counter() - t_start, 1),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        report["files"] = report_mod.write_all(report, s.out)
        return report
    finally:
        if s.keep_temp:
            print(f"kept temporary folder {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run_bench(args: argparse.Namespace) -> int:
    """Benchmark backends x precisions x batch sizes against the reference loop; write report.{json,md,csv} + plots.

    Returns:
        0 when every configuration measured, 1 when some failed (their errors are in the
        report), 2 when nothing could be measured.
    Raises:
        InputError: invalid options (unknown preset, not a bundle, ...).
    """
    s = BenchSettings.from_args(args)
    report = run_sweep(s)
    ok = [r for r in report["results"] if r["status"] == "ok"]
    failed = [r for r in report["results"] if r["status"] == "error"]
    print(report_mod.console_summary(report), file=sys.stderr)
    print(f"report: {report['files'].get('markdown')} ({len(ok)} measured, {len(failed)} failed)", file=sys.stderr)
    if not ok:
        return 2
    return 1 if failed else 0
