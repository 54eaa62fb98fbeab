"""PyTorch backend: runs the bundle's IQEModel (fused graph) directly, eager or torch.compile.

No engine is built: the bundle is the artefact. Precision handling lives in one place,
`TorchRunner._prepare`, so a per-bundle precision policy changes only that method.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from iqe.engine.registry import Backend, module_version
from iqe.engine.runners import Runner
from iqe.errors import InputError


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU code generation would call, if it runs.

    Inductor takes $CXX, else g++ from PATH; a compiler that is named but does not start
    counts as missing.
    """
    for candidate in (os.environ.get("CXX"), "g++"):
        path = shutil.which(candidate) if candidate else None
        if path is None:
            continue
        try:
            ok = subprocess.run([path, "--version"], capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return path
    return None


def use_exact_fp32() -> None:
    """fp32 means fp32: no TF32 in CUDA matmuls or cuDNN convolutions (torch's defaults
    differ between versions; TF32 keeps 10 mantissa bits, enough to move scores)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class TorchRunner(Runner):
    """PyTorch on the bundle's IQEModel (fused graph): eager, or torch.compile (CUDA graphs on GPU)."""

    name = "torch"

    def __init__(self, model, device: str | None = None, compile: bool = False, precision: str = "fp32"):
        super().__init__(model.cfg.image_size)
        import torch

        self.model = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.compile = compile
        self.precision = precision

    def _prepare(self):
        """The module that runs, in this runner's precision (the one place precision is decided)."""
        from iqe.model.families import family_of

        if self.precision == "fp32":
            use_exact_fp32()
        graph, self.output_names = family_of(self.model).torch_graph(self.model, self.precision)
        return graph

    def _activate(self) -> None:
        import torch

        self.model = self.model.to(self.device).eval()
        self.graph = self._prepare().to(self.device).eval()
        if self.compile:
            # On CUDA "reduce-overhead" captures CUDA graphs: one launch per batch shape.
            mode = "reduce-overhead" if str(self.device).startswith("cuda") else "default"
            self.graph = torch.compile(self.graph, mode=mode)

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.graph(torch.from_numpy(images).to(self.device))
        return {k: v.float().cpu().numpy() for k, v in zip(self.output_names, out)}


class TorchBackend(Backend):
    name = "torch"
    install = "pip install torch"  # a default dependency; missing only in a broken environment
    needs_engine = False

    def version(self) -> str | None:
        return module_version("torch")

    def device(self) -> tuple[str, str | None]:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return torch.cuda.get_device_name(), f"{major}.{minor}"
        return super().device()

    def check_compile(self) -> None:
        """Refuse --compile where torch.compile cannot work (CPU code generation needs a C++ compiler)."""
        import torch

        if not torch.cuda.is_available() and cxx_compiler() is None:
            raise InputError("--compile on CPU needs a working C++ compiler (torch.compile generates C++): "
                             "install g++ (apt-get install g++) or set CXX, or drop --compile")

    def bundle_runner(self, bundle: Path, precision: str, compile: bool = False) -> Runner:
        from iqe.model.bundle import load_bundle

        return TorchRunner(load_bundle(bundle), precision=precision, compile=compile)


BACKEND = TorchBackend()
