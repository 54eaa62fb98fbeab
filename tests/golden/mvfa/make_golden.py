"""Regenerate the MVFA golden fixtures by running the reference code itself (out of tree).

    git clone <MediaBrain-SJTU/MVFA-AD> /tmp/MVFA-AD   # commit a30bf7bb2c51772a36e7be58d3c072be480620fe
    pip install kornia ftfy scikit-learn pandas         # the reference's imports (torchvision is stubbed)
    python tests/golden/mvfa/make_golden.py --reference /tmp/MVFA-AD [--out tests/golden/mvfa]

What it does (nothing from the reference is copied into this repository):
1. Writes tiny random weights in MVFA's own formats: an OpenAI-layout CLIP state dict
   (fp16 like OpenAI's release, 336-px positional table so the resize runs; gzip-compressed
   because the 49408-row token table is zero except for the rows the prompts use) and an
   adapter checkpoint `{'seg_adapters': ..., 'det_adapters': ...}` per organ; 8-bit PNGs.
2. Copies the reference tree to a temporary folder and patches only its defects
   (MVFA.md §8: hard-coded ViT-L sizes and 24 blocks in CLIP/adapter.py, the dead CUDA-only
   attention-map block); the math is untouched. torchvision (only its transforms, for
   data sets that are replaced here) and pkg_resources are stubbed. CUDA autocast is
   inactive on a CPU-only host, so the reference runs in fp32 (ref-fp32).
3. Runs the reference's own `test_zero.main()` and `test_few.main()` for Brain (segmentation
   set: seg-head bank, map fusion) and Chest (classification set: det-head bank, score
   fusion) with its data-set classes replaced by ones serving these PNGs (loaded as
   torchvision's Resize((240,240), BICUBIC) + ToTensor do: PIL bicubic, /255), and records
   the raw per-image outputs the scripts hand to numpy before their test-set min-max
   normalisation: score_zero, map_zero (test_zero), map_few / score_few (test_few).
Outputs: reference_outputs.npz (maps sampled on a 3-pixel lattice incl. the last row and
column, to keep the fixtures small) and fixtures.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # this checkout's `iqe` (tokenizer and prompt lists)
REFERENCE_COMMIT = "a30bf7bb2c51772a36e7be58d3c072be480620fe"
# Tiny sizes for the committed fixtures; parity.py also runs OpenAI ViT-L/14 sizes (VIT_L).
TINY = {"width": 64, "layers": 4, "patch": 14, "embed": 64, "text_width": 64, "text_layers": 2, "text_heads": 1,
        "features": [1, 2, 3, 4]}
# ViT-L/14 vision tower and adapters at full size; the text tower is cut to 64 x 2 (its path is
# checked at tiny size, and 12 full-width layers over 2 x 420 padded prompts would dominate a CPU run).
VIT_L = {"width": 1024, "layers": 24, "patch": 14, "embed": 768, "text_width": 64, "text_layers": 2, "text_heads": 1,
         "features": [6, 12, 18, 24], "shots": 1}
FEATURES = TINY["features"]
ORGANS = ("Brain", "Chest")
SHOTS = 2
MAP_ROWS = np.r_[0:240:3, 239]  # sampled lattice of the stored maps


def tiny_clip_state(seed: int = 0, dims: dict = TINY) -> dict[str, torch.Tensor]:
    """OpenAI-layout ViT CLIP with random weights; token rows outside the prompts' ids are zero."""
    from iqe.model.mvfa import ORGAN_NAMES, prompt_sentences
    from iqe.model.tokenizer import default_tokenizer

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return scale * torch.randn(*shape, generator=g)

    def ln(prefix, width, out):
        out[f"{prefix}.weight"] = 1 + rnd(width, scale=0.1)
        out[f"{prefix}.bias"] = rnd(width)

    def blocks(prefix, width, layers, out):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            out[f"{p}.attn.in_proj_weight"] = rnd(3 * width, width, scale=width ** -0.5)
            out[f"{p}.attn.in_proj_bias"] = rnd(3 * width)
            out[f"{p}.attn.out_proj.weight"] = rnd(width, width, scale=width ** -0.5)
            out[f"{p}.attn.out_proj.bias"] = rnd(width)
            ln(f"{p}.ln_1", width, out)
            ln(f"{p}.ln_2", width, out)
            out[f"{p}.mlp.c_fc.weight"] = rnd(4 * width, width, scale=width ** -0.5)
            out[f"{p}.mlp.c_fc.bias"] = rnd(4 * width)
            out[f"{p}.mlp.c_proj.weight"] = rnd(width, 4 * width, scale=(4 * width) ** -0.5)
            out[f"{p}.mlp.c_proj.bias"] = rnd(width)

    WIDTH, LAYERS, PATCH, EMBED = dims["width"], dims["layers"], dims["patch"], dims["embed"]
    TEXT_WIDTH, TEXT_LAYERS = dims["text_width"], dims["text_layers"]
    s: dict[str, torch.Tensor] = {}
    s["visual.class_embedding"] = rnd(WIDTH, scale=0.5)
    s["visual.positional_embedding"] = rnd(24 * 24 + 1, WIDTH, scale=0.1)  # the 336-px grid: resized at load
    s["visual.proj"] = rnd(WIDTH, EMBED, scale=WIDTH ** -0.5)
    conv = rnd(WIDTH, 3, PATCH, PATCH, scale=0.1)
    s["visual.conv1.weight"] = conv - conv.mean(dim=(1, 2, 3), keepdim=True)  # no DC response: features follow texture
    ln("visual.ln_pre", WIDTH, s)
    blocks("visual.transformer", WIDTH, LAYERS, s)
    ln("visual.ln_post", WIDTH, s)
    used = sorted({i for organ in ORGAN_NAMES.values() for sents in prompt_sentences(organ)
                   for row in default_tokenizer().tokenize(sents) for i in row if i})
    token = torch.zeros(49408, TEXT_WIDTH)
    token[used] = rnd(len(used), TEXT_WIDTH, scale=1.0)
    s["token_embedding.weight"] = token
    s["positional_embedding"] = rnd(77, TEXT_WIDTH, scale=0.1)
    blocks("transformer", TEXT_WIDTH, TEXT_LAYERS, s)
    ln("ln_final", TEXT_WIDTH, s)
    s["text_projection"] = rnd(TEXT_WIDTH, EMBED, scale=TEXT_WIDTH ** -0.5)
    s["logit_scale"] = torch.tensor(4.6052)
    return {k: v.half() if k != "logit_scale" else v for k, v in s.items()}


