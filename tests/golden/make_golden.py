"""Produce the golden fixtures by running the reference code itself, out of tree.

    python tests/golden/make_golden.py /path/to/IQE-CLIP [--out tests/golden/fixtures]

Reference: github.com/hongh0/IQE-CLIP at commit b6ddd111c3a40bf519676e8ededd9d422594d39b
(checked out anywhere; none of its code is copied here or committed). Environment: the
project's Python 3.11 + torch, plus what the reference imports: transformers==4.44.2,
ftfy, regex, torchmetrics, setuptools<70 (its tokenizer imports pkg_resources).

What it writes (small, committed):
- clip.pt.gz: random tiny OpenAI-format CLIP state dict (float16, as OpenAI ships; 24x24
  positional table so the reference's resize to the 17x17 grid at 240 px runs); token
  embedding rows other than the prompt tokens are zero (so the file compresses).
- iqe.pth.gz: random reference checkpoint (trainable_linearlayer, New_Lan_Embed, iqm,
  query_tokens, query_linear, prompt parameters) in the reference's layout.
- config_iqm.json: the reference's IQM config with tiny sizes.
- images/*.png: a few 8-bit PNGs of different sizes and modes.
- golden.npz: the reference's own outputs on them: score_query, score_text (its
  image_scores_new / image_scores_raw before min-max), map and map_smooth (the input and
  output of its gaussian_filter: 0.2 map_text + 0.8 map_query, before normalisation).

How the reference runs (float32, CPU): its `test_zero.test()` is called with a loader of
the PNGs read by the reference's own preprocessing (PIL RGB, bicubic 240, ToTensor); the
raw arrays are captured where `test()` concatenates and smooths them, before its min-max
normalisation. Patches, all at runtime (the checkout is not modified), each only because
the code cannot otherwise run on a CPU-only machine:
1. `Linear1.__init__` accepts the `in_channel` argument `IQE_CLIP` passes (a published
   constructor bug; with in_channel=1 the layer is exactly Conv1d(1, k, 3, 'same')).
2. Stub modules for `torchvision` and `kornia` (imported at module level by the dataset
   and augmentation code, unused on this path; neither has a wheel for this torch).
3. `_MODEL_CKPT_PATHS['ViT-L-14-336']` points at the tiny CLIP file (no download).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
REFERENCE_COMMIT = "b6ddd111c3a40bf519676e8ededd9d422594d39b"
FEATURES = [1, 2, 3, 4]
SEED = 7


def tiny_model():
    """Random tiny IQEModel (this project's module tree, used only to lay out random tensors)."""
    sys.path.insert(0, str(REPO))
    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel
    from tests.conftest import randomize_

    torch.manual_seed(SEED)
    model = randomize_(IQEModel(load_config("tiny")), seed=SEED).eval()
    with torch.no_grad():  # MLP pre-activations of order 1-3, where GELU variants differ (~1e-3)
        for name, p in model.named_parameters():
            if ".mlp.c_fc." in name:
                p.mul_(5.0)
    used = set(model.cfg.normal_prompt_ids) | set(model.cfg.abnormal_prompt_ids) | {0}
    with torch.no_grad():
        keep = torch.zeros(model.text.token_embedding.weight.shape[0], dtype=torch.bool)
        keep[sorted(used)] = True
        model.text.token_embedding.weight[~keep] = 0
    return model


def write_inputs(out: Path) -> tuple[Path, Path, Path, list[Path]]:
    from tests.conftest import write_test_images
    from tests.model.reference_format import write_reference_files

    model = tiny_model()
    g = torch.Generator().manual_seed(SEED)
    pos = 0.1 * torch.randn(24 * 24 + 1, model.cfg.vision.width, generator=g)
    tmp = Path(tempfile.mkdtemp())
    clip_path, ckpt_path = write_reference_files(model, tmp, pos_table=pos)
    for src, name in ((clip_path, "clip.pt.gz"), (ckpt_path, "iqe.pth.gz")):
        with open(src, "rb") as fi, gzip.GzipFile(out / name, "wb", mtime=0) as fo:
            shutil.copyfileobj(fi, fo)
    c = model.cfg.iqm
    iqm = {"attention_probs_dropout_prob": 0.1, "cross_attention_frequency": 1,
           "encoder_hidden_size": model.cfg.embed_dim, "text_encoder_hidden_size": model.cfg.embed_dim,
           "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": c.hidden_size, "initializer_range": 0.02,
           "intermediate_size": c.intermediate_size, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
           "model_type": "QFormer", "num_attention_heads": c.num_attention_heads,
           "num_hidden_layers": c.num_hidden_layers, "pad_token_id": 0, "position_embedding_type": "absolute",
           "use_qformer_text_input": False, "vocab_size": 30522}
    iqm_path = out / "config_iqm.json"
    iqm_path.write_text(json.dumps(iqm, indent=2) + "\n")
    images = write_test_images(out / "images", seed=SEED)[:3]
    for extra in sorted((out / "images").glob("*.png"))[3:]:
        extra.unlink()
    return clip_path, ckpt_path, iqm_path, images


def _stub(name: str) -> None:
    mod = types.ModuleType(name)
    mod.transforms = types.SimpleNamespace(Compose=None, Resize=None, ToTensor=None)
    sys.modules[name] = mod


def run_reference(ref: Path, clip_path: Path, ckpt_path: Path, iqm_path: Path, images: list[Path]) -> dict:
    """The reference's own inference on `images` (float32 CPU); raw arrays captured in test()."""
    from PIL import Image

    import torchmetrics.functional  # noqa: F401  (before the stub: it probes for torchvision)

    _stub("torchvision")
    _stub("kornia")
    sys.path.insert(0, str(ref))
    import test_zero  # the reference's evaluation script
    from CLIP import clip as ref_clip
    from CLIP import iqeclip

    original_init = iqeclip.Linear1.__init__

    def linear1_init(self, dim_in, dim_mid, dim_out, k=5, in_channel=1):  # patch 1
        original_init(self, dim_in, dim_mid, dim_out, k=k)

    iqeclip.Linear1.__init__ = linear1_init
    ref_clip._MODEL_CKPT_PATHS["ViT-L-14-336"] = str(clip_path)  # patch 3
    state = torch.load(clip_path, map_location="cpu")
    width, embed = state["visual.conv1.weight"].shape[0], state["text_projection"].shape[1]
    text_width = state["ln_final.weight"].shape[0]
    model_configs = {"embed_dim": embed, "vision_cfg": {"image_size": 240, "layers": 4, "width": width, "patch_size": 14},
                     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": 1, "layers": 2}}
    torch.manual_seed(0)
    model = ref_clip.create_model(model_name="ViT-L-14-336", img_size=240, device="cpu", pretrained="openai",
                                  require_pretrained=True, deep_prompt_len=1, total_d_layer_len=1)
    model.eval()
    iqe_clip = iqeclip.IQE_CLIP(model, features_list=FEATURES, model_configs=model_configs, prompt_len=2,
                                iqm_config=str(iqm_path), query_vison=True)
    iqe_clip.eval()
    # The checkpoint loading lines of test_zero.main(), which cannot be called without its data layout.
    ckpt = torch.load(ckpt_path, map_location="cpu")
    iqe_clip.trainable_layer.load_state_dict(ckpt["trainable_linearlayer"], strict=False)
    iqe_clip.New_Lan_Embed.load_state_dict(ckpt["New_Lan_Embed"])
    iqe_clip.iqm.load_state_dict(ckpt["iqm"], strict=False)
    iqe_clip.query_tokens.data.copy_(ckpt["query_tokens"])
    iqe_clip.query_linear.load_state_dict(ckpt["query_linear"])
    test_zero._load_stages(model, ckpt, "prompt")

    # The reference's preprocessing (dataset/medical_zero.py): PIL RGB, bicubic 240, ToTensor.
    xs = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((240, 240), Image.BICUBIC), dtype=np.float32)
                           .transpose(2, 0, 1) / np.float32(255.0)) for p in images]
    x = torch.stack(xs)
    y = torch.tensor([i % 2 for i in range(len(xs))])
    mask = torch.zeros(len(xs), 1, 240, 240)
    mask[1::2, :, 100:140, 100:140] = 1
    captured: dict[str, list] = {"concat": [], "filter_in": [], "filter_out": []}
    real_np = test_zero.np

    class NpProxy:
        def __getattr__(self, name):
            return getattr(real_np, name)

        @staticmethod
        def concatenate(arrays, axis=0):
            out = real_np.concatenate(arrays, axis=axis)
            captured["concat"].append(out.copy())
            return out

    def gaussian_capture(a, **kw):
        from scipy.ndimage import gaussian_filter

        captured["filter_in"].append(np.array(a, copy=True))
        out = gaussian_filter(a, **kw)
        captured["filter_out"].append(out.copy())
        return out

    test_zero.np = NpProxy()
    test_zero.gaussian_filter = gaussian_capture
    args = argparse.Namespace(img_size=240, use_global=True, obj="Brain")
    logger = types.SimpleNamespace(info=lambda *a, **k: None)
    test_zero.test(args, iqe_clip, [(x, y, mask)], FEATURES, logger)
    # concatenations in test(), in order: masks, map_text (raw), map_query (new), score_query (new), score_text (raw)
    _, raw_maps, new_maps, new_scores, raw_scores = captured["concat"][:5]
    assert np.allclose(captured["filter_in"][0], 0.2 * raw_maps + 0.8 * new_maps), "capture order changed"
    return {"score_query": new_scores, "score_text": raw_scores,
            "map": captured["filter_in"][0], "map_smooth": captured["filter_out"][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="checkout of hongh0/IQE-CLIP")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "fixtures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    clip_path, ckpt_path, iqm_path, images = write_inputs(args.out)
    got = run_reference(args.reference.resolve(), clip_path, ckpt_path, iqm_path, images)
    np.savez_compressed(args.out / "golden.npz", paths=np.array([p.name for p in images]),
                        **{k: np.asarray(v, np.float32) for k, v in got.items()})
    (args.out / "PROVENANCE.json").write_text(json.dumps(
        {"reference": "https://github.com/hongh0/IQE-CLIP", "commit": REFERENCE_COMMIT,
         "script": "tests/golden/make_golden.py", "torch": torch.__version__, "seed": SEED,
         "patches": ["Linear1 accepts in_channel", "torchvision/kornia stubbed (unused imports)",
                     "_MODEL_CKPT_PATHS points at the tiny CLIP file"]}, indent=2) + "\n")
    print(f"wrote golden fixtures to {args.out}")


if __name__ == "__main__":
    main()
