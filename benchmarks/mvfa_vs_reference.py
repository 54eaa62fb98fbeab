"""MVFA inference: the reference's own test loop vs `iqe score` (ONNX Runtime fp32), same PNGs and weights.

    python benchmarks/mvfa_vs_reference.py --reference /path/to/MVFA-AD [--size vit-b|vit-l] [--images 8]
                                           [--shots 1] [--json out.json]

Both sides run the few-shot setting of a segmentation set (Brain): per image, the zero-shot
map (seg head + text) and the few-shot map (1-NN against the K-shot, 11x-augmented bank).

- reference: MVFA-AD's `test_few.main()` itself (out of tree, defects patched as in
  tests/golden/mvfa/make_golden.py, fp32 on the CPU, batch 1 as the script runs it), with
  its data-set class replaced by one that reads each PNG in `__getitem__` as its
  MedDataset does (PIL bicubic resize to 240 + ToTensor). Timed: its `test()` call, i.e.
  the loop over the test images (read, forward, both maps), not model construction,
  the text prompts or the bank (its AUC computation at the end is stubbed out).
- iqe: `iqe import-reference --family mvfa` + `iqe bank` on the same files (untimed), an
  fp32 ONNX export (verified, untimed), then `score_inputs` (what `iqe score` runs:
  read, preprocess, infer, all outputs incl. score_zero) with the ONNX Runtime session
  open, at batch 1 and at `iqe score`'s default batch 8; and the whole `iqe score` command
  in-process (session start + scoring + results.jsonl), once.

Random weights in MVFA's formats (make_golden.py's writer): `vit-b` is a ViT-B-sized
vision tower (768 x 12 blocks, patch 14, so 240 px gives the same 17x17 grid; adapters
after blocks 3/6/9/12); `vit-l` is the real ViT-L/14 shape (1024 x 24, adapters after
6/12/18/24). The text tower is small in both (its features are computed once, outside the
timed loops). Threads: all cores, or `--threads N` for both sides (on a shared machine
one thread each is the steadier comparison: busy-waiting thread pools suffer most from
oversubscription). Prints img/s and the ratio,
with the CPU model.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from iqe.engine.onnxruntime_backend import cpu_name  # noqa: E402
from tests.golden.mvfa import make_golden as mg  # noqa: E402

SIZES = {
    "vit-b": {"width": 768, "layers": 12, "patch": 14, "embed": 768, "text_width": 64, "text_layers": 2,
              "text_heads": 1, "features": [3, 6, 9, 12]},
    "vit-l": {**mg.VIT_L},
}
ORGAN = "Brain"


class LazyImages(torch.utils.data.Dataset):
    """Stands in for the reference's MedDataset: reads and resizes each test image when the loop asks."""

    def __init__(self, test: list[Path], support: list[Path]):
        self.test = test
        self.fewshot_norm_img = torch.stack([mg.load_like_torchvision(p) for p in support])
        self.fewshot_abnorm_img = self.fewshot_norm_img.clone()
        self.fewshot_abnorm_mask = torch.zeros(len(support), 1, 240, 240)

    def __len__(self) -> int:
        return len(self.test)

    def __getitem__(self, i: int):
        return mg.load_like_torchvision(self.test[i]), i % 2, torch.zeros(1, 240, 240)