def adapter_checkpoint(seed: int, dims: dict = TINY) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    w, e = dims["width"], dims["embed"]
    for group in ("seg_adapters", "det_adapters"):
        out[group] = {}
        for k in range(len(dims["features"])):
            out[group][f"{k}.fc1.0.weight"] = (2.4 / w ** 0.5) * torch.randn(e, w, generator=g)
            out[group][f"{k}.fc2.0.weight"] = (2.4 / e ** 0.5) * torch.randn(w, e, generator=g)
    return out


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    """Smooth 8-bit test pictures of assorted sizes and modes (the resize to 240 is part of the test)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        h, w = [(96, 96), (120, 80), (64, 100)][i % 3]
        yy, xx = np.mgrid[0:h, 0:w]
        img = 110 + 50 * np.sin(xx / (5 + i) + rng.uniform(0, 6)) * np.cos(yy / (7 + i)) + rng.normal(0, 6, (h, w))
        img[(yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2 < (min(h, w) / 5) ** 2] += 60
        arr = np.clip(img, 0, 255).astype(np.uint8)
        mode = "L" if i % 2 == 0 else "RGB"
        if mode == "RGB":
            arr = np.stack([arr, np.roll(arr, 3, axis=1), 255 - arr], axis=2)
        p = folder / f"{folder.name}_{i}.png"
        Image.fromarray(arr, mode=mode).save(p, optimize=True)
        paths.append(p)
    return paths


def write_fixtures(out: Path, dims: dict = TINY) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(tiny_clip_state(dims=dims), buf)
    (out / "clip_tiny.pt.gz").write_bytes(gzip.compress(buf.getvalue(), mtime=0, compresslevel=9 if dims is TINY else 1))
    for i, organ in enumerate(ORGANS):
        torch.save(adapter_checkpoint(seed=10 + i, dims=dims), out / f"{organ}.pth")
    return {"test": [p.name for p in write_images(out / "test", 3, seed=1)],
            "support": [p.name for p in write_images(out / "support", dims.get("shots", SHOTS), seed=2)]}


# -- running the reference -----------------------------------------------------------------------
PATCHES = {  # CLIP/adapter.py: (old, new) pairs; sizes only and dead code, no math change
    "CLIP/adapter.py": [
        ("ClipAdapter(1024, bottleneck=768) for i in range(len(features))] )\n        self.det_adapters",
         "ClipAdapter(clip_model.visual.conv1.out_channels, bottleneck=clip_model.text_projection.shape[1])"
         " for i in range(len(features))] )\n        self.det_adapters"),
        ("self.det_adapters = nn.ModuleList( [ClipAdapter(1024, bottleneck=768)",
         "self.det_adapters = nn.ModuleList( [ClipAdapter(clip_model.visual.conv1.out_channels, "
         "bottleneck=clip_model.text_projection.shape[1])"),
        ("for i in range(24):", "for i in range(len(self.image_encoder.transformer.resblocks)):"),
        ("        B, C, L = attn_out[0].shape\n        H = int(math.sqrt(L-1))\n"
         "        out_attn = torch.zeros([H, H]).to('cuda')\n\n        for i in range(len(attn)):\n"
         "            out_attn = out_attn + attn_out[i][0, 0, 1:].view(H, H)\n", ""),
    ],
}


def prepare_reference(src: Path, dst: Path) -> None:
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head and head != REFERENCE_COMMIT:
        print(f"warning: reference at {head}, fixtures were made at {REFERENCE_COMMIT}", file=sys.stderr)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git"))
    for rel, pairs in PATCHES.items():
        text = (dst / rel).read_text()
        for old, new in pairs:
            assert text.count(old) == 1, f"{rel}: patch target not found once: {old[:60]!r}"
            text = text.replace(old, new)
        (dst / rel).write_text(text)


def install_stubs() -> None:
    """torchvision (the reference imports only transforms, for data sets replaced here) and pkg_resources."""
    import packaging.version

    tv = types.ModuleType("torchvision")
    tf = types.ModuleType("torchvision.transforms")
    for name in ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize"):
        setattr(tf, name, lambda *a, **k: None)
    tv.transforms = tf
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tf})
    pr = types.ModuleType("pkg_resources")
    pr.packaging = sys.modules["packaging"]
    sys.modules["pkg_resources"] = pr
    del packaging


def load_like_torchvision(path: Path) -> torch.Tensor:
    """transforms.Resize((240, 240), Image.BICUBIC) + ToTensor on a PIL RGB image."""
    img = Image.open(path).convert("RGB").resize((240, 240), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)


class _Data(torch.utils.data.Dataset):
    """Stands in for MedTestDataset / MedDataset: (image, label, mask) plus the few-shot tensors."""

    def __init__(self, test: list[Path], support: list[Path]):
        self.images = [load_like_torchvision(p) for p in test]
        self.fewshot_norm_img = torch.stack([load_like_torchvision(p) for p in support])
        self.fewshot_abnorm_img = self.fewshot_norm_img.clone()
        self.fewshot_abnorm_mask = torch.zeros(len(support), 1, 240, 240)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i % 2, torch.zeros(1, 240, 240)


class _Recorder(types.ModuleType):
    """numpy, except that np.array(list) and np.sum(...) results are recorded (the raw outputs)."""

    def __init__(self):
        super().__init__("numpy")
        self.arrays: list[np.ndarray] = []
        self.sums: list[np.ndarray] = []

    def __getattr__(self, name):
        return getattr(np, name)

    def array(self, obj, *a, **k):
        out = np.array(obj, *a, **k)
        if isinstance(obj, list):
            self.arrays.append(out)
        return out

    def sum(self, *a, **k):
        out = np.sum(*a, **k)
        self.sums.append(np.asarray(out))
        return out


def register_reference_model(ref_clip, clip_path: Path, dims: dict, name: str = "tiny") -> None:
    """Make the reference's `create_model(name)` build `dims` (336-px table) and load `clip_path`."""
    ref_clip._MODEL_CKPT_PATHS[name] = clip_path
    ref_clip._MODEL_CONFIGS[name] = {
        "embed_dim": dims["embed"],
        "vision_cfg": {"image_size": 336, "layers": dims["layers"], "width": dims["width"], "patch_size": dims["patch"]},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": dims["text_width"], "heads": dims["text_heads"],
                     "layers": dims["text_layers"]},
    }


