"""Full-size text tower parity: per-organ text features of the reference code vs `iqe import-reference`.

    python tests/golden/mvfa/text_parity.py --reference /path/to/MVFA-AD [--organs Histopathology,Brain]

The committed fixtures and parity.py run the text path with a 64 x 2 text tower; this runs the
ViT-L-14-336 text tower's real shape (width 768, 12 layers, 12 heads, 77-token context, 768-d
projection) with random weights in OpenAI's layout (fp16, as released; make_golden.py's
writer) and the real BPE tokenizer on both sides. Reference: `create_model` + its
`utils.encode_text_with_prompt_ensemble` (35 templates x state words, fp32 on the CPU, as
test_zero.py / test_few.py call it). iqe: `import_mvfa(...).text_features`. Prints max abs of
T [768, 2] per organ. Not in CI: 2 x 420 prompts through 12 full-width layers per side take
minutes on a CPU. The vision tower is the tiny one (it does not enter the text features).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.golden.mvfa import make_golden as mg  # noqa: E402

TEXT_L14 = {**mg.TINY, "embed": 768, "text_width": 768, "text_layers": 12, "text_heads": 12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="MVFA-AD checkout (not modified)")
    ap.add_argument("--organs", default="Histopathology", help="reference data set names, comma-separated")
    args = ap.parse_args()
    organs = args.organs.split(",")
    with tempfile.TemporaryDirectory(prefix="mvfa-text-") as tmp:
        work = Path(tmp)
        mg.write_fixtures(work / "fixtures", TEXT_L14)
        clip_path = work / "clip.pt"
        clip_path.write_bytes(gzip.decompress((work / "fixtures" / "clip_tiny.pt.gz").read_bytes()))
        ref = work / "MVFA-AD"
        mg.prepare_reference(args.reference, ref)
        mg.install_stubs()
        sys.path.insert(0, str(ref))
        import CLIP.clip as ref_clip
        import utils as ref_utils
        from prompt import REAL_NAME

        mg.register_reference_model(ref_clip, clip_path, TEXT_L14, name="text-l14")
        with contextlib.redirect_stdout(io.StringIO()):
            clip_model = ref_clip.create_model(model_name="text-l14", img_size=240, device="cpu", pretrained="openai",
                                               require_pretrained=True).eval()
        want = {}
        for organ in organs:
            t0 = time.perf_counter()
            with torch.no_grad():
                want[organ] = ref_utils.encode_text_with_prompt_ensemble(clip_model, REAL_NAME[organ], "cpu").float()
            print(f"reference {organ}: {time.perf_counter() - t0:.0f} s", flush=True)
        del clip_model
        for mod in [m for m in sys.modules if m.split(".")[0] in ("CLIP", "utils", "prompt", "torchvision",
                                                                     "pkg_resources")]:
            del sys.modules[mod]
        sys.path[:] = [p for p in sys.path if "MVFA-AD" not in p]

        from iqe.model.mvfa import import_mvfa

        for organ in organs:
            t0 = time.perf_counter()
            got = import_mvfa(clip_path, work / "fixtures" / "Brain.pth", organ, features=TEXT_L14["features"]
                              ).text_features
            diff = float((got.double() - want[organ].double()).abs().max())
            print(f"iqe {organ}: {time.perf_counter() - t0:.0f} s; T {list(got.shape)} max abs vs the reference "
                  f"{diff:.2e} (|T| max {float(want[organ].abs().max()):.3f})", flush=True)


if __name__ == "__main__":
    main()
