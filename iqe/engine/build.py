"""ONNX -> engine per backend, manifests, and the content-addressed engine cache.

    iqe export BUNDLE --out ENGINE_DIR          (iqe.export)
    iqe build ENGINE_DIR --backend onnxruntime  (here: writes manifest.<backend>.<precision>.json)
    load_runner(ENGINE_DIR, backend, precision) (checks the manifest, returns a Runner)
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from iqe.engine.filelock import file_lock
from iqe.engine.manifest import EngineMismatch, Manifest, check_manifest, current_device
from iqe.engine.runners import BACKENDS, OrtRunner, Runner, TensorRTRunner, TorchRunner
from iqe.errors import InputError
from iqe.export.onnx_export import ExportInfo, export_model, sha256_file

ENGINE_GRAPH = "fused"  # the graph engines run; components are exported for inspection and TensorRT layering


def backend_version(backend: str) -> str:
    if backend == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    if backend == "tensorrt":
        from iqe.engine.tensorrt_backend import tensorrt_version

        version = tensorrt_version()
        if version is None:
            raise InputError("TensorRT is not installed (pip install 'iqe-engine[tensorrt]' on a GPU node); "
                             "use --backend onnxruntime or torch")
        return version
    import torch

    return torch.__version__


def _export_info(engine_dir: Path, precision: str) -> ExportInfo:
    path = engine_dir / f"export.{precision}.json"
    if not path.is_file():
        raise InputError(f"{engine_dir}: no {precision} export ({path.name} missing); "
                         f"run `iqe export BUNDLE --out {engine_dir} --precision {precision}`")
    return ExportInfo.read(path)


def build(engine_dir: str | Path, backend: str, precision: str = "fp32", min_batch: int = 1, opt_batch: int = 8,
          max_batch: int | None = None) -> Manifest:
    """Build an engine for `backend` from the exported fused graph and write its manifest.

    onnxruntime: creates a session with all graph optimisations and saves the optimised
    graph; tensorrt: a strongly typed plan with one batch profile (min/opt/max).
    """
    engine_dir = Path(engine_dir)
    if backend not in ("onnxruntime", "tensorrt"):
        raise InputError(f"--backend {backend}: `iqe build` builds onnxruntime or tensorrt engines "
                         "(the torch backend runs the bundle directly)")
    info = _export_info(engine_dir, precision)
    graph = info.graphs.get(ENGINE_GRAPH)
    if graph is None:
        raise InputError(f"{engine_dir}: export has no '{ENGINE_GRAPH}' graph; re-run `iqe export`")
    max_batch = max_batch or info.max_batch
    onnx_path = engine_dir / graph.file
    version = backend_version(backend)
    device, cc = current_device(backend)
    t0 = time.perf_counter()
    plan_file = None
    extra: dict = {}
    if backend == "onnxruntime":
        optimized = engine_dir / f"{ENGINE_GRAPH}.{precision}.ort.onnx"
        runner = OrtRunner(onnx_path, info.image_size, optimized_path=optimized)
        runner.activate()
        extra["providers"] = runner.session.get_providers()
        runner.deactivate()
    else:
        from iqe.engine.tensorrt_backend import TrtBuildOptions, build_engine

        plan = engine_dir / f"{ENGINE_GRAPH}.{precision}.plan"
        opts = TrtBuildOptions(min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                               timing_cache=engine_dir / "timing.cache")
        build_engine(onnx_path, plan, {"images": (3, info.image_size, info.image_size)}, opts)
        plan_file = plan.name
    manifest = Manifest(
        backend=backend, backend_version=version, precision=precision, graph=ENGINE_GRAPH, onnx_file=graph.file,
        onnx_sha256=sha256_file(onnx_path), config_sha256=info.config_sha256, device=device, compute_capability=cc,
        batch_profile={"images": [min_batch, opt_batch, max_batch]}, build_seconds=round(time.perf_counter() - t0, 2),
        plan_file=plan_file, extra=extra,
    )
    manifest.write(engine_dir)
    return manifest


def load_runner(engine_dir: str | Path, backend: str, precision: str = "fp32") -> Runner:
    """Runner for a built engine after checking its manifest (EngineMismatch on any difference)."""
    engine_dir = Path(engine_dir)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}'; known: {', '.join(BACKENDS)}")
    manifest = Manifest.read(engine_dir, backend, precision)
    check_manifest(manifest, engine_dir, backend_version(backend))
    info = _export_info(engine_dir, precision)
    max_batch = manifest.batch_profile["images"][2]
    if backend == "onnxruntime":
        return OrtRunner(engine_dir / manifest.onnx_file, info.image_size, max_batch=max_batch)
    return TensorRTRunner(engine_dir / str(manifest.plan_file), info.image_size, max_batch=max_batch)


def cache_root() -> Path:
    return Path(os.environ.get("IQE_CACHE", Path.home() / ".cache" / "iqe")) / "engines"


def bundle_key(bundle: Path) -> str:
    """Content key of a bundle: sha256 over config.json and model.safetensors."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        h.update(sha256_file(Path(bundle) / name).encode())
    return h.hexdigest()[:20]


def ensure_engine(bundle: str | Path, backend: str, precision: str, engine_dir: str | Path | None = None,
                  max_batch: int = 32, progress: bool = True) -> Path:
    """Export and build on demand; engines are cached by bundle content under IQE_CACHE.

    Returns the engine directory, with a valid manifest for (backend, precision).
    """
    from iqe.model.bundle import load_bundle

    bundle = Path(bundle)
    engine_dir = Path(engine_dir) if engine_dir else cache_root() / bundle_key(bundle)
    with file_lock(engine_dir):
        try:
            manifest = Manifest.read(engine_dir, backend, precision)
            check_manifest(manifest, engine_dir, backend_version(backend))
            return engine_dir
        except EngineMismatch:
            pass
        if not (engine_dir / f"export.{precision}.json").is_file():
            export_model(load_bundle(bundle), engine_dir, precision, max_batch=max_batch, graphs=(ENGINE_GRAPH,),
                         progress=progress)
        build(engine_dir, backend, precision, max_batch=max_batch)
    return engine_dir


def best_backend() -> str:
    """tensorrt with a GPU, else onnxruntime, else torch."""
    import torch

    if torch.cuda.is_available():
        from iqe.engine.tensorrt_backend import tensorrt_available

        if tensorrt_available():
            return "tensorrt"
    try:
        import onnxruntime  # noqa: F401

        return "onnxruntime"
    except ImportError:
        return "torch"


def make_runner(bundle: str | Path, backend: str, precision: str = "fp32", engine_dir: str | Path | None = None,
                progress: bool = True, compile: bool = False) -> Runner:
    """One entry for callers: a Runner for `bundle` on `backend`, building engines as needed."""
    from iqe.model.bundle import load_bundle

    if backend == "torch":
        return TorchRunner(load_bundle(bundle), precision=precision, compile=compile)
    engine_dir = ensure_engine(bundle, backend, precision, engine_dir, progress=progress)
    return load_runner(engine_dir, backend, precision)
