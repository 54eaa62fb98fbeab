"""FP16 policy on a stress checkpoint: the sweep, the gate, and its cost next to fp32 on this CPU.

    python benchmarks/fidelity_cpu.py --preset tiny --images 64 [--time]
    python benchmarks/fidelity_cpu.py --preset vit-l-14-336 --images 8 --sharpen 2,5,9 --scale 8
    python benchmarks/fidelity_cpu.py --bundle /tmp/vitl-stress/bundle --images 8 --sweep-images 8 \
        --sensitivity-images 4   # a bundle imported by benchmarks/vitl_stress.py, taken as is

Builds a stress model (random weights; q/k in-projections of the `--sharpen` blocks scaled
by `--scale` so attention is sharp; exp(prompt_temp) = 100) and, with `--benign`, the
same model unsharpened at the reference's default temperature; measures the FP16 policy
(emulated sweep) and the naive all-FP16 drift; with `--time` exports fp32 and the
policy's fp16 fused graph and times both in ONNX Runtime on this CPU (and verifies the
fp16 graph by the gate). Writes JSON to `--out` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    from iqe.export.fidelity import compare
    from iqe.export.precision import FP16_OPS, PolicyEvaluator, calibration_images, choose_fp16_policy
    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel
    from tests.export.stress import sharpen_

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--sharpen", default="1", help="1-based vision blocks whose q/k are scaled")
    ap.add_argument("--scale", type=float, default=300.0)
    ap.add_argument("--benign", action="store_true", help="also measure the unsharpened model")
    ap.add_argument("--time", action="store_true", help="export and time fp32 vs fp16-policy graphs in ORT")
    ap.add_argument("--max-evaluations", type=int, default=16)
    ap.add_argument("--bundle", type=Path, default=None, help="measure this bundle as is (no --sharpen)")
    ap.add_argument("--sweep-images", type=int, default=8, help="working set the sweep judges candidates on")
    ap.add_argument("--sensitivity-images", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.preset)
    if args.bundle is not None:
        from iqe.model.bundle import load_bundle

        base = load_bundle(args.bundle)
        cfg = base.cfg
    elif args.preset == "tiny":
        from tests.conftest import randomize_

        base = randomize_(IQEModel(cfg), seed=1).eval()
    else:
        base = IQEModel(cfg).eval()
    images, names, _, source = calibration_images(None, args.images, cfg.image_size)
    blocks = [int(b) for b in args.sharpen.split(",") if b]
    cases = {"stress": base if args.bundle else sharpen_(base, {b: args.scale for b in blocks}, temperature=100.0)}
    record = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "preset": args.preset, "images": args.images, "source": source,
              "bundle": str(args.bundle) if args.bundle else None,
              "stress": {"sharpened_blocks": blocks, "qk_scale": args.scale, "temperature": 100.0}, "cases": {}}
    if args.benign:
        import copy

        benign = copy.deepcopy(base)
        sharpen_(benign, {b: 1.0 / args.scale for b in blocks}, temperature=1 / 0.07)
        cases["benign"] = benign
    def save() -> None:
        if args.out:  # after every step: a slow run still leaves what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")

    for name, model in cases.items():
        log = lambda m: print(f"[{name}] {m}", flush=True)  # noqa: E731
        t0 = time.perf_counter()
        ev = PolicyEvaluator(model, images)
        naive = compare(ev.reference, ev.outputs({b: list(FP16_OPS) for b in range(1, cfg.vision.layers + 1)})[1],
                        "fp16", names)
        entry = record["cases"][name] = {"naive_all_fp16_emulated": naive.summary(),
                                         "naive_seconds": round(time.perf_counter() - t0, 1)}
        log(naive.summary_line())
        save()
        t0 = time.perf_counter()
        policy, rep = choose_fp16_policy(model, images, names, source=source, log=log,
                                         max_evaluations=args.max_evaluations, sweep_images=args.sweep_images,
                                         sensitivity_images=args.sensitivity_images)
        entry.update({"sweep_seconds": round(time.perf_counter() - t0, 1),
                      "policy": policy.to_dict() if policy else None, "policy_emulated": rep.summary()})
        save()
        if args.time and policy is not None:
            from iqe.calibration.quantize import time_graph
            from iqe.export.onnx_export import export_model

            with tempfile.TemporaryDirectory() as tmp:
                export_model(model, tmp, "fp32", graphs=("fused",), progress=False, calib_images=min(16, args.images))
                info = export_model(model, tmp, "fp16", graphs=("fused",), progress=False, policy=policy,
                                    calib_images=args.images)
                entry["fp16_verified"] = info.drift
                batch = images[:4]
                entry["ort_cpu_ms_per_image"] = {p: round(1e3 * time_graph(Path(tmp) / f"fused.{p}.onnx", batch), 2)
                                                 for p in ("fp32", "fp16")}
        save()
        print(json.dumps(entry, indent=1, default=str)[:3000], flush=True)


if __name__ == "__main__":
    main()
