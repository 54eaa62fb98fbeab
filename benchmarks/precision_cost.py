"""What an engine's precision costs and buys on this CPU: ONNX Runtime fp32 vs fp16-policy graphs.

    python benchmarks/precision_cost.py FUSED_FP32.onnx FUSED_FP16.onnx [--batch 4] [--rounds 3]

Both graphs run in one process on the same batch of synthetic calibration-style images,
interleaved round by round (a busy machine slows both alike; the ratio is the number to
keep), each session with all ONNX Runtime optimisations. Prints ms/image per graph per
round, the median ratio, the fp16 policy's FLOP fraction from its export record, and the
CPU name. ONNX Runtime's CPU provider has no FP16 GEMM: it runs the policy's casts around
float32 kernels, so this measures what the policy costs here, not what a GPU gains.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import numpy as np
    import onnxruntime as ort

    from iqe.engine.onnxruntime_backend import cpu_name
    from iqe.export.precision import synthetic_images

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", type=Path, nargs="+", help="fused.<precision>.onnx files to compare (first = baseline)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sessions = {}
    for path in args.graphs:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        t0 = time.perf_counter()
        sessions[path] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        print(f"{path.name}: session {time.perf_counter() - t0:.1f} s", flush=True)
    size = sessions[args.graphs[0]].get_inputs()[0].shape[-1]
    images = synthetic_images(args.batch, int(size) if isinstance(size, int) else 240)[0]
    times: dict[Path, list[float]] = {p: [] for p in args.graphs}
    for s in sessions.values():
        s.run(None, {"images": images})  # warm-up
    for r in range(args.rounds):
        for path, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, {"images": images})
            times[path].append(1e3 * (time.perf_counter() - t0) / len(images))
        print(f"round {r + 1}: " + ", ".join(f"{p.name} {times[p][-1]:.1f} ms/image" for p in args.graphs), flush=True)
    base = np.median(times[args.graphs[0]])
    for p in args.graphs:
        record = p.parent / f"export.{p.name.split('.')[1]}.json"
        frac = json.loads(record.read_text()).get("fp16_flop_fraction") if record.is_file() else None
        print(f"{p.name}: median {np.median(times[p]):.1f} ms/image, {base / np.median(times[p]):.2f}x the first"
              + (f", fp16 FLOP fraction {frac:.2f}" if frac else ""))
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, batch {args.batch}, "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
