"""Bundle -> a Triton Inference Server model repository.

    iqe export-triton BUNDLE --out MODEL_REPO [--backend onnxruntime|tensorrt|python]
                      [--precision fp32|fp16] [--instances N] [--max-batch B] [--device gpu|cpu]

Writes three models and the facts that identify them:

    MODEL_REPO/iqe_scorer/      the fused graph: images [3,S,S] -> scores + maps
        config.pbtxt            onnxruntime_onnx | tensorrt_plan | python (ONNX Runtime inside
                                Triton's Python backend, for servers without the ORT backend)
        1/model.onnx | 1/model.plan (+ 1/model.py)
    MODEL_REPO/iqe_preprocess/  Python backend: encoded PNG/JPEG/DICOM bytes -> images, through
                                `iqe.runtime.sources` (the exact path `iqe score` reads files with)
    MODEL_REPO/iqe/             ensemble: file bytes -> iqe_preprocess -> iqe_scorer
    MODEL_REPO/iqe_repository.json  bundle hash, export info and the engine manifest
    MODEL_REPO/README.md        how to serve it

Configs are built as `model_config_pb2.ModelConfig` messages (tritonclient) and written in
protobuf text format, so what is written is what Triton parses. Scores leave the graph as
[B]; with batching Triton needs a non-empty shape, hence `dims: [1]` + `reshape { shape: [] }`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from iqe.errors import InputError

SCORER, PREPROCESS, ENSEMBLE = "iqe_scorer", "iqe_preprocess", "iqe"
FILE_INPUT = "file"  # ensemble / preprocessing input: one encoded file per batch row (TYPE_STRING)
IMAGE_INPUT = "images"
SCORE_OUTPUTS = ("score", "score_query", "score_text", "score_few", "map_max")  # [B] in the graph
MAP_OUTPUTS = ("map", "map_query", "map_text", "map_smooth")  # [B,S,S]
ENSEMBLE_OUTPUTS = SCORE_OUTPUTS + ("map", "map_smooth")
TRITON_BACKENDS = ("onnxruntime", "tensorrt", "python")
QUEUE_DELAY_US = 2000  # how long the scheduler may hold a request to form a larger batch
MANIFEST_FILE = "iqe_repository.json"

_PREPROCESS_PY = '''\
"""Triton Python backend: encoded file bytes -> IQE-CLIP model input (written by `iqe export-triton`)."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from iqe.export.triton import preprocess_file_bytes


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.size = int(params["image_size"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:  # one request may carry several files (its batch rows)
            files = pb_utils.get_input_tensor_by_name(request, "file").as_numpy().reshape(-1)
            try:
                images = np.stack([preprocess_file_bytes(f, self.size, f"row {i}") for i, f in enumerate(files)])
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("images", images)]))
        return responses
