"""Engine manifests: what an engine was built from, on what, with what.

An engine directory holds ONNX graphs (from `iqe export`) and, per backend build,
`manifest.<backend>.<precision>.json`. Loading refuses an engine whose manifest does not
match its ONNX file, the device or the backend version, naming the field and the
rebuild command.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from iqe.errors import InputError
from iqe.export.onnx_export import sha256_file


class EngineMismatch(InputError):
    """The engine on disk does not match its sources or this machine."""


@dataclass
class Manifest:
    backend: str  # torch | onnxruntime | tensorrt
    backend_version: str
    precision: str  # fp32 | fp16
    graph: str  # ONNX graph the engine runs (e.g. fused)
    onnx_file: str
    onnx_sha256: str
    config_sha256: str
    device: str  # device name ("cpu" or the GPU's name)
    compute_capability: str | None
    batch_profile: dict[str, list[int]]  # input -> [min, opt, max] batch
    build_seconds: float
    built_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    plan_file: str | None = None  # serialized engine (TensorRT)
    extra: dict = field(default_factory=dict)

    @staticmethod
    def path(engine_dir: Path, backend: str, precision: str) -> Path:
        return Path(engine_dir) / f"manifest.{backend}.{precision}.json"

    def write(self, engine_dir: Path) -> Path:
        path = self.path(engine_dir, self.backend, self.precision)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, engine_dir: Path, backend: str, precision: str) -> "Manifest":
        path = cls.path(engine_dir, backend, precision)
        if not path.is_file():
            raise EngineMismatch(
                f"{engine_dir}: no {backend} {precision} engine ({path.name} missing); "
                f"run `iqe build {engine_dir} --backend {backend} --precision {precision}`")
        return cls(**json.loads(path.read_text()))


def current_device(backend: str) -> tuple[str, str | None]:
    """(device name, compute capability) the backend would run on here."""
    import torch

    if backend in ("tensorrt",) or (backend in ("torch", "onnxruntime") and torch.cuda.is_available()):
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return torch.cuda.get_device_name(), f"{major}.{minor}"
    return f"cpu ({platform.machine()})", None


def check_manifest(m: Manifest, engine_dir: Path, backend_version: str) -> None:
    """Raise EngineMismatch naming the first differing field and the rebuild command."""
    rebuild = f"run `iqe build {engine_dir} --backend {m.backend} --precision {m.precision}`"
    onnx_path = Path(engine_dir) / m.onnx_file
    if not onnx_path.is_file():
        raise EngineMismatch(f"engine refused: {m.onnx_file} is missing from {engine_dir}; run `iqe export` then {rebuild}")
    actual = sha256_file(onnx_path)
    if actual != m.onnx_sha256:
        raise EngineMismatch(f"engine refused: onnx_sha256 of {m.onnx_file} differs from "
                             f"{Manifest.path(engine_dir, m.backend, m.precision).name}; {rebuild}")
    if backend_version != m.backend_version:
        raise EngineMismatch(f"engine refused: built with {m.backend} {m.backend_version}, this machine has "
                             f"{backend_version}; {rebuild}")
    device, cc = current_device(m.backend)
    if m.backend == "tensorrt" and (device != m.device or cc != m.compute_capability):
        raise EngineMismatch(f"engine refused: built for {m.device} (sm {m.compute_capability}), this machine has "
                             f"{device} (sm {cc}); {rebuild}")
