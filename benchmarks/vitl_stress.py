"""Build the ViT-L/14 @240 stress checkpoint of issue 7 in the reference's formats, plus test PNGs.

    python benchmarks/vitl_stress.py --out /tmp/vitl-stress [--sharpen 2,5,9 --scale 8] [--pngs 8]

Random `vit-l-14-336` weights (tests/conftest.py `randomize_`), q/k in-projection rows of the
`--sharpen` blocks scaled by `--scale` (attention logits x scale^2: sharp attention), text
temperature exp(prompt_temp) = 100; CLIP towers rounded to fp16 like OpenAI's release. Writes
`<out>/reference/{clip.pt,iqe.pth}` (the reference's formats, tests/model/reference_format.py),
imports them through `iqe import-reference` into `<out>/bundle`, and writes `--pngs` synthetic
8-bit PNGs (iqe.model.synth, seed 1: not the calibration images) to `<out>/pngs`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import numpy as np
    import torch
    from PIL import Image

    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel
    from iqe.model.synth import DEFAULT_OBJECTS, synth_image
    from tests.conftest import randomize_
    from tests.export.stress import sharpen_
    from tests.model.reference_format import round_clip_to_fp16_, write_reference_files

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sharpen", default="2,5,9", help="1-based vision blocks whose q/k rows are scaled")
    ap.add_argument("--scale", type=float, default=8.0)
    ap.add_argument("--pngs", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = randomize_(IQEModel(load_config("vit-l-14-336")), seed=1).eval()
    sharpen_(model, {int(b): args.scale for b in args.sharpen.split(",") if b}, temperature=100.0)
    round_clip_to_fp16_(model)
    clip, ckpt = write_reference_files(model, args.out / "reference")
    subprocess.run([sys.executable, "-m", "iqe.cli", "import-reference", "--quiet", "--clip", str(clip),
                    "--checkpoint", str(ckpt), "--out", str(args.out / "bundle"), "--force"], check=True, cwd=REPO)
    pngs = args.out / "pngs"
    pngs.mkdir(parents=True, exist_ok=True)
    for i in range(args.pngs):
        obj, abnormal = DEFAULT_OBJECTS[i % len(DEFAULT_OBJECTS)], bool((i // len(DEFAULT_OBJECTS)) % 2)
        img, _ = synth_image(obj, abnormal, np.random.default_rng([1, i]))
        Image.fromarray(img).save(pngs / f"{obj}_{'Ungood' if abnormal else 'good'}_{i:02d}.png")
    print(f"bundle {args.out / 'bundle'}, {args.pngs} PNGs in {pngs}")


if __name__ == "__main__":
    main()