'''

_SCORER_PY = '''\
"""Triton Python backend: the fused graph on ONNX Runtime (written by `iqe export-triton --backend python`).

Requests collected by the dynamic batcher run as one ONNX Runtime call.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from iqe.engine.onnxruntime_backend import OrtRunner

OUTPUTS = {outputs!r}
SHAPES = {{k: [1] if k in {scores!r} else [-1, {size}] for k in OUTPUTS}}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        size = int(config["input"][0]["dims"][-1])
        threads = int(config.get("parameters", {{}}).get("intra_op_threads", {{}}).get("string_value", "1"))
        here = os.path.join(args["model_repository"], args["model_version"])
        self.runner = OrtRunner(os.path.join(here, "model.onnx"), size, providers=["CPUExecutionProvider"],
                                threads=threads)
        self.runner.activate()

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        out = self.runner.infer(np.concatenate(batches).astype(np.float32, copy=False))
        responses, start = [], 0
        for batch in batches:
            stop = start + len(batch)
            # scores leave as [b,1], the shape clients see (the Python backend applies no `reshape`)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(k, np.ascontiguousarray(out[k][start:stop].reshape(stop - start, *SHAPES[k])))
                 for k in OUTPUTS]))
            start = stop
        return responses

    def finalize(self):
        self.runner.deactivate()
'''


def preprocess_file_bytes(data: bytes, size: int, label: str = "file") -> np.ndarray:
    """One encoded PNG/JPEG/TIFF or single-frame DICOM file -> float32 [3,S,S], as `iqe score` reads it.

    The bytes are written to a private temporary file and read with `iqe.runtime.sources`
    (discovery by content, DICOM windowing, the PIL resize path), so a file sent to the
    server becomes exactly the input `iqe score FILE` would give the model.

    Raises:
        ValueError: naming `label` and the reason (not an image, multi-frame, undecodable).
    """
    from iqe.runtime.sources import discover, iter_slices

    suffix = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg" if data[:3] == b"\xff\xd8\xff" else \
        ".tif" if data[:4] in (b"II*\x00", b"MM\x00*") else ""  # everything else is tried as DICOM
    with tempfile.TemporaryDirectory(prefix="iqe-pre-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(bytes(data))
        items = [item for source in discover([path]) for item in iter_slices(source, size)]
    if len(items) != 1:
        raise ValueError(f"{label}: {len(items)} frames; send single-frame files (one image per row)")
    if items[0].error or items[0].image is None:
        raise ValueError(f"{label}: {(items[0].error or 'no image').replace(str(path), 'file')}")
    return items[0].image


# -- configs ------------------------------------------------------------------------------------
def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # the `scale` extra
        raise InputError(f"Triton support needs tritonclient: pip install 'iqe-engine[scale]' ({exc})") from None
    return model_config_pb2, text_format


def _parameters(config, values: dict[str, object]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def scorer_config(backend: str, image_size: int, max_batch: int, instances: int, device: str, precision: str,
                  bundle_id: str, threads: int = 1):
    """ModelConfig of the fused-graph model (see the module docstring)."""
    pb, _ = _pb()
    c = pb.ModelConfig(name=SCORER, max_batch_size=max_batch)
    if backend == "onnxruntime":
        c.platform = "onnxruntime_onnx"
    elif backend == "tensorrt":
        c.platform = "tensorrt_plan"
    else:
        c.backend = "python"
    c.input.add(name=IMAGE_INPUT, data_type=pb.TYPE_FP32, dims=[3, image_size, image_size])
    for name in SCORE_OUTPUTS:
        c.output.add(name=name, data_type=pb.TYPE_FP32, dims=[1]).reshape.shape[:] = []
    for name in MAP_OUTPUTS:
        c.output.add(name=name, data_type=pb.TYPE_FP32, dims=[image_size, image_size])
    c.dynamic_batching.preferred_batch_size[:] = sorted({b for b in (max(1, max_batch // 2), max_batch)})
    c.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    kind = pb.ModelInstanceGroup.KIND_GPU if device == "gpu" and backend != "python" else pb.ModelInstanceGroup.KIND_CPU
    c.instance_group.add(count=instances, kind=kind)
    c.version_policy.latest.num_versions = 1
    if backend == "onnxruntime" and precision == "fp16" and device == "gpu":
        # ORT backend's TensorRT execution provider; the FP16 policy of the exported graph holds
        # (strongly typed vision encoder), TensorRT may fuse the rest in FP16 as well.
        trt = c.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16"
        trt.parameters["max_workspace_size_bytes"] = str(4 << 30)
        trt.parameters["trt_engine_cache_enable"] = "1"
    warm = c.model_warmup.add(name="random_batch_1", batch_size=1)
    warm.inputs[IMAGE_INPUT].data_type = pb.TYPE_FP32
    warm.inputs[IMAGE_INPUT].dims[:] = [3, image_size, image_size]
    warm.inputs[IMAGE_INPUT].random_data = True
    _parameters(c, {"iqe_bundle": bundle_id, "iqe_precision": precision,
                    **({"intra_op_threads": threads} if backend == "python" else {})})
    return c


def preprocess_config(image_size: int, max_batch: int, instances: int):
    """ModelConfig of the Python-backend preprocessing model: file bytes [1] -> images [3,S,S]."""
    pb, _ = _pb()
    c = pb.ModelConfig(name=PREPROCESS, backend="python", max_batch_size=max_batch)
    c.input.add(name=FILE_INPUT, data_type=pb.TYPE_STRING, dims=[1])
    c.output.add(name=IMAGE_INPUT, data_type=pb.TYPE_FP32, dims=[3, image_size, image_size])
    c.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    c.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    c.version_policy.latest.num_versions = 1
    _parameters(c, {"image_size": image_size})
    return c


def ensemble_config(image_size: int, max_batch: int):
    """ModelConfig of the ensemble: file bytes -> iqe_preprocess -> iqe_scorer -> scores + maps."""
    pb, _ = _pb()
    c = pb.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=max_batch)
    c.input.add(name=FILE_INPUT, data_type=pb.TYPE_STRING, dims=[1])
    for name in ENSEMBLE_OUTPUTS:
        # the scorer's visible shape ([1] per row): `reshape` only maps a model's own tensors
        c.output.add(name=name, data_type=pb.TYPE_FP32, dims=[1] if name in SCORE_OUTPUTS else [image_size, image_size])
    pre = c.ensemble_scheduling.step.add(model_name=PREPROCESS, model_version=-1)
    pre.input_map[FILE_INPUT] = FILE_INPUT
    pre.output_map[IMAGE_INPUT] = "preprocessed"
    score = c.ensemble_scheduling.step.add(model_name=SCORER, model_version=-1)
    score.input_map[IMAGE_INPUT] = "preprocessed"
    for name in ENSEMBLE_OUTPUTS:
        score.output_map[name] = name
    return c


def config_text(config) -> str:
    """Protobuf text format of a ModelConfig (what config.pbtxt holds)."""
    _, text_format = _pb()
    return text_format.MessageToString(config)


def parse_config(text: str):
    """Strict parse of config.pbtxt text into a ModelConfig (unknown fields raise)."""
    pb, text_format = _pb()
    return text_format.Parse(text, pb.ModelConfig())


# -- the repository ---------------------------------------------------------------------------
def _engine(bundle: Path, backend: str, precision: str, max_batch: int, progress: bool) -> tuple[Path, dict, dict]:
    """(engine dir, manifest, export info) through the engine cache: the one call into iqe.export / iqe.engine.

    ONNX graphs for the ORT and Python scorers come from the ONNX Runtime build (exported and
    verified by `iqe export`); a TensorRT plan from the tensorrt build (GPU nodes only).
    """
    from dataclasses import asdict

    from iqe.engine.build import ensure_engine
    from iqe.engine.manifest import Manifest
    from iqe.export.onnx_export import ExportInfo

    engine_backend = "tensorrt" if backend == "tensorrt" else "onnxruntime"
    engine_dir = ensure_engine(bundle, engine_backend, precision, max_batch=max_batch, progress=progress)
    manifest = Manifest.read(engine_dir, engine_backend, precision)
    info = ExportInfo.read(engine_dir / f"export.{precision}.json")
    return engine_dir, asdict(manifest), asdict(info)


def export_triton(bundle: str | Path, out: str | Path, backend: str = "onnxruntime", precision: str = "fp32",
                  instances: int = 1, max_batch: int = 8, device: str = "gpu", threads: int = 1,
                  progress: bool = True) -> Path:
    """Write a Triton model repository for `bundle` (see the module docstring); returns its path.

    The repository is assembled in a temporary sibling and renamed into place, so a
    half-written repository never sits under `out`. An existing `out` is replaced only if it
    holds a repository written by this command.
    """
    from iqe.atomic import atomic_write_text
    from iqe.engine.build import bundle_key
    from iqe.export.onnx_export import sha256_file

    if backend not in TRITON_BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(TRITON_BACKENDS)}, got '{backend}'")
    bundle, out = Path(bundle), Path(out)
    if not (bundle / "config.json").is_file():
        raise InputError(f"{bundle}: not a bundle (config.json missing)")
    if out.exists() and not (out / MANIFEST_FILE).is_file():
        raise InputError(f"{out}: exists and is not a repository written by `iqe export-triton`; choose another --out")
    engine_dir, manifest, info = _engine(bundle, backend, precision, max_batch, progress)
    size = int(info["image_size"])
    bundle_id = bundle_key(bundle)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        scorer = tmp / SCORER / "1"
        scorer.mkdir(parents=True)
        onnx_file = engine_dir / manifest["onnx_file"]
        if backend == "tensorrt":
            shutil.copyfile(engine_dir / manifest["plan_file"], scorer / "model.plan")
        else:
            shutil.copyfile(onnx_file, scorer / "model.onnx")
        if backend == "python":
            (scorer / "model.py").write_text(_SCORER_PY.format(outputs=SCORE_OUTPUTS + MAP_OUTPUTS, scores=SCORE_OUTPUTS,
                                                                   size=size))
        (tmp / PREPROCESS / "1").mkdir(parents=True)
        (tmp / PREPROCESS / "1" / "model.py").write_text(_PREPROCESS_PY)
        (tmp / ENSEMBLE / "1").mkdir(parents=True)
        configs = {SCORER: scorer_config(backend, size, max_batch, instances, device, precision, bundle_id, threads),
                   PREPROCESS: preprocess_config(size, max_batch, instances),
                   ENSEMBLE: ensemble_config(size, max_batch)}
        for name, config in configs.items():
            (tmp / name / "config.pbtxt").write_text(config_text(config))
        facts = {"bundle": str(bundle.resolve()), "bundle_key": bundle_id,
                 "bundle_files": {n: sha256_file(bundle / n) for n in ("config.json", "model.safetensors")},
                 "scorer_backend": backend, "precision": precision, "image_size": size, "max_batch": max_batch,
                 "models": {"scorer": SCORER, "preprocess": PREPROCESS, "ensemble": ENSEMBLE},
                 "engine_manifest": manifest, "export": info}
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(facts, indent=2) + "\n")
        atomic_write_text(tmp / "README.md", _readme(backend, precision, size, bundle_id, out.name))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _readme(backend: str, precision: str, size: int, bundle_id: str, name: str) -> str:
    scorer = {"onnxruntime": "ONNX Runtime backend (`model.onnx`)", "tensorrt": "TensorRT backend (`model.plan`)",
              "python": "Python backend running ONNX Runtime (`model.py` + `model.onnx`)"}[backend]
    return f"""# IQE-CLIP Triton model repository

