"""Triton path vs the local engine: throughput and per-request latency p50/p95 (short; prints JSON).

    python benchmarks/scale_triton.py [--model BUNDLE] [--requests 60] [--clients 4]

The server is the nvidia-pytriton `tritonserver` (Python backend only, see .ci/setup)
running the repository's ONNX Runtime Python-backend scorer, so both sides run the same
ONNX graph with ONNX Runtime on this CPU; the difference is the serving path (gRPC,
tensor copies, the Python backend's shared memory, dynamic batching).
Single-image requests: sequential (latency) and from `--clients` threads (throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _measure(infer, images, clients: int) -> dict:
    from iqe.bench.stats import summarize

    for img in images[:3]:  # warm-up
        infer(img)
    lat = []
    for img in images:
        t = time.perf_counter()
        infer(img)
        lat.append((time.perf_counter() - t) * 1e3)
    chunks = [images[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda c=c: [infer(x) for x in c]) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    s = summarize(lat)
    return {"p50_ms": s["p50"], "p95_ms": s["p95"], "sequential_images_per_s": round(len(images) / (sum(lat) / 1e3), 2),
            f"concurrent_{clients}_images_per_s": round(len(images) / wall, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: a random tiny-preset bundle)")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()

    import numpy as np

    from scale_bulk import _tiny_bundle  # this folder is sys.path[0] when run as a script
    from iqe.engine.build import make_runner
    from iqe.engine.triton_runner import TritonRunner
    from iqe.export.triton import export_triton
    from tests.scale.tritonserver import TritonServer, available

    if not available():
        print("nvidia-pytriton venv missing: run bash .ci/setup", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="iqe-bench-triton-"))
    os.environ.setdefault("IQE_CACHE", str(work / "cache"))
    bundle = args.model or _tiny_bundle(work / "bundle")
    repo = export_triton(bundle, work / "repo", "python", instances=1, max_batch=8, device="cpu", threads=1,
                         progress=False)
    rng = np.random.default_rng(0)
    images = [rng.random((1, 3, 240, 240), dtype=np.float32) for _ in range(args.requests)]
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "requests": args.requests}
    local = make_runner(bundle, "onnxruntime", progress=False)
    local.threads = 1  # same as the server's single instance
    with local:
        lock = threading.Lock()  # one session, as one Triton instance: calls serialize

        def local_infer(x):
            with lock:
                return local.infer(x)

        report["local_onnxruntime"] = _measure(local_infer, images, args.clients)
    with TritonServer(repo) as server:
        for url in (server.grpc_url, server.http_url):
            with TritonRunner(url) as remote:
                report[f"triton_{url.split(':')[0]}"] = _measure(remote.infer, images, args.clients)
    print(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
