"""What a benchmark ran on: CPU, cores, memory, GPU, library versions, load.

Numbers from a shared machine mean little without the load next to them, so the load
average is recorded too (at the start and end of the run and around every measurement).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

# CPU features that decide which GEMM kernels the libraries can use.
_FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16",
                      "amx_tile", "amx_bf16")


def _cpuinfo() -> dict[str, Any]:
    """CPU model, physical cores and feature flags from /proc/cpuinfo (Linux); {} elsewhere."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    model: str | None = None
    flags: set[str] = set()
    cores: set[tuple[str | None, str | None]] = set()
    physical_id = core_id = None
    for line in path.read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
            cores.add((physical_id, core_id))
    return {
        "cpu_model": model,
        "physical_cores": len(cores) or None,
        "cpu_flags": [f for f in _FLAGS_OF_INTEREST if f in flags],
    }


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gpu() -> dict[str, Any] | None:
    """Name, driver and CUDA version of GPU 0, or None without one."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available():
        return None
    info: dict[str, Any] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                            "cuda": torch.version.cuda, "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout.strip()
            driver, _, memory = out.partition(",")
            info.update(driver=driver.strip(), memory=memory.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def loadavg() -> float | None:
    """1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """A JSON-able record of the machine and software the benchmark ran with."""
    import numpy
    import torch

    try:
        import onnxruntime

        ort_version, ort_providers = onnxruntime.__version__, onnxruntime.get_available_providers()
    except ImportError:
        ort_version, ort_providers = None, []
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        **_cpuinfo(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,  # cores this process may run on (affinity / container limits)
        "memory_gib": _memory_gib(),
        "gpu": _gpu(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort_version,
        "onnxruntime_providers": ort_providers,
        "numpy": numpy.__version__,
        "onnx": _version("onnx"),
        "scipy": _version("scipy"),
        "pydicom": _version("pydicom"),
        "iqe_engine": _version("iqe-engine"),
        "loadavg_start": loadavg(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def sgemm_gflops(seconds: float = 1.5) -> float:
    """Measured float32 GEMM rate of torch here (GFLOP/s), a ceiling for the vision encoder.

    The shape is one ViT-L MLP matmul at batch 8 (2320 x 1024 @ 1024 x 4096).
    """
    import torch

    a, b = torch.randn(2320, 1024), torch.randn(1024, 4096)
    for _ in range(2):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return round(2 * 2320 * 1024 * 4096 * n / (time.perf_counter() - t0) / 1e9, 1)
