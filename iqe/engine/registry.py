"""Backends by name: availability, version, device, build and load, one module each.

Modelled on Polygraphy's backend layout (a loader and a runner per backend): every
backend module (`iqe.engine.<name>_backend`) defines one `Backend` subclass instance,
`BACKEND`, and the registry imports that module only when the backend is asked for, so
choosing ONNX Runtime never imports TensorRT, and checking for TensorRT never imports
ONNX Runtime. Callers never branch on the backend's name:

    backend = require_backend("onnxruntime")   # InputError with the install command if missing
    result = backend.build(engine_dir, graph, profile, precision)   # engines: writes artefact
    runner = backend.load(engine_dir, manifest, image_size)         # -> Runner
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iqe.errors import InputError

if TYPE_CHECKING:
    from iqe.engine.manifest import Manifest
    from iqe.engine.runners import Runner

# name -> module holding its `BACKEND`; the order is the CLI's order of choices.
_MODULES = {
    "torch": "iqe.engine.torch_backend",
    "onnxruntime": "iqe.engine.onnxruntime_backend",
    "tensorrt": "iqe.engine.tensorrt_backend",
}
BACKENDS: tuple[str, ...] = tuple(_MODULES)


class BackendMissing(InputError):
    """The backend's library is not installed here (the message holds the install command)."""


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes an engine accepts (min..max) and is tuned for (opt)."""

    min: int
    opt: int
    max: int

    def validate(self) -> "BatchProfile":
        if not 1 <= self.min <= self.opt <= self.max:
            raise InputError(f"batch profile min={self.min} opt={self.opt} max={self.max}: "
                             "need 1 <= min <= opt <= max")
        return self


@dataclass
class BuildResult:
    """What a backend's build wrote, for the manifest."""

    artefact: str  # file (in the engine directory) that `load` opens
    device: str  # device the artefact is for ("cpu (x86_64)", a GPU name)
    compute_capability: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific facts (providers, options)


class Backend(ABC):
    """One inference backend. Subclasses import their library inside methods only."""

    name: str = ""
    install: str = ""  # exact command that makes the backend available
    needs_engine: bool = True  # False: runs the bundle directly (torch)

    @abstractmethod
    def version(self) -> str | None:
        """Library version, or None when the library cannot be used here."""

    def is_available(self) -> bool:
        return self.version() is not None

    def missing_message(self) -> str:
        return f"--backend {self.name}: {self.name} is not installed; install it with `{self.install}`"

    def require(self) -> str:
        """The version; BackendMissing (naming the install command) when unavailable."""
        version = self.version()
        if version is None:
            raise BackendMissing(self.missing_message())
        return version

    def device(self) -> tuple[str, str | None]:
        """(device name, compute capability) this backend would run on here."""
        import platform

        return f"cpu ({platform.machine()})", None

    def check_manifest(self, manifest: Manifest, engine_dir: Path) -> str | None:
        """Backend-specific staleness (device, providers): a reason, or None when usable."""
        device, cc = self.device()
        if (device, cc) != (manifest.device, manifest.compute_capability):
            return f"built for {manifest.device} (sm {manifest.compute_capability}), this machine has {device} (sm {cc})"
        return None

    def check_compile(self) -> None:
        """Refuse --compile where torch.compile does not apply or cannot work."""
        raise InputError(f"--compile applies to --backend torch only (torch.compile); --backend {self.name} "
                         "engines are compiled by their build")

    def build(self, engine_dir: Path, onnx_path: Path, profile: BatchProfile, precision: str,
              image_size: int) -> BuildResult:
        """Write the backend's artefact for `onnx_path` into `engine_dir` (needs_engine backends)."""
        raise NotImplementedError(f"{self.name} builds no engines")

    def load(self, engine_dir: Path, manifest: Manifest, image_size: int) -> Runner:
        """Runner for the artefact `manifest` describes (the manifest is already checked)."""
        raise NotImplementedError(f"{self.name} loads no engines")

    def bundle_runner(self, bundle: Path, precision: str, compile: bool = False) -> Runner:
        """Runner straight from a bundle (backends with needs_engine=False)."""
        raise NotImplementedError(f"{self.name} needs an engine built from the bundle")


def module_version(module: str) -> str | None:
    """`module.__version__`, or None when the module cannot be imported."""
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return None
    return str(imported.__version__)


def get_backend(name: str) -> Backend:
    """The registered backend `name` (its module imported now); InputError listing the known ones."""
    module = _MODULES.get(name)
    if module is None:
        raise InputError(f"unknown backend '{name}'; known: {', '.join(BACKENDS)}")
    backend: Backend = importlib.import_module(module).BACKEND
    return backend


def require_backend(name: str) -> Backend:
    """`get_backend`, refusing with the install command when the library is missing."""
    backend = get_backend(name)
    backend.require()
    return backend


def best_backend() -> str:
    """tensorrt on a GPU node that has it, else onnxruntime, else torch."""
    trt = get_backend("tensorrt")
    if trt.is_available() and trt.device()[1] is not None:
        return "tensorrt"
    return "onnxruntime" if get_backend("onnxruntime").is_available() else "torch"
