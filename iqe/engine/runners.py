"""Backends behind one runner interface: torch, onnxruntime, tensorrt.

A runner is a context manager. `infer(images)` takes a float32 batch [B,3,S,S] in [0,1]
(preprocessed as REFERENCE §1) and returns float32 NumPy arrays keyed by the model
family's output names (`iqe.export.graphs.HEAD_OUTPUTS` for IQE-CLIP). Inputs are validated
once in the base class; backends implement `_activate`, `_infer`, `_deactivate`. Optional
backends import lazily.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from iqe.errors import InputError

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class Runner(ABC):
    """Base runner: state checks and input validation, then the backend's hooks."""

    name = "base"

    def __init__(self, image_size: int, max_batch: int | None = None):
        self.image_size = image_size
        self.max_batch = max_batch
        self.active = False
        self.device = "cpu"

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
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
        if not self.active:
            raise RuntimeError(f"{self.name} runner used outside `with` (call activate() first)")
        s = self.image_size
        if images.dtype != np.float32 or images.ndim != 4 or images.shape[1:] != (3, s, s):
            raise InputError(f"{self.name} runner: expected float32 images [B,3,{s},{s}], got {images.dtype} {list(images.shape)}")
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

    def _activate(self) -> None:
        import torch

        from iqe.model.families import family_of

        self.model = self.model.to(self.device).eval()
        graph, self.output_names = family_of(self.model).torch_graph(self.model, self.precision)
        self.graph = graph.to(self.device).eval()
        if self.compile:
            # On CUDA "reduce-overhead" captures CUDA graphs: one launch per batch shape.
            mode = "reduce-overhead" if str(self.device).startswith("cuda") else "default"
            self.graph = torch.compile(self.graph, mode=mode)

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.graph(torch.from_numpy(images).to(self.device))
        return {k: v.float().cpu().numpy() for k, v in zip(self.output_names, out)}


def ort_providers() -> list[str]:
    """Best available ONNX Runtime execution providers, in preference order."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


class OrtRunner(Runner):
    """ONNX Runtime on an exported graph (the fused one by default).

    CPU: all graph optimisations, intra-op threads = available cores. CUDA: IO binding
    so outputs stay on the device until the final copy.
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, image_size: int, providers: list[str] | None = None,
                 threads: int | None = None, optimized_path: str | Path | None = None, max_batch: int | None = None):
        super().__init__(image_size, max_batch)
        self.onnx_path = Path(onnx_path)
        self.providers = providers
        self.threads = threads
        self.optimized_path = optimized_path

    def _activate(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads or len(os.sched_getaffinity(0))
        opts.log_severity_level = 3  # errors only: the optimised-graph note is expected (engines are per machine)
        if self.optimized_path:
            opts.optimized_model_filepath = str(self.optimized_path)
        providers = self.providers or ort_providers()
        self.session = ort.InferenceSession(str(self.onnx_path), opts, providers=providers)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
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


class TensorRTRunner(Runner):
    """TensorRT plan of the fused graph (see iqe.engine.tensorrt_backend). Not executable here."""

    name = "tensorrt"

    def __init__(self, plan_path: str | Path, image_size: int, max_batch: int | None = None):
        super().__init__(image_size, max_batch)
        self.plan_path = Path(plan_path)

    def _activate(self) -> None:
        from iqe.engine.tensorrt_backend import TrtRunner

        self.trt = TrtRunner(self.plan_path)
        self.trt.__enter__()
        self.device = "cuda"

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.trt.infer({"images": images})
        return {k: v.float().cpu().numpy() for k, v in out.items()}  # the plan's outputs (any model family)

    def _deactivate(self) -> None:
        self.trt.__exit__(None, None, None)