Bundle `{bundle_id}` ({precision}), written by `iqe export-triton`. `{MANIFEST_FILE}` holds the
bundle hashes, the export record and the engine manifest.

| model | what |
|---|---|
| `{SCORER}` | {scorer}: `images` FP32 [B,3,{size},{size}] -> `score`, `score_query`, `score_text`, `score_few`, `map_max` [B], maps [B,{size},{size}] |
| `{PREPROCESS}` | Python backend: `file` (encoded PNG/JPEG/TIFF or DICOM bytes, one per row) -> `images` |
| `{ENSEMBLE}` | ensemble: `file` -> `{PREPROCESS}` -> `{SCORER}` |

## Serve

The Python-backend models import `iqe` (its `runtime` and `engine` modules): install
`iqe-engine` into the Python the Triton container runs (or mount the source and set
`PYTHONPATH`):

    docker run --gpus all --rm --shm-size 1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
      -v $PWD/{name}:/models -v /path/to/iqe-engine:/opt/iqe -e PYTHONPATH=/opt/iqe \\
      nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
      sh -c "pip install -q numpy pillow pydicom nibabel monai onnxruntime && tritonserver --model-repository=/models"

Then score from any machine with the same results rows as a local run:

    iqe score --server grpc://HOST:8001 INPUT... --out DIR

