"""The runner interface every backend implements (torch, onnxruntime, tensorrt).

A runner is a context manager. `infer(images)` takes a float32 batch [B,3,S,S] in [0,1]
(preprocessed as REFERENCE §1) and returns float32 NumPy arrays keyed by
`iqe.export.graphs.HEAD_OUTPUTS`. Inputs are validated once here; each backend module
(`iqe.engine.<backend>_backend`) implements `_activate`, `_infer`, `_deactivate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from iqe.errors import InputError


class Runner(ABC):
    """Base runner: state checks and input validation, then the backend's hooks."""

    name = "base"

    def __init__(self, image_size: int | None, max_batch: int | None = None):
        self.image_size = image_size
        self.max_batch = max_batch
        self.active = False
        self.device = "cpu"

    def preferred_batch(self) -> int:
        """Images per inference call when the caller does not choose (the active device's)."""
        # Measured on the 2-core CPU node (benchmarks/results/cpu-vit-l-main): per-image
        # throughput is flat or falls with the batch on CPU (ONNX Runtime 0.670 images/s at
        # batch 1 vs 0.554 at 8; torch 0.470 vs 0.479), and batch 1 returns each result
        # soonest with the smallest activations. GPUs need batches to fill the device: 8 is
        # the TensorRT profile's opt batch (not measured here: no GPU on the build node).
        return 1 if self.device == "cpu" else 8

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self.active:
            raise RuntimeError(f"{self.name} runner is already active")
        self._activate()
        self.active = True

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch; batches above `max_batch` are split and the outputs joined."""
        if not self.active:
            raise RuntimeError(f"{self.name} runner used outside `with` (call activate() first)")
        s = self.image_size
        fits = images.ndim == 4 and images.shape[1] == 3 and (s is None or images.shape[2:] == (s, s))
        if images.dtype != np.float32 or not fits:
            raise InputError(f"{self.name} runner: expected float32 images [B,3,{s or 'S'},{s or 'S'}], "
                             f"got {images.dtype} {list(images.shape)}")
        if self.max_batch and images.shape[0] > self.max_batch:
            return _concat([self._infer(images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)])
        return self._infer(np.ascontiguousarray(images))

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]: ...

    def _deactivate(self) -> None:
        pass


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
