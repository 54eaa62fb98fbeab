"""ONNX -> engine per backend, manifests, and the content-addressed engine cache.

    iqe export BUNDLE --out ENGINE_DIR          (iqe.export; the CLI records bundle.json)
    iqe build ENGINE_DIR --backend onnxruntime  (here: writes manifest.<backend>.<precision>.json)
    load_runner(ENGINE_DIR, backend, precision) (checks the manifest, returns a Runner)
    make_runner(BUNDLE, backend, precision)     (one entry for callers: exports/builds as needed)

Nothing here branches on the backend: each one lives in its own module behind
`iqe.engine.registry`. Nothing here imports torch either (ONNX Runtime runs start
faster without it); exporting, which needs it, is imported only when it happens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from iqe.engine.filelock import file_lock
from iqe.engine.manifest import (
    BundleMismatch,
    BundleRef,
    EngineMissing,
    Manifest,
    StaleEngine,
    check_bundle,
    check_manifest,
    iqe_version,
)
from iqe.engine.registry import BatchProfile, best_backend, get_backend, require_backend  # noqa: F401  (best_backend: public here)
from iqe.engine.runners import Runner
from iqe.errors import InputError
from iqe.model.bundle import bundle_sha256, cached_sha256

ENGINE_GRAPH = "fused"  # the graph engines run; components are exported for inspection and TensorRT layering


@dataclass(frozen=True)
class ExportSummary:
    """What engines need from `export.<precision>.json` (read without importing the exporter, i.e. torch)."""

    precision: str
    config_sha256: str
    image_size: int
    max_batch: int
    graph_file: str

    @classmethod
    def read(cls, engine_dir: Path, precision: str) -> ExportSummary:
        path = Path(engine_dir) / f"export.{precision}.json"
        redo = f"run `iqe export BUNDLE --out {engine_dir} --precision {precision}`"
        if not path.is_file():
            raise EngineMissing(f"{engine_dir}: no {precision} export ({path.name} missing); {redo}")
        try:
            data = json.loads(path.read_text())
            graph = data["graphs"].get(ENGINE_GRAPH)
            if graph is None:
                raise StaleEngine(f"{engine_dir}: export has no '{ENGINE_GRAPH}' graph; {redo}")
            return cls(precision, str(data["config_sha256"]), int(data["image_size"]), int(data["max_batch"]),
                       str(graph["file"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StaleEngine(f"{path} is unreadable ({type(exc).__name__}: {exc}); {redo}") from None


def build(engine_dir: str | Path, backend: str, precision: str = "fp32", min_batch: int = 1,
          opt_batch: int | None = None, max_batch: int | None = None) -> Manifest:
    """Build an engine for `backend` from the exported fused graph and write its manifest.

    The manifest binds the engine to its bundle (from `bundle.json`, when the export
    recorded one), the graph's and artefact's hashes, the iqe and backend versions and
    the device. See the backend modules for what each writes.
    """
    engine_dir = Path(engine_dir)
    impl = require_backend(backend)
    if not impl.needs_engine:
        raise InputError(f"--backend {backend} runs the bundle directly; `iqe build` builds onnxruntime or "
                         "tensorrt engines")
    info = ExportSummary.read(engine_dir, precision)
    ref = BundleRef.read(engine_dir)
    if ref is not None and ref.config_sha256 != info.config_sha256:
        raise InputError(f"{engine_dir}: {BundleRef.path(engine_dir).name} names bundle {ref.bundle} but "
                         f"export.{precision}.json was exported from another model config; re-run `iqe export`")
    max_batch = max_batch or info.max_batch
    opt = opt_batch or min(max(min_batch, 8), max_batch)
    profile = BatchProfile(min_batch, opt, max_batch).validate()
    onnx_path = engine_dir / info.graph_file
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: exported graph missing; re-run `iqe export`")
    version = impl.require()
    t0 = time.perf_counter()
    result = impl.build(engine_dir, onnx_path, profile, precision, info.image_size)
    manifest = Manifest(
        backend=backend, backend_version=version, precision=precision, graph=ENGINE_GRAPH, onnx_file=info.graph_file,
        onnx_sha256=cached_sha256(onnx_path), bundle_sha256=ref.bundle_sha256 if ref else None,
        config_sha256=info.config_sha256, device=result.device, compute_capability=result.compute_capability,
        batch_profile={"images": [profile.min, profile.opt, profile.max]},
        build_seconds=round(time.perf_counter() - t0, 2), artefact=result.artefact,
        artefact_sha256=cached_sha256(engine_dir / result.artefact), iqe_version=iqe_version(), extra=result.extra,
    )
    manifest.write(engine_dir)
    return manifest


def load_runner(engine_dir: str | Path, backend: str, precision: str = "fp32", bundle: str | Path | None = None) -> Runner:
    """Runner for a built engine after checking its manifest.

    Args:
        bundle: when given, the engine must have been built from this bundle.
    Raises:
        BundleMismatch: built from another bundle. StaleEngine / EngineMissing: rebuild.
    """
    engine_dir = Path(engine_dir)
    impl = require_backend(backend)
    manifest = Manifest.read(engine_dir, backend, precision)
    check_manifest(manifest, engine_dir, impl, impl.require(), BundleRef.of_bundle(Path(bundle)) if bundle else None)
    info = ExportSummary.read(engine_dir, precision)
    return impl.load(engine_dir, manifest, info.image_size)


def cache_root() -> Path:
    return Path(os.environ.get("IQE_CACHE", Path.home() / ".cache" / "iqe")) / "engines"


def bundle_key(bundle: Path) -> str:
    """Cache folder name of a bundle: the start of its content hash."""
    return bundle_sha256(bundle)[:20]


def _note(message: str) -> None:
    """One line on stderr (the rebuild command in a refusal is what happens next, so it is dropped)."""
    message = message.removeprefix("engine refused: ").split("; run `")[0]
    print(f"iqe: {message}", file=sys.stderr, flush=True)


def ensure_engine(bundle: str | Path, backend: str, precision: str, engine_dir: str | Path | None = None,
                  max_batch: int = 32, progress: bool = True) -> Path:
    """Export and build on demand; engines are cached by bundle content under IQE_CACHE.

    A given `engine_dir` that holds another bundle's export or engine is refused
    (BundleMismatch); a stale engine (other iqe/backend version, schema, device, changed
    files) is rebuilt with a one-line message. Returns the engine directory, with a
    valid manifest for (backend, precision).
    """
    bundle = Path(bundle)
    impl = require_backend(backend)
    version = impl.require()
    ref = BundleRef.of_bundle(bundle)
    cached = engine_dir is None
    engine_dir = cache_root() / ref.bundle_sha256[:20] if cached else Path(engine_dir)
    if engine_dir.exists() and not engine_dir.is_dir():
        raise InputError(f"--engine {engine_dir}: exists and is not a directory")
    with file_lock(engine_dir):
        recorded = BundleRef.read(engine_dir)
        has_export = engine_dir.is_dir() and any(engine_dir.glob("export.*.json"))
        if recorded is not None or (has_export and not cached):
            # A cache folder is named by the bundle's hash: one without bundle.json (older iqe) is this bundle's.
            check_bundle(engine_dir, recorded.bundle_sha256 if recorded else None, ref, backend, precision)
        try:
            manifest = Manifest.read(engine_dir, backend, precision)
            check_manifest(manifest, engine_dir, impl, version, ref)
            return engine_dir
        except BundleMismatch:
            # bundle.json says the export is this bundle's: the engine predates a re-export.
            _note(f"rebuilding the {backend} {precision} engine in {engine_dir}: it was built before the last export")
        except StaleEngine as exc:
            _note(f"rebuilding the {backend} {precision} engine in {engine_dir}: {str(exc).removeprefix('engine refused: ')}")
        except EngineMissing:
            pass
        engine_dir.mkdir(parents=True, exist_ok=True)
        try:
            ExportSummary.read(engine_dir, precision)
            onnx_ok = True
        except StaleEngine as exc:
            _note(f"re-exporting the {precision} graphs in {engine_dir}: {exc}")
            onnx_ok = False
        except EngineMissing:
            onnx_ok = False
        if not onnx_ok:
            from iqe.export.onnx_export import export_model
            from iqe.model.bundle import load_bundle

            export_model(load_bundle(bundle), engine_dir, precision, max_batch=max_batch, graphs=(ENGINE_GRAPH,),
                         progress=progress)
        ref.write(engine_dir)
        build(engine_dir, backend, precision)  # the batch profile spans the export's max batch
    return engine_dir


def check_compile(backend: str) -> None:
    """Refuse torch.compile where it does not apply (other backends) or cannot work (CPU without a C++ compiler)."""
    get_backend(backend).check_compile()


def make_runner(bundle: str | Path, backend: str, precision: str = "fp32", engine_dir: str | Path | None = None,
                progress: bool = True, compile: bool = False) -> Runner:
    """One entry for callers: a Runner for `bundle` on `backend`, building engines as needed."""
    impl = require_backend(backend)
    if compile:
        check_compile(backend)
    if not impl.needs_engine:
        return impl.bundle_runner(Path(bundle), precision, compile=compile)
    engine_dir = ensure_engine(bundle, backend, precision, engine_dir, progress=progress)
    manifest = Manifest.read(engine_dir, backend, precision)  # checked by ensure_engine just now
    return impl.load(engine_dir, manifest, ExportSummary.read(engine_dir, precision).image_size)
