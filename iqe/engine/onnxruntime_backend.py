"""ONNX Runtime backend: build = optimise the fused graph once for this machine; load = open it as is.

CPU: `build` runs ONNX Runtime's full graph optimisation once and saves the result (the
artefact); `load` opens that artefact with graph optimisation disabled, which is what
takes session creation for ViT-L from seconds of re-optimisation to a plain load
(benchmarks/startup.py measures it). The optimised graph may hold CPU-specific layouts,
so the manifest records the CPU model and another CPU rebuilds.

GPU (CUDA / TensorRT execution providers): ONNX Runtime cannot save graphs whose nodes
its TensorRT provider compiled, so nothing is written; the artefact is the exported graph
and the TensorRT provider keeps its own engine cache in the engine directory, built for
the manifest's batch profile, so later processes and other batch sizes within the
profile do not rebuild. fp32 engines run without TF32 (CUDA provider `use_tf32=0`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from iqe.atomic import atomic_path
from iqe.engine.registry import Backend, BatchProfile, BuildResult, module_version
from iqe.engine.runners import Runner
from iqe.errors import InputError

if TYPE_CHECKING:
    from iqe.engine.manifest import Manifest

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
TRT_CACHE_DIR = "ort-trt-cache"  # TensorRT provider's engine + timing cache, inside the engine directory
# Saved artefact format on CPU, chosen by benchmarks/startup.py (ViT-L fp32, 2-core EPYC,
# benchmarks/results/cpu-vit-l-startup): session creation 6.2 s / 1.75 GB peak RSS for the
# optimised ONNX opened with optimisation disabled ("onnx"), against 17.8 s / 3.67 GB for
# ONNX Runtime's own flatbuffer format ("ort", which also has a 2 GB size limit) and
# 11.8 s / 2.50 GB for re-optimising the exported graph at every start (the old way).
ARTEFACT_FORMAT = "onnx"
# Graphs above this keep their weights in `<artefact>.data` (external initializers). Needed
# near protobuf's 2 GiB limit, and it pays before: opening ViT-L fp32 (1.7 GB) this way peaks
# at 1.82 GB RSS instead of 2.56 GB, as the protobuf no longer holds a second copy of the
# weights while the session is created (benchmarks/startup.py; session time within noise).
EXTERNAL_DATA_ABOVE = 256 * 2**20


def ort_providers() -> list[str]:
    """Best available ONNX Runtime execution providers, in preference order."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = [*GPU_PROVIDERS, "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


