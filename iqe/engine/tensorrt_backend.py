"""TensorRT backend: ONNX -> serialized plan (`build_engine`), weight refit, and the runner (`TrtRunner`).

Networks are built strongly typed: the precision lives in the exported ONNX (an fp16
graph gives an fp16 engine). TensorRT 10.12 deprecated the FP16/INT8 builder flags and
TensorRT 11 removed them, so none are set here; on 11 the STRONGLY_TYPED creation flag
is accepted and ignored, on 10.x it is what turns strong typing on. TF32 is cleared
(TensorRT allows it by default): float32 tensors are computed in float32.

TensorRT (and torch, which provides device memory and streams; no pycuda) are imported
inside the functions that need them, so the registry imports this module cheaply and
every entry point says "TensorRT is not installed" when it is missing.

    info = build_engine(Path("fused.fp16.onnx"), Path("fused.fp16.plan"), {"images": (3, 336, 336)},
                        TrtBuildOptions(max_batch=32, timing_cache=Path("timing.cache")))
    with TrtRunner("fused.fp16.plan") as runner:
        outputs = runner.infer_tensors({"images": batch})   # name -> torch CUDA tensor
        scores = runner.infer(images)                        # Runner interface: NumPy float32
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from iqe.atomic import atomic_open
from iqe.engine.filelock import file_lock
from iqe.engine.registry import Backend, BatchProfile, BuildResult
from iqe.engine.runners import Runner
from iqe.errors import InputError

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

    from iqe.engine.manifest import Manifest

INSTALL = "pip install 'iqe-engine[tensorrt]'"
NOT_INSTALLED = (f"TensorRT is not installed; install it with `{INSTALL}` on a CUDA machine, "
                 "or use --backend onnxruntime or torch here")


def torch_dtypes() -> dict[str, torch.dtype]:
    """TensorRT DataType name -> torch dtype of the buffers we hand it. Keyed by name so
    the table exists without importing TensorRT. INT4/FP4/E8M0 are packed types TensorRT
    only uses inside quantized graphs, never as IO, so they have no entry."""
    import torch

    return {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
        "UINT8": torch.uint8,
        "FP8": torch.float8_e4m3fn,
    }

RefitMode = Literal["none", "weights", "identical"]


def tensorrt_version() -> str | None:
    """Version of the TensorRT Python package, or None when no usable TensorRT is present.

    `tensorrt-stubs` installs `tensorrt/__init__.pyi` alone, which Python imports as an
    empty namespace package; that, like a package whose native library fails to load,
    counts as absent.

    Returns:
        e.g. "10.13.0.35", or None.
    """
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: the wheel is there but libnvinfer is not
        return None
    version = getattr(tensorrt, "__version__", None)
    if not isinstance(version, str) or not callable(getattr(tensorrt, "Builder", None)):
        return None
    return version


def tensorrt_available() -> bool:
    """True when a real TensorRT (not just its type stubs) can be imported."""
    return tensorrt_version() is not None


def _require_tensorrt() -> None:
    if not tensorrt_available():
        raise InputError(NOT_INSTALLED)


def _require_cuda(what: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"{what} needs a CUDA GPU and a CUDA build of torch; torch {torch.__version__} sees none")


@dataclass
class TrtBuildOptions:
    """How `build_engine` builds a plan. Batch bounds form the single optimization profile."""

    min_batch: int = 1  # smallest batch the engine accepts
    opt_batch: int = 8  # batch TensorRT tunes its kernels for
    max_batch: int = 32  # largest batch the engine accepts
    workspace_gib: float = 4.0  # cap on the builder's scratch memory (MemoryPoolType.WORKSPACE)
    timing_cache: Path | None = None  # shared kernel-timing cache file; None times every build from scratch
    builder_optimization_level: int | None = None  # 0..5, higher searches longer; None keeps TensorRT's default (3)
    # "weights": REFIT, new weights of the same shapes can be loaded later (refit_engine);
    # "identical": REFIT_IDENTICAL, refit only with the build-time weights, which keeps
    # weight-dependent optimisations; "none": no refit, fastest engine.
    refit: RefitMode = "none"
    tf32: bool = False  # allow TF32 for float32 tensors (10-bit mantissas); off: fp32 engines compute in fp32

    def validate(self) -> None:
        """Raise InputError naming the first option that cannot be used."""
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise InputError(f"batch profile min={self.min_batch} opt={self.opt_batch} max={self.max_batch}: "
                             "need 1 <= min <= opt <= max")
        if self.workspace_gib <= 0:
            raise InputError(f"workspace_gib={self.workspace_gib}: must be positive")
        if self.builder_optimization_level is not None and not 0 <= self.builder_optimization_level <= 5:
            raise InputError(f"builder_optimization_level={self.builder_optimization_level}: must be 0..5 or None")
        if self.refit not in ("none", "weights", "identical"):
            raise InputError(f"refit={self.refit!r}: choose 'none', 'weights' or 'identical'")


@dataclass
class BuildInfo:
    """What `build_engine` produced, for the engine manifest."""

    tensorrt_version: str
    device_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"
    build_seconds: float
    inputs: dict[str, str] = field(default_factory=dict)  # name -> TensorRT dtype name ("FLOAT", "HALF", ...)
    outputs: dict[str, str] = field(default_factory=dict)
    refit: RefitMode = "none"
    timing_cache: str | None = None  # path of the timing cache used and updated


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Readers see the old plan or cache or the whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def _load_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """Attach the shared timing cache at `path` (or a fresh one) to `config`."""
    with file_lock(path):
        blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    # A cache from another GPU or TensorRT version is refused rather than trusted; the
    # build then starts from an empty cache, and saving replaces the stale file.
    if not config.set_timing_cache(cache, False):
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """Merge this build's timings into the file at `path`, which other builds may have
    updated meanwhile, under the lock; a file from another device is replaced."""
    ours = config.get_timing_cache()
    with file_lock(path):
        merged = ours
        if path.is_file():
            on_disk = config.create_timing_cache(path.read_bytes())
            if on_disk.combine(ours, False):
                merged = on_disk
        _write_atomic(path, memoryview(merged.serialize()))


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple (-1 marks a dimension set at run time)."""
    return tuple(dims[i] for i in range(len(dims)))


