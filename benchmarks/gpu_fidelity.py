"""GPU numerics and speed in one prepared run (issue 7 item 5). NOT EXECUTED: no GPU was lent.

    python benchmarks/gpu_fidelity.py --model BUNDLE --out benchmarks/results/gpu-fidelity.json

What it measures (targets from the benchmark issue in brackets):
1. the fidelity gate on the GPU, on 64 synthetic images, against the torch fp32 model with
   TF32 off: torch fp16 (the bundle's measured policy, real casts), ONNX Runtime CUDA fp32
   (use_tf32=0) and fp16 (the policy's graph);
2. model-only throughput of the torch fp16 policy at the best batch [>= 2,000 images/s ViT-L];
3. batch-1 p50 latency [<= 3 ms];
4. ratio to the reference loop at batch 32 [>= 20x];
5. a 200-slice DICOM series end to end [<= 200 ms].
Written against the public APIs used elsewhere in this repository; it has not run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed(fn, images: np.ndarray, repeats: int = 20) -> list[float]:
    import torch

    fn(images)
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(images)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    import torch

    from iqe.bench.data import write_dicom_series
    from iqe.bench.e2e import run_pipeline
    from iqe.bench.reference_loop import ReferenceLoopRunner
    from iqe.engine.runners import OrtRunner, TorchRunner
    from iqe.export.fidelity import compare
    from iqe.export.onnx_export import export_model, torch_outputs
    from iqe.export.precision import calibration_images, policy_for_model
    from iqe.model.bundle import load_bundle

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this script needs a GPU"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must be fp32
    torch.backends.cudnn.allow_tf32 = False
    model = load_bundle(args.model).eval()
    size = model.cfg.image_size
    images, names, _, _ = calibration_images(None, 64, size)
    ref = torch_outputs(model.cuda(), images)  # torch fp32 on the GPU, TF32 off
    record: dict = {"device": torch.cuda.get_device_name(), "gate": {}, "speed": {}}
    policy = policy_for_model(model.cpu(), log=print)
    torch16 = TorchRunner(model, device="cuda", precision="fp16")
    with torch16:
        got = torch16.infer(images)
        record["gate"]["torch fp16 policy"] = compare(ref, got, "fp16", names).summary()
        for b in (1, 8, 32, 64, 128, 256):
            batch = np.repeat(images, (b + 63) // 64, axis=0)[:b]
            t = _timed(torch16.infer, batch)
            record["speed"][f"torch fp16 b{b}"] = {"images_per_s": b / float(np.median(t)),
                                                   "p50_ms": 1e3 * float(np.median(t))}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "fp16"):
            export_model(model.cpu(), tmp, precision, graphs=("fused",), progress=False,
                         policy=policy if precision == "fp16" else None)
            runner = OrtRunner(Path(tmp) / f"fused.{precision}.onnx", size,
                               providers=[("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"])
            with runner:
                record["gate"][f"onnxruntime cuda {precision}"] = compare(ref, runner.infer(images), precision,
                                                                          names).summary()
    batch32 = np.repeat(images, 1, axis=0)[:32]
    with ReferenceLoopRunner(model, device="cuda") as loop:
        t_ref = float(np.median(_timed(loop.infer, batch32, repeats=5)))
    record["speed"]["ratio_vs_reference_loop_b32"] = t_ref / (32 / record["speed"]["torch fp16 b32"]["images_per_s"])
    with tempfile.TemporaryDirectory() as tmp:
        series = write_dicom_series(Path(tmp) / "series", slices=200)
        with TorchRunner(model, device="cuda", precision="fp16") as runner:
            run_pipeline([series], runner.infer, size, 32, Path(tmp) / "out")  # warm
            t0 = time.perf_counter()
            run_pipeline([series], runner.infer, size, 32, Path(tmp) / "out")
            record["speed"]["series_200_slices_ms"] = 1e3 * (time.perf_counter() - t0)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
