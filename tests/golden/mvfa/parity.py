"""MVFA parity table: the reference code vs `iqe` on the same files, full 240x240 maps.

    python tests/golden/mvfa/parity.py --reference /tmp/MVFA-AD --size tiny|vit-l [--backends torch,onnxruntime]

Writes random weights in MVFA's formats (make_golden.py; ViT-L sizes with --size vit-l),
runs the reference (make_golden.run_reference: its own test_zero.py / test_few.py, defects
patched, fp32 CPU), then the user's path in-process: `iqe import-reference --family mvfa`,
`iqe bank`, `iqe score --save-maps` per backend/precision, and prints the max abs
differences of score_zero, map_zero, map_few (Brain: seg bank) and score_few (Chest: det bank).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.golden.mvfa import make_golden as mg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--size", choices=["tiny", "vit-l"], default="tiny")
    ap.add_argument("--backends", default="torch:fp32,onnxruntime:fp32,onnxruntime:fp16")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--organs", default="Brain,Chest", help="Brain: seg-head bank; Chest: det-head bank")
    args = ap.parse_args()
    dims = mg.TINY if args.size == "tiny" else mg.VIT_L
    work = args.work or Path(tempfile.mkdtemp(prefix=f"mvfa-parity-{args.size}-"))
    names = mg.write_fixtures(work / "fixtures", dims)
    rows = np.arange(240)
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "MVFA-AD"
        mg.prepare_reference(args.reference, ref)
        organs = tuple(args.organs.split(","))
        want = mg.run_reference(ref, work / "fixtures", names, dims, rows, organs)
    for mod in [m for m in sys.modules if m.split(".")[0] in ("CLIP", "utils", "dataset", "test_few", "test_zero",
                                                                 "loss", "prompt", "torchvision", "pkg_resources")]:
        del sys.modules[mod]  # the reference's modules and make_golden's stubs must not leak into iqe
    sys.path[:] = [p for p in sys.path if "MVFA-AD" not in p]

    from iqe.cli import main as iqe

    clip = work / "clip.pt"
    clip.write_bytes(gzip.decompress((work / "fixtures" / "clip_tiny.pt.gz").read_bytes()))
    feats = ",".join(map(str, dims["features"]))
    table = {}
    for organ in organs:
        bundle = work / f"bundle-{organ}"
        assert iqe(["import-reference", "--family", "mvfa", "--clip", str(clip), "--checkpoint",
                    str(work / "fixtures" / f"{organ}.pth"), "--organ", organ, "--features", feats, "--out", str(bundle),
                    "--quiet"]) == 0
        assert iqe(["bank", str(bundle), "--support", str(work / "fixtures" / "support"), "--shots", str(dims.get("shots", mg.SHOTS)),
                    "--quiet"]) == 0
        for spec in args.backends.split(","):
            backend, precision = spec.split(":")
            out = work / f"out-{organ}-{backend}-{precision}"
            assert iqe(["score", "--model", str(bundle), str(work / "fixtures" / "test"), "--out", str(out),
                        "--save-maps", "--backend", backend, "--precision", precision, "--batch", "3",
                        "--engine", str(work / f"engine-{organ}"), "--quiet"]) == 0
            res = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
            per_item = [np.load(out / r["maps"]) for r in res]  # iqe score streams maps/NNNNNN.npz per item
            maps = {k: np.stack([m[k] for m in per_item]) for k in ("map_zero", "map_few")}
            got = {"score_zero": np.array([r["score_zero"] for r in res]), "map_zero": maps["map_zero"],
                   "map_few": maps["map_few"], "score_few": np.array([r["score_few"] for r in res])}
            diffs = {k: float(np.abs(got[k].astype(np.float64) - want[f"{organ}/{k}"]).max())
                     for k in ("score_zero", "map_zero", "map_few", "score_few") if f"{organ}/{k}" in want}
            table[f"{args.size} {organ} {backend} {precision}"] = diffs
            print(f"{args.size} {organ} {backend} {precision}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()),
                  flush=True)
    (work / "parity.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {work / 'parity.json'}")


if __name__ == "__main__":
    main()