def run_reference(ref: Path, fixtures: Path, names: dict, dims: dict = TINY, rows: np.ndarray = MAP_ROWS,
                  organs: tuple[str, ...] = ORGANS) -> dict[str, np.ndarray]:
    install_stubs()
    sys.path.insert(0, str(ref))
    import CLIP.clip as ref_clip
    import test_few
    import test_zero

    work = Path(tempfile.mkdtemp(prefix="mvfa-golden-"))
    clip_path = work / "clip_tiny.pt"
    clip_path.write_bytes(gzip.decompress((fixtures / "clip_tiny.pt.gz").read_bytes()))
    register_reference_model(ref_clip, clip_path, dims)
    for organ in ORGANS:
        shutil.copy(fixtures / f"{organ}.pth", work / f"{organ}.pth")
    data = _Data([fixtures / "test" / n for n in names["test"]], [fixtures / "support" / n for n in names["support"]])
    out: dict[str, np.ndarray] = {}
    feats = ["--features_list", *map(str, dims["features"])]
    encode_all = test_zero.encode_text_with_prompt_ensemble
    for organ in organs:
        # test_zero.main encodes the prompts of all six data sets and uses only the target's:
        # skip the unused ones (their result is never read), which is most of its time at ViT-L size.
        test_zero.encode_text_with_prompt_ensemble = (
            lambda model, name, device, _want=test_zero.REAL_NAME[organ]:
            encode_all(model, name, device) if name == _want else None)
        rec = _Recorder()
        test_zero.np, test_zero.roc_auc_score = rec, lambda *a, **k: 0.0
        test_zero.MedTestDataset = test_zero.MedTrainDataset = lambda *a, **k: data
        sys.argv = ["test_zero.py", "--model_name", "tiny", "--obj", organ, "--save_path", str(work), *feats]
        with contextlib.redirect_stdout(io.StringIO()):
            test_zero.main()
        # np.array calls on lists: gt_list, segment_scores, image_scores (the last two before min-max)
        maps, scores = rec.arrays[1], rec.arrays[2]
        out[f"{organ}/map_zero"] = maps[:, 0][:, rows][:, :, rows].astype(np.float32)
        out[f"{organ}/score_zero"] = scores.astype(np.float32)

        rec = _Recorder()
        test_few.np, test_few.roc_auc_score = rec, lambda *a, **k: 0.0
        test_few.MedDataset = lambda *a, **k: data
        sys.argv = ["test_few.py", "--model_name", "tiny", "--obj", organ, "--save_path", str(work),
                    "--shot", str(dims.get("shots", SHOTS)), *feats]
        with contextlib.redirect_stdout(io.StringIO()):
            test_few.main()
        if organ == "Brain":  # after gt_list: seg_score_map_zero, seg_score_map_few
            out[f"{organ}/map_zero_few_script"] = rec.arrays[1][:, 0][:, rows][:, :, rows].astype(np.float32)
            few = rec.arrays[2][:, 0]
        else:  # after gt_list: det_image_scores_zero, det_image_scores_few; per-image few-shot maps are np.sum results
            out[f"{organ}/score_zero_few_script"] = rec.arrays[1].astype(np.float32)
            out[f"{organ}/score_few"] = rec.arrays[2].astype(np.float32)
            few = np.stack([s[0] for s in rec.sums if s.ndim == 3])
        out[f"{organ}/map_few"] = few[:, rows][:, :, rows].astype(np.float32)
    shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="MVFA-AD checkout (not modified)")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = write_fixtures(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "MVFA-AD"
        prepare_reference(args.reference, ref)
        outputs = run_reference(ref, args.out, names)
    np.savez_compressed(args.out / "reference_outputs.npz", **outputs)
    meta = {"reference_commit": REFERENCE_COMMIT, "features": FEATURES, "organs": list(ORGANS), "shots": SHOTS,
            "map_rows": MAP_ROWS.tolist(), **names, "torch": torch.__version__}
    (args.out / "fixtures.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: list(v.shape) for k, v in outputs.items()}))


if __name__ == "__main__":
    main()