def _parser_errors(parser: trt.OnnxParser | trt.OnnxParserRefitter, source: Path) -> str:
    """The parser's errors, one line each naming the node (by index when unnamed)."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = err.node_name() or (f"#{err.node()}" if err.node() >= 0 else "(graph)")
        lines.append(f"  node '{node}' ({err.node_operator() or '?'}): {err.desc()} [{err.code()}]")
    return f"{source}: TensorRT's ONNX parser reported {len(lines)} problem(s):\n" + "\n".join(lines)


def build_engine(onnx_path: Path, plan_path: Path, input_shapes: Mapping[str, tuple[int, ...]],
                 options: TrtBuildOptions | None = None) -> BuildInfo:
    """Build a strongly typed TensorRT plan from an ONNX graph and write it to `plan_path`.

    One optimization profile spans [min_batch, max_batch] on axis 0 of every input.
    The plan is written under a temporary name and renamed; the timing cache, when given,
    is read and merged back under a file lock so parallel builds share it.

    Args:
        onnx_path: ONNX graph; its precision (fp32/fp16) is the engine's precision.
        plan_path: where the serialized engine goes.
        input_shapes: per input name, its shape without the batch axis, e.g.
            {"images": (3, 336, 336)}; must name every network input.
        options: build options; defaults to `TrtBuildOptions()`.

    Returns:
        BuildInfo with the TensorRT version, GPU, build time and IO tensor dtypes.

    Raises:
        InputError: TensorRT or a GPU is missing, the ONNX file is missing or rejected by
            the parser (each failing node named), or `input_shapes` / `options` do not fit
            the network.
        RuntimeError: TensorRT failed to build an engine from a parsed network.
    """
    _require_tensorrt()
    import tensorrt as trt

    options = options or TrtBuildOptions()
    options.validate()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: ONNX file not found; run `iqe export` first")
    _require_cuda("building a TensorRT engine")
    t0 = time.perf_counter()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files relative to the model's folder.
    if not parser.parse_from_file(str(onnx_path)):
        raise InputError(_parser_errors(parser, onnx_path)
                         + "\nrun iqe.export.trt_lint.lint on the graph for unsupported operators and FP16 hazards")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.builder_optimization_level is not None:
        config.builder_optimization_level = options.builder_optimization_level
    if options.refit == "weights":
        config.set_flag(trt.BuilderFlag.REFIT)
    elif options.refit == "identical":
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)

    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    missing, unknown = sorted(set(inputs) - set(input_shapes)), sorted(set(input_shapes) - set(inputs))
    if missing or unknown:
        raise InputError(f"{onnx_path}: input_shapes must name exactly the network inputs {sorted(inputs)}; "
                         f"missing {missing}, unknown {unknown}")
    profile = builder.create_optimization_profile()
    for name, tensor in inputs.items():
        sample = tuple(input_shapes[name])
        declared = _dims(tensor.shape)
        if len(declared) != len(sample) + 1 or any(d >= 0 and d != s for d, s in zip(declared[1:], sample)):
            raise InputError(f"{onnx_path}: input '{name}' is declared {list(declared)} (-1 = dynamic); "
                             f"shape without batch {list(sample)} does not fit it")
        profile.set_shape(name, trt.Dims([options.min_batch, *sample]), trt.Dims([options.opt_batch, *sample]),
                          trt.Dims([options.max_batch, *sample]))
    config.add_optimization_profile(profile)

    if options.timing_cache is not None:
        _load_timing_cache(config, options.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build an engine (see TensorRT's messages above); "
                           f"workspace_gib={options.workspace_gib}, batch {options.min_batch}..{options.max_batch}")
    _write_atomic(plan_path, memoryview(serialized))
    if options.timing_cache is not None:
        _save_timing_cache(config, options.timing_cache)

    import torch

    major, minor = torch.cuda.get_device_capability()
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    return BuildInfo(
        tensorrt_version=trt.__version__, device_name=torch.cuda.get_device_name(),
        compute_capability=f"{major}.{minor}", build_seconds=round(time.perf_counter() - t0, 2),
        inputs={name: t.dtype.name for name, t in inputs.items()}, outputs={t.name: t.dtype.name for t in outputs},
        refit=options.refit, timing_cache=str(options.timing_cache) if options.timing_cache else None,
    )


def _deserialize(plan_path: Path, logger: trt.ILogger) -> tuple[trt.Runtime, trt.ICudaEngine]:
    import tensorrt as trt

    if not plan_path.is_file():
        raise InputError(f"{plan_path}: TensorRT plan not found; run `iqe build --backend tensorrt`")
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise InputError(f"{plan_path}: TensorRT {trt.__version__} could not load this plan (built by another "
                         "TensorRT version or for another GPU?); rebuild it with `iqe build --backend tensorrt`")
    return runtime, engine


def refit_engine(plan_path: Path, onnx_path: Path) -> None:
    """Load the weights of `onnx_path` into the plan at `plan_path` and rewrite the plan.

    The ONNX graph must be the one the plan was built from, or one with identical
    structure and new weights (a retrained bundle); the plan must have been built with
    `TrtBuildOptions(refit="weights")`, or with refit="identical" when the weights are
    the build-time ones. TensorRT 11.3 lists a known issue where REFIT engines may drop a
    GEMM bias even without a refit, which REFIT_IDENTICAL avoids: prefer "identical"
    unless new weights are really needed.

    Args:
        plan_path: serialized engine, rewritten in place (temporary file + rename).
        onnx_path: ONNX graph holding the weights to load.

    Raises:
        InputError: TensorRT or a GPU is missing, the plan is not refittable, or the ONNX
            weights do not match the engine (the parser's or refitter's findings named).
    """
    _require_tensorrt()
    import tensorrt as trt

    plan_path, onnx_path = Path(plan_path), Path(onnx_path)
    _require_cuda("refitting a TensorRT engine")
    logger = trt.Logger(trt.Logger.WARNING)
    _runtime, engine = _deserialize(plan_path, logger)
    if not engine.refittable:
        raise InputError(f"{plan_path}: engine was built without refit; rebuild it with "
                         "TrtBuildOptions(refit='weights') to load new weights")
    refitter = trt.Refitter(engine, logger)
    onnx_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not onnx_refitter.refit_from_file(str(onnx_path)):
        raise InputError(_parser_errors(onnx_refitter, onnx_path))
    if not refitter.refit_cuda_engine():
        missing = refitter.get_missing_weights()
        raise InputError(f"{plan_path}: refit from {onnx_path} failed; weights still missing: {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}")
    _write_atomic(plan_path, memoryview(engine.serialize()))


@dataclass(frozen=True)
class TensorSpec:
    """One IO tensor of an engine, as declared (-1 marks a dimension set at run time)."""

    name: str
    is_input: bool
    dtype: torch.dtype
    shape: tuple[int, ...]


class TrtRunner(Runner):
    """Runs a TensorRT plan on torch CUDA buffers; a context manager (the Runner interface).

    `activate` deserializes the plan and creates an execution context and a dedicated
    CUDA stream (TensorRT synchronizes more when enqueued on the legacy default stream);
    `infer_tensors` validates a feed of named tensors, runs, and waits for the result;
    `infer` (Runner) takes the image batch and returns NumPy float32 outputs;
    `deactivate` releases.

    Args:
        plan_path: serialized engine from `build_engine`.
        image_size: side of the `images` input for `infer` (None: any).
        max_batch: larger `infer` batches are split (the profile's max).
        device: CUDA device index; defaults to torch's current device.
    """

    name = "tensorrt"

    def __init__(self, plan_path: str | Path, image_size: int | None = None, max_batch: int | None = None,
                 device: int | None = None) -> None:
        super().__init__(image_size, max_batch)
        self.plan_path = Path(plan_path)
        self.device_index = device
        self.specs: dict[str, TensorSpec] = {}
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._stream: torch.cuda.Stream | None = None
        self.device = "cuda"

    def _activate(self) -> None:
        """Deserialize the plan and prepare a context and stream.

        Raises:
            InputError: TensorRT or a GPU is missing, or the plan cannot be loaded.
        """
        _require_tensorrt()
        import tensorrt as trt
        import torch

        _require_cuda("running a TensorRT engine")
        dtypes = torch_dtypes()
        index = torch.cuda.current_device() if self.device_index is None else self.device_index
        self._device = torch.device("cuda", index)
        with torch.cuda.device(self._device):
            runtime, engine = _deserialize(self.plan_path, trt.Logger(trt.Logger.WARNING))
            specs = {}
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                dtype = engine.get_tensor_dtype(name)
                if dtype.name not in dtypes:
                    raise InputError(f"{self.plan_path}: IO tensor '{name}' has TensorRT type {dtype.name}, which "
                                     f"has no torch buffer type here (known: {', '.join(dtypes)})")
                specs[name] = TensorSpec(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                                         dtypes[dtype.name], _dims(engine.get_tensor_shape(name)))
            context = engine.create_execution_context()
            if context is None:
                raise InputError(f"{self.plan_path}: TensorRT could not create an execution context (GPU memory "
                                 "exhausted?); free GPU memory or build with a smaller max batch")
            self._stream = torch.cuda.Stream(self._device)
        self._runtime, self._engine, self._context, self.specs = runtime, engine, context, specs

    def _deactivate(self) -> None:
        """Release the context, engine, runtime and stream (in that order: a context must
        not outlive its engine)."""
        self._context = None
        self._engine = None
        self._runtime = None
        self._stream = None

    @property
    def input_names(self) -> list[str]:
        """Input tensor names, in engine order."""
        return [s.name for s in self.specs.values() if s.is_input]

    @property
    def output_names(self) -> list[str]:
        """Output tensor names, in engine order."""
        return [s.name for s in self.specs.values() if not s.is_input]

    def _validate(self, feed: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
        """Check names, dtypes, ranks and fixed dims; return the feed as torch tensors."""
        missing = [n for n in self.input_names if n not in feed]
        unknown = [n for n in feed if n not in self.specs or not self.specs[n].is_input]
        if missing or unknown:
            raise InputError(f"{self.plan_path.name}: feed must hold exactly the inputs {self.input_names}; "
                             f"missing {missing}, unknown {unknown}")
        import torch

        tensors = {}
        for name in self.input_names:
            value = feed[name]
            tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
            spec = self.specs[name]
            if tensor.dtype != spec.dtype:
                raise InputError(f"{self.plan_path.name}: input '{name}' expects {spec.dtype}, got {tensor.dtype}")
            fits = tensor.dim() == len(spec.shape) and all(d < 0 or d == s for d, s in zip(spec.shape, tensor.shape))
            if not fits:
                raise InputError(f"{self.plan_path.name}: input '{name}' expects shape {list(spec.shape)} "
                                 f"(-1 = any), got {list(tensor.shape)}")
            tensors[name] = tensor
        return tensors

    def infer_tensors(self, feed: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
        """Run the engine once.

        Host inputs are staged through pinned memory; CUDA inputs are used in place.
        Outputs are fresh CUDA tensors, complete when this returns.

        Args:
            feed: every input by name, as NumPy arrays or torch tensors (CPU or CUDA) of
                the engine's dtype; batch within the engine's profile.

        Returns:
            Every output by name, as torch tensors on the runner's device.

        Raises:
            InputError: a name, dtype, rank or dimension does not match the engine, or the
                batch is outside the profile the plan was built for.
            RuntimeError: used outside `with`, or TensorRT failed to enqueue.
        """
        if self._context is None or self._engine is None or self._stream is None:
            raise RuntimeError(f"TrtRunner({self.plan_path}) used outside `with` (call activate() first)")
        import torch

        context, engine, stream = self._context, self._engine, self._stream
        tensors = self._validate(feed)
        caller_stream = torch.cuda.current_stream(self._device)
        # Our stream starts after the caller's queued work: its CUDA inputs, and memory the
        # allocator hands out on the caller's stream below, may still be in use there.
        stream.wait_stream(caller_stream)
        device_inputs = {}
        with torch.cuda.stream(stream):
            for name, tensor in tensors.items():
                if tensor.device == self._device:
                    # A view into a larger tensor can start at any element; a fresh copy has
                    # the allocator's alignment, which TensorRT's kernels are selected for.
                    tensor = tensor.contiguous()
                    device_inputs[name] = tensor if tensor.data_ptr() % 256 == 0 else tensor.clone()
                else:
                    host = tensor.contiguous() if tensor.is_cuda else tensor.contiguous().pin_memory()
                    device_inputs[name] = host.to(self._device, non_blocking=True)
        for name, tensor in device_inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                profile = engine.get_tensor_profile_shape(name, 0)
                raise InputError(f"{self.plan_path.name}: input '{name}' shape {list(tensor.shape)} is outside the "
                                 f"engine's profile (min {_dims(profile[0])}, max {_dims(profile[2])}); rebuild with a "
                                 "larger max batch or split the batch")
            context.set_tensor_address(name, tensor.data_ptr())
        # Outputs are allocated on the caller's stream so their memory belongs to the caller
        # once returned; the stream synchronize below makes them complete.
        outputs = {}
        for name in self.output_names:
            shape = _dims(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.plan_path.name}: output '{name}' shape {list(shape)} is unresolved after "
                                   "setting every input shape")
            outputs[name] = torch.empty(shape, dtype=self.specs[name].dtype, device=self._device)
            context.set_tensor_address(name, outputs[name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.plan_path.name}: TensorRT failed to enqueue the engine (see its messages above)")
        stream.synchronize()
        return outputs

    def infer_numpy(self, feed: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
        """`infer_tensors`, with outputs copied to NumPy (bfloat16 and float8 widened to
        float32, which NumPy lacks).

        Args:
            feed: as for `infer_tensors`.

        Returns:
            Every output by name as a NumPy array.

        Raises:
            InputError, RuntimeError: as for `infer_tensors`.
        """
        import torch

        widen = (torch.bfloat16, torch.float8_e4m3fn)
        return {name: (t.float() if t.dtype in widen else t).cpu().numpy()
                for name, t in self.infer_tensors(feed).items()}

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Runner interface: the image batch in, every output as float32 NumPy."""
        return {name: value.astype(np.float32, copy=False)
                for name, value in self.infer_numpy({"images": images}).items()}


class TensorRTBackend(Backend):
    """A strongly typed plan of the fused graph, with one batch profile and a shared timing cache."""

    name = "tensorrt"
    install = INSTALL

    def version(self) -> str | None:
        return tensorrt_version()

    def missing_message(self) -> str:
        return f"--backend tensorrt: {NOT_INSTALLED}"

    def device(self) -> tuple[str, str | None]:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return str(torch.cuda.get_device_name()), f"{major}.{minor}"
        return super().device()

    def build(self, engine_dir: Path, onnx_path: Path, profile: BatchProfile, precision: str,
              image_size: int) -> BuildResult:
        plan = engine_dir / f"{onnx_path.name.removesuffix('.onnx')}.plan"
        opts = TrtBuildOptions(min_batch=profile.min, opt_batch=profile.opt, max_batch=profile.max,
                               timing_cache=engine_dir / "timing.cache")
        info = build_engine(onnx_path, plan, {"images": (3, image_size, image_size)}, opts)
        return BuildResult(plan.name, info.device_name, info.compute_capability,
                           {"inputs": info.inputs, "outputs": info.outputs, "tf32": opts.tf32})

    def load(self, engine_dir: Path, manifest: Manifest, image_size: int) -> Runner:
        return TrtRunner(engine_dir / manifest.artefact, image_size, max_batch=manifest.batch_profile["images"][2])


BACKEND = TensorRTBackend()
