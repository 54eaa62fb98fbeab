"""Engine manifests: what an engine was built from, on what, with what.

An engine directory holds ONNX graphs (from `iqe export`), `bundle.json` (the bundle
they were exported from: content hash and config digest) and, per backend build,
`manifest.<backend>.<precision>.json`. Loading checks, in this order:

- the bundle: an engine built from another bundle is refused (`BundleMismatch`), naming
  both hashes and the commands that build one for this bundle; never silently rebuilt
  over, since the directory may be someone's deliberate engine;
- staleness (`StaleEngine`): another manifest schema or iqe version, another backend
  version or device, a changed or missing graph or artefact, an unreadable manifest.
  `iqe score` rebuilds those with a one-line message; `load_runner` refuses them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iqe.atomic import atomic_write_text
from iqe.errors import InputError
from iqe.model.bundle import cached_sha256, listing, occupied_by

if TYPE_CHECKING:
    from iqe.engine.registry import Backend

MANIFEST_SCHEMA = 2  # bump when Manifest's fields change meaning; older manifests are rebuilt
BUNDLE_REF = "bundle.json"


def iqe_version() -> str:
    import iqe

    return str(iqe.__version__)


class EngineMismatch(InputError):
    """The engine on disk cannot be used for this request."""


class EngineMissing(EngineMismatch):
    """No engine for this backend and precision has been built yet."""


class StaleEngine(EngineMismatch):
    """The engine was built by another iqe / backend version, schema or device, or its files changed."""


class BundleMismatch(EngineMismatch):
    """The engine was built from another bundle."""


def short(digest: str | None) -> str:
    return digest[:16] if digest else "(not recorded)"


@dataclass
class BundleRef:
    """Which bundle an engine directory's graphs were exported from."""

    bundle_sha256: str  # iqe.model.bundle.bundle_sha256: config.json + model.safetensors bytes
    config_sha256: str  # the family config's digest(): the architecture/preprocessing the graphs encode
    bundle: str = ""  # where it was read from (for messages only)

    @staticmethod
    def path(engine_dir: Path) -> Path:
        return Path(engine_dir) / BUNDLE_REF

    @classmethod
    def of_bundle(cls, bundle: Path) -> BundleRef:
        from iqe.model.bundle import bundle_identity

        sha, config = bundle_identity(bundle)
        return cls(sha, config, str(bundle))

    def write(self, engine_dir: Path) -> Path:
        return atomic_write_text(self.path(engine_dir), json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, engine_dir: Path) -> BundleRef | None:
        """The recorded bundle, or None when the directory records none (or not readably)."""
        try:
            data = json.loads(cls.path(engine_dir).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


@dataclass
class Manifest:
    backend: str  # torch | onnxruntime | tensorrt
    backend_version: str
    precision: str  # fp32 | fp16
    graph: str  # ONNX graph the engine was built from (e.g. fused)
    onnx_file: str
    onnx_sha256: str
    bundle_sha256: str | None  # bundle the graph was exported from (None: exported without one)
    config_sha256: str
    device: str  # device the artefact is for ("cpu (…)" or the GPU's name)
    compute_capability: str | None
    batch_profile: dict[str, list[int]]  # input -> [min, opt, max] batch
    build_seconds: float
    artefact: str  # file the runner loads (optimised ONNX / ORT graph, TensorRT plan)
    artefact_sha256: str
    iqe_version: str
    schema: int = MANIFEST_SCHEMA
    built_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def path(engine_dir: Path, backend: str, precision: str) -> Path:
        return Path(engine_dir) / f"manifest.{backend}.{precision}.json"

    def write(self, engine_dir: Path) -> Path:
        return atomic_write_text(self.path(engine_dir, self.backend, self.precision),
                                 json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, engine_dir: Path, backend: str, precision: str) -> Manifest:
        """The manifest; EngineMissing when absent, StaleEngine when unreadable or of another schema."""
        path = cls.path(engine_dir, backend, precision)
        rebuild = rebuild_command(engine_dir, backend, precision)
        if not path.is_file():
            raise EngineMissing(f"{engine_dir}: no {backend} {precision} engine ({path.name} missing); run `{rebuild}`")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StaleEngine(f"{path.name} is unreadable ({type(exc).__name__}); run `{rebuild}`") from None
        if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
            found = data.get("schema", "none") if isinstance(data, dict) else "none"
            raise StaleEngine(f"{path.name} has manifest schema {found}, this iqe writes {MANIFEST_SCHEMA}; "
                              f"run `{rebuild}`")
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise StaleEngine(f"{path.name} does not have the fields of manifest schema {MANIFEST_SCHEMA}; "
                              f"run `{rebuild}`")
        return cls(**data)


def rebuild_command(engine_dir: Path, backend: str, precision: str) -> str:
    return f"iqe build {engine_dir} --backend {backend} --precision {precision}"


def check_bundle(engine_dir: Path, recorded: str | None, bundle: BundleRef, backend: str, precision: str) -> None:
    """BundleMismatch unless `recorded` (a bundle hash) is `bundle`'s."""
    if recorded == bundle.bundle_sha256:
        return
    origin = (f"was built from bundle {short(recorded)}" if recorded else
              "does not record the bundle it was built from")
    raise BundleMismatch(
        f"engine refused: {engine_dir} {origin}, not from {bundle.bundle or 'this bundle'} "
        f"(bundle {short(bundle.bundle_sha256)}); build one for this bundle: "
        f"`iqe export {bundle.bundle or 'BUNDLE'} --out NEW_DIR --precision {precision} && "
        f"{rebuild_command(Path('NEW_DIR'), backend, precision)}`, or leave out --engine to use the cache")


def check_manifest(m: Manifest, engine_dir: Path, backend: Backend, backend_version: str,
                   bundle: BundleRef | None = None) -> None:
    """Raise BundleMismatch (other bundle) or StaleEngine (naming the reason and the rebuild command)."""
    engine_dir = Path(engine_dir)
    if bundle is not None:
        check_bundle(engine_dir, m.bundle_sha256, bundle, m.backend, m.precision)
    rebuild = rebuild_command(engine_dir, m.backend, m.precision)

    def stale(reason: str) -> StaleEngine:
        return StaleEngine(f"engine refused: {reason}; run `{rebuild}`")

    if m.iqe_version != iqe_version():
        raise stale(f"built by iqe {m.iqe_version}, this is iqe {iqe_version()}")
    if backend_version != m.backend_version:
        raise stale(f"built with {m.backend} {m.backend_version}, this machine has {backend_version}")
    onnx_path = engine_dir / m.onnx_file
    if not onnx_path.is_file():
        raise stale(f"{m.onnx_file} is missing from {engine_dir} (run `iqe export` first)")
    if cached_sha256(onnx_path) != m.onnx_sha256:
        raise stale(f"onnx_sha256 of {m.onnx_file} differs from {Manifest.path(engine_dir, m.backend, m.precision).name}")
    artefact = engine_dir / m.artefact
    if not artefact.is_file() or cached_sha256(artefact) != m.artefact_sha256:
        raise stale(f"{m.artefact} is missing or changed since the build")
    reason = backend.check_manifest(m, engine_dir)
    if reason:
        raise stale(reason)


def check_export_target(out: Path, ref: BundleRef, force: bool) -> None:
    """`iqe export --out` may be new, empty, or an engine folder of the same bundle (of another only with --force).

    Raises:
        InputError: a file, a folder holding anything else, or another bundle's engines without `force`.
    """
    out = Path(out)
    entries = occupied_by(out)
    if not entries:
        return
    recorded = BundleRef.read(out)
    if recorded is None and not any(n.startswith("export.") and n.endswith(".json") for n in entries):
        raise InputError(f"--out {out}: exists and is not an engine folder (holds {listing(entries)}); nothing was "
                         "written, choose a new or empty folder")
    if recorded is not None and recorded.bundle_sha256 != ref.bundle_sha256 and not force:
        raise InputError(f"--out {out}: holds engines of bundle {short(recorded.bundle_sha256)} ({recorded.bundle}); "
                         f"pass --force to re-export it for bundle {short(ref.bundle_sha256)} ({ref.bundle})")
