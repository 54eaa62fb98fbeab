"""Ray bulk scoring vs `iqe score` throughput on this machine (short; prints JSON).

    python benchmarks/scale_bulk.py [--model BUNDLE] [--images 96] [--actors 2] [--batch 8]

Both sides run the same ONNX Runtime engine on the same synthetic PNGs. `iqe score`: one
process, one session using every core. Ray: in-process cluster, `--actors` actors with one
whole CPU (one ORT thread) each. Reported separately: Ray start-up, actor start-up (run
start to the first chunk an actor begins: process, imports, ORT session), and throughput
once actors are up (items / first chunk start to last chunk end, from the actors' clocks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: a random tiny-preset bundle)")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    import numpy as np
    from PIL import Image

    from iqe.engine.build import make_runner
    from iqe.runtime.bulk import BulkOptions, _init_ray, run_bulk
    from iqe.runtime.scoring import score_inputs

    work = Path(tempfile.mkdtemp(prefix="iqe-bench-bulk-"))
    os.environ.setdefault("IQE_CACHE", str(work / "cache"))
    bundle = args.model or _tiny_bundle(work / "bundle")
    rng = np.random.default_rng(0)
    folder = work / "imgs"
    folder.mkdir()
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(folder / f"{i:05d}.png")

    with make_runner(bundle, "onnxruntime", progress=False) as runner:  # engine built + session up: not timed
        t0 = time.perf_counter()
        results = score_inputs([folder], runner.infer, runner.image_size, args.batch, progress=False)
        score_s = time.perf_counter() - t0
    assert all(r.error is None for r in results)

    opts = BulkOptions(bundle, batch=args.batch, actors=args.actors, units_per_task=4 * args.batch,
                       num_cpus=args.actors, object_store_mb=128, progress=False)
    t0 = time.perf_counter()
    _init_ray(opts)
    ray_init_s = time.perf_counter() - t0
    summary = run_bulk([str(folder)], work / "bulk", opts)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "images": args.images, "batch": args.batch, "actors": args.actors,
        "iqe_score_images_per_s": round(args.images / score_s, 2),
        "ray_init_s": round(ray_init_s, 2),
        "ray_actor_startup_s": summary["actor_startup_s"],
        "ray_images_per_s_actors_up": summary["items_per_s_actors_up"],
        "ray_run_s": summary["run_s"],
        "ray_images_per_s_overall": round(args.images / summary["run_s"], 2),
    }
    report["ray_actors_up_vs_score"] = round(report["ray_images_per_s_actors_up"] / report["iqe_score_images_per_s"], 3)
    print(json.dumps(report, indent=2))
    import ray

    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _tiny_bundle(path: Path) -> Path:
    import torch

    from iqe.model.bundle import save_bundle
    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel

    torch.manual_seed(0)
    return save_bundle(IQEModel(load_config("tiny")).eval(), path)


if __name__ == "__main__":
    sys.exit(main())