def run_reference(src: Path, work: Path, clip_path: Path, dims: dict, test: list[Path], support: list[Path]) -> float:
    """Seconds of the reference's test loop (test_few.test) over `test`."""
    ref = work / "MVFA-AD"
    mg.prepare_reference(src, ref)
    mg.install_stubs()
    sys.path.insert(0, str(ref))
    import CLIP.clip as ref_clip
    import test_few

    mg.register_reference_model(ref_clip, clip_path, dims, name="bench")
    (work / "ckpt").mkdir()
    (work / "ckpt" / f"{ORGAN}.pth").write_bytes((work / "fixtures" / f"{ORGAN}.pth").read_bytes())
    data = LazyImages(test, support)
    test_few.MedDataset = lambda *a, **k: data
    test_few.roc_auc_score = lambda *a, **k: 0.0  # random weights, no labels: the AUC is not inference
    loop = test_few.test
    seconds: list[float] = []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = loop(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        return out

    test_few.test = timed
    sys.argv = ["test_few.py", "--model_name", "bench", "--obj", ORGAN, "--save_path", str(work / "ckpt"),
                "--shot", str(len(support)), "--features_list", *map(str, dims["features"])]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        test_few.main()
    for mod in [m for m in sys.modules if m.split(".")[0] in ("CLIP", "utils", "dataset", "test_few", "loss", "prompt",
                                                                 "torchvision", "pkg_resources")]:
        del sys.modules[mod]  # the reference's modules and stubs must not leak into iqe
    sys.path[:] = [p for p in sys.path if "MVFA-AD" not in p]
    return seconds[0]


def run_iqe(work: Path, clip_path: Path, dims: dict, test: list[Path], support_dir: Path, shots: int
            ) -> dict[str, float]:
    """Seconds of iqe's scoring (batch 1, batch 8, the whole `iqe score` command) over `test`."""
    from iqe.cli import main as iqe
    from iqe.engine.build import make_runner
    from iqe.runtime.scoring import score_inputs

    bundle, engine = work / "bundle", work / "engine"
    feats = ",".join(map(str, dims["features"]))
    assert iqe(["import-reference", "--family", "mvfa", "--clip", str(clip_path), "--checkpoint",
                str(work / "fixtures" / f"{ORGAN}.pth"), "--organ", ORGAN, "--features", feats, "--out", str(bundle),
                "--quiet"]) == 0
    assert iqe(["bank", str(bundle), "--support", str(support_dir), "--shots", str(shots), "--quiet"]) == 0
    assert iqe(["export", str(bundle), "--out", str(engine), "--calib-images", "8", "--quiet"]) == 0
    out: dict[str, float] = {}
    with make_runner(bundle, "onnxruntime", "fp32", engine, progress=False) as runner:
        runner.infer(np.zeros((1, 3, 240, 240), np.float32))  # session warm-up, as the reference's first image is not
        for batch in (1, 8):
            t0 = time.perf_counter()
            results = score_inputs([str(p) for p in test], runner.infer, runner.image_size, batch, progress=False)
            out[f"batch {batch}"] = time.perf_counter() - t0
            assert all(r.error is None for r in results) and "score_zero" in results[0].scores
    with make_runner(bundle, "torch", "fp32", progress=False) as runner:
        runner.infer(np.zeros((1, 3, 240, 240), np.float32))
        t0 = time.perf_counter()
        score_inputs([str(p) for p in test], runner.infer, runner.image_size, 1, progress=False)
        out["torch fp32 (same graph), batch 1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert iqe(["score", "--model", str(bundle), *map(str, test), "--backend", "onnxruntime", "--engine", str(engine),
                "--out", str(work / "score"), "--quiet"]) == 0
    out["iqe score command"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="MVFA-AD checkout (not modified)")
    ap.add_argument("--size", choices=sorted(SIZES), default="vit-b")
    ap.add_argument("--images", type=int, default=8, help="test images")
    ap.add_argument("--shots", type=int, default=1, help="support images (bank rows: 11 x shots x 290 per level)")
    ap.add_argument("--threads", type=int, default=None,
                    help="cores for both sides (CPU affinity; torch threads and ONNX Runtime's intra-op pool follow it); "
                         "default: all")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    if args.threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
        torch.set_num_threads(args.threads)
    dims = {**SIZES[args.size], "shots": args.shots}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mvfa-bench-") as tmp:
        work = Path(tmp)
        mg.write_fixtures(work / "fixtures", dims)
        test = mg.write_images(work / "test", args.images, seed=1)
        support = sorted((work / "fixtures" / "support").glob("*.png"))
        clip_path = work / "clip.pt"
        clip_path.write_bytes(gzip.decompress((work / "fixtures" / "clip_tiny.pt.gz").read_bytes()))
        ref_s = run_reference(args.reference, work, clip_path, dims, test, support)
        iqe_s = run_iqe(work, clip_path, dims, test, work / "fixtures" / "support", args.shots)
    n = args.images
    rows = {"reference test_few loop (torch fp32, batch 1)": ref_s,
            **{f"iqe {k}" if k.startswith("torch") else f"iqe onnxruntime fp32, {k}": v
               for k, v in iqe_s.items()}}
    print(f"MVFA {args.size} ({dims['width']} x {dims['layers']} blocks, 240 px), {ORGAN} few-shot, {args.shots} shot(s),"
          f" {n} images; CPU: {cpu_name()}, torch threads {torch.get_num_threads()}; 1-min load average "
          f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    for name, s in rows.items():
        ratio = ref_s / s
        print(f"  {name:<48} {n / s:7.2f} img/s  {1000 * s / n:8.1f} ms/img  x{ratio:.2f} vs the reference")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "images": n, "shots": args.shots, "cpu": cpu_name(), "threads": args.threads,
                                         "seconds": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