def cpu_name() -> str:
    """The CPU model (optimised CPU graphs may use its instruction set)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def provider_options(providers: list[str], precision: str, engine_dir: Path, profile: BatchProfile,
                     image_size: int) -> list[dict[str, str]]:
    """Options per provider: TensorRT engine cache + profile shapes; CUDA without TF32 for fp32."""
    options: list[dict[str, str]] = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            shape = f"3x{image_size}x{image_size}"
            cache = str(engine_dir / TRT_CACHE_DIR)
            options.append({
                "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache,
                "trt_profile_min_shapes": f"images:{profile.min}x{shape}",
                "trt_profile_opt_shapes": f"images:{profile.opt}x{shape}",
                "trt_profile_max_shapes": f"images:{profile.max}x{shape}",
            })
        elif p == "CUDAExecutionProvider":
            options.append({"use_tf32": "0" if precision == "fp32" else "1"})
        else:
            options.append({})
    return options


class OrtRunner(Runner):
    """ONNX Runtime on one graph file.

    `optimize=True` lets ONNX Runtime optimise the graph at session creation (a raw
    export); False opens an already optimised artefact as it is. CUDA: IO binding so
    outputs stay on the device until the final copy.
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, image_size: int | None, providers: list[str] | None = None,
                 threads: int | None = None, max_batch: int | None = None, optimize: bool = True,
                 options: list[dict[str, str]] | None = None, graph_path: str | Path | None = None):
        super().__init__(image_size, max_batch)
        self.onnx_path = Path(onnx_path)
        self.graph_path = Path(graph_path or onnx_path)  # the exported (unoptimised) graph
        self.providers = providers
        self.threads = threads
        self.optimize = optimize
        self.options = options

    def session_options(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimize
                                         else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        opts.intra_op_num_threads = self.threads or len(os.sched_getaffinity(0))
        opts.log_severity_level = 3  # errors only
        return opts

    def _activate(self) -> None:
        import onnxruntime as ort

        if not self.onnx_path.is_file():
            raise InputError(f"{self.onnx_path}: ONNX Runtime artefact missing; rebuild with `iqe build`")
        providers = self.providers or ort_providers()
        self.session = ort.InferenceSession(str(self.onnx_path), self.session_options(), providers=providers,
                                            provider_options=self.options)
        self.device = "cuda" if set(GPU_PROVIDERS) & set(self.session.get_providers()) else "cpu"
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if self.device == "cuda":
            binding = self.session.io_binding()
            binding.bind_cpu_input("images", images)
            for name in self.outputs:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
        else:
            values = self.session.run(self.outputs, {"images": images})
        return {k: np.asarray(v, dtype=np.float32) for k, v in zip(self.outputs, values)}

    def _deactivate(self) -> None:
        self.session = None


class OrtBackend(Backend):
    name = "onnxruntime"
    install = "pip install 'iqe-engine[onnx]'"

    def version(self) -> str | None:
        return module_version("onnxruntime")

    def device(self) -> tuple[str, str | None]:
        gpu = [p for p in ort_providers() if p in GPU_PROVIDERS]
        if gpu:
            return f"cuda ({gpu[0]})", None
        return f"cpu ({platform.machine()}, {cpu_name()})", None

    def check_manifest(self, manifest: Manifest, engine_dir: Path) -> str | None:
        import onnxruntime as ort

        missing = [p for p in manifest.extra.get("providers", []) if p not in ort.get_available_providers()]
        if missing:
            return f"built for execution providers {missing}, which this ONNX Runtime lacks"
        data = manifest.extra.get("artefact_data")
        if data and not (engine_dir / data).is_file():
            return f"{data} (the artefact's weights) is missing"
        return super().check_manifest(manifest, engine_dir)

    def build(self, engine_dir: Path, onnx_path: Path, profile: BatchProfile, precision: str,
              image_size: int) -> BuildResult:
        import onnxruntime as ort

        providers = ort_providers()
        device, cc = self.device()
        extra: dict[str, Any] = {"providers": providers}
        if set(providers) & set(GPU_PROVIDERS):
            # Compiled TensorRT nodes cannot be saved: keep the exported graph; the first
            # session below fills the TensorRT provider's engine cache for the profile.
            options = provider_options(providers, precision, engine_dir, profile, image_size)
            (engine_dir / TRT_CACHE_DIR).mkdir(exist_ok=True)
            runner = OrtRunner(onnx_path, image_size, providers, options=options)
            runner.activate()
            runner.deactivate()
            return BuildResult(onnx_path.name, device, cc, {**extra, "optimized": False})
        fmt = ARTEFACT_FORMAT
        artefact = engine_dir / f"{onnx_path.name.removesuffix('.onnx')}.optimized.{fmt}"
        opts = OrtRunner(onnx_path, image_size, providers).session_options()
        opts.add_session_config_entry("session.save_model_format", fmt.upper())
        if fmt == "onnx" and onnx_path.stat().st_size > EXTERNAL_DATA_ABOVE:
            # Named by its final name (the graph refers to it by name); written before the graph is renamed in.
            extra["artefact_data"] = f"{artefact.name}.data"
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          extra["artefact_data"])
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        with atomic_path(artefact) as tmp:
            opts.optimized_model_filepath = str(tmp)
            ort.InferenceSession(str(onnx_path), opts, providers=providers)
        return BuildResult(artefact.name, device, cc, {**extra, "optimized": True, "format": fmt})

    def load(self, engine_dir: Path, manifest: Manifest, image_size: int) -> Runner:
        profile = BatchProfile(*manifest.batch_profile["images"])
        providers = manifest.extra.get("providers") or ort_providers()
        optimized = bool(manifest.extra.get("optimized"))
        return OrtRunner(engine_dir / manifest.artefact, image_size, providers, max_batch=profile.max,
                         optimize=not optimized, graph_path=engine_dir / manifest.onnx_file,
                         options=provider_options(providers, manifest.precision, engine_dir, profile, image_size))


BACKEND = OrtBackend()