or send files to the ensemble `{ENSEMBLE}` with any Triton client (input `file`, TYPE_STRING/BYTES).
"""


# -- CLI ------------------------------------------------------------------------------------------
def cmd_export_triton(args: argparse.Namespace) -> int:
    """Write a Triton model repository (scorer, Python preprocessing, ensemble) for a bundle."""
    out = export_triton(args.bundle, args.out, args.backend, args.precision, args.instances, args.max_batch,
                        args.device, args.threads, progress=not args.quiet)
    print(f"wrote Triton model repository {out} (models {SCORER}, {PREPROCESS}, {ENSEMBLE}); see {out}/README.md")
    return 0


def register(add) -> None:
    """Add `iqe export-triton` to the CLI."""
    from iqe.argtypes import int_at_least

    p = add("export-triton", cmd_export_triton)
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--out", type=Path, required=True, help="model repository directory to write")
    p.add_argument("--backend", choices=TRITON_BACKENDS, default="onnxruntime",
                   help="scorer backend; python = ONNX Runtime inside Triton's Python backend")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--instances", type=int_at_least(1), default=1, help="model instances per device")
    p.add_argument("--max-batch", type=int_at_least(1), default=8, help="max_batch_size of the models")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="instance kind of the scorer")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="python backend: ONNX Runtime threads per instance")
