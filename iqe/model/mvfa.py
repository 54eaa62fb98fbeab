"""MVFA (Huang et al., CVPR 2024; reference `MediaBrain-SJTU/MVFA-AD`): model, config, import.

The numerical contract is ../shared/models/MVFA.md (checked against the reference code).
Frozen CLIP ViT (the shared `VisionTransformer`, exact GELU, no mean/std) with two
bottleneck adapters per tapped block (`seg`, `det`: Linear-LeakyReLU, no bias) whose
outputs are written back into the residual stream, `x <- 0.8x + 0.1 seg(x) + 0.1 det(x)`;
the 768-d bottleneck activations are the features. The per-organ text features
(35 templates x state words, averaged) do not depend on the image, so `import_mvfa`
computes them once with the CLIP text tower and stores only `text_features` [E, 2].

Outputs of `MVFAModel.forward` (raw values of the reference, one per branch):
    score_zero [B]      sum over levels of the patch mean of softmax(100 cos(det, T))[:, 1]   (test_zero.py)
    map_zero   [B,S,S]  sum over levels of softmax(bilinear(100 cos(seg, T)))[1]              (test_zero.py)
    map_few    [B,S,S]  sum over levels of bilinear(min over the bank of 1 - cos)             (test_few.py)
    score_few  [B]      pixel mean of map_few (the reference's score on classification sets)
and the fused values `score`, `map` (= `map_smooth`; MVFA does not smooth), `map_max`; see
`MVFAModel.fuse`. Few-shot outputs exist only once a memory bank is stored (`iqe bank`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from iqe.errors import InputError, WeightsError
from iqe.model.config import IQEConfig, JsonConfig, TextConfig, VisionConfig, _from_dict
from iqe.model.layers import LayerNormFp32, Transformer, causal_mask

FAMILY = "mvfa"
LEVEL_MIX = (0.8, 0.1, 0.1)  # x, seg adapter output, det adapter output (adapter.py)
LOGIT_SCALE = 100.0  # fixed temperature of the zero-shot head (not CLIP's logit_scale)
COS_EPS = 1e-8  # utils.cos_sim's norm clamp
# prompt.py REAL_NAME: the organ word put into the prompts.
ORGAN_NAMES = {"Brain": "Brain", "Liver": "Liver", "Retina_RESC": "retinal OCT", "Retina_OCT2017": "retinal OCT",
               "Chest": "Chest X-ray film", "Histopathology": "histopathological image"}
# Data sets with pixel masks (CLASS_INDEX > 0): few-shot uses the seg head and fuses maps.
SEGMENTATION_ORGANS = ("Brain", "Liver", "Retina_RESC")
# utils.encode_text_with_prompt_ensemble: state words and templates.
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a photo of one {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "a low resolution photo of a {}.", "a photo of a large {}.", "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)


@dataclass
class MVFAConfig(JsonConfig):
    name: str = "mvfa-vit-l-14-336"
    image_size: int = 240
    embed_dim: int = 768  # CLIP joint width = adapter bottleneck
    vision: VisionConfig = field(default_factory=VisionConfig)
    features: list[int] = field(default_factory=lambda: [6, 12, 18, 24])  # 1-based blocks with adapters
    organ: str = "Brain"  # reference data set name (Brain, Liver, Retina_RESC, Retina_OCT2017, Chest, Histopathology)
    organ_text: str = "Brain"  # the word in the prompts (REAL_NAME)
    segmentation: bool = True  # pixel-level set: few-shot on the seg head, fused maps; else det head, fused scores
    bank: dict[str, Any] | None = None  # {"shots", "rows", "head", "support": [{"file", "sha256"}]} after `iqe bank`
    # Min-max constants of the fusion, per branch: maps on segmentation sets, image scores otherwise.
    fusion_zero: list[float] = field(default_factory=lambda: [0.0, 1.0])
    fusion_few: list[float] = field(default_factory=lambda: [0.0, 1.0])
    fusion_source: str = "default (identity: no normalisation)"
    chunk_rows: int = 4096  # memory-bank rows per MatMul + ReduceMin chunk

    family: str = dataclasses.field(default=FAMILY, init=False)

    grid = IQEConfig.grid  # same derived sizes as IQE-CLIP's (17 at 240 px / patch 14)
    vision_heads = IQEConfig.vision_heads

    @property
    def bank_rows(self) -> int:
        return int(self.bank["rows"]) if self.bank else 0

    @property
    def bank_head(self) -> str:
        return "seg" if self.segmentation else "det"

    def validate(self) -> "MVFAConfig":
        problems = []
        if self.image_size < self.vision.patch_size:
            problems.append(f"image_size {self.image_size} is smaller than the patch {self.vision.patch_size}")
        if not self.features or any(not 1 <= k <= self.vision.layers for k in self.features):
            problems.append(f"features {self.features} must lie in 1..{self.vision.layers}")
        if sorted(set(self.features)) != list(self.features):
            problems.append(f"features {self.features} must be increasing")
        for key in ("fusion_zero", "fusion_few"):
            lo, hi = getattr(self, key)
            if not hi > lo:
                problems.append(f"{key} must be [min, max] with max > min, got {[lo, hi]}")
        if self.bank is not None and int(self.bank.get("rows", 0)) < 1:
            problems.append("bank.rows must be positive")
        if self.chunk_rows < 1:
            problems.append("chunk_rows must be positive")
        if problems:
            raise InputError(f"config '{self.name}': " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"family": data.pop("family"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MVFAConfig":
        data = {k: v for k, v in data.items() if k != "family"}
        vision = data.pop("vision", None)
        cfg = _from_dict(cls, data, "config")
        if vision is not None:
            if not isinstance(vision, dict):
                raise InputError("config.vision: expected an object")
            cfg.vision = _from_dict(VisionConfig, vision, "config.vision")
        return cfg.validate()


class ClipAdapter(nn.Module):
    """h = LeakyReLU(W1 x), y = LeakyReLU(W2 h); returns (h, y). Key names as the reference's."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(width, bottleneck, bias=False), nn.LeakyReLU())
        self.fc2 = nn.Sequential(nn.Linear(bottleneck, width, bias=False), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc1(x)
        return h, self.fc2(h)


def normalize_rows(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """x / ||x|| over the last axis; with `eps` the norm is clamped from below (utils.cos_sim)."""
    n = x.norm(dim=-1, keepdim=True)
    return x / (n if eps is None else n.clamp(min=eps))


def nearest_distance(tokens: torch.Tensor, bank: torch.Tensor, chunk: int) -> torch.Tensor:
    """min over bank rows of (1 - cos): tokens [B, L, E], L2-normalised bank [N, E] -> [B, L].

    The bank is split into chunks of `chunk` rows (one MatMul + ReduceMin each in ONNX), so
    the similarity block never exceeds B x L x chunk values.
    """
    x = normalize_rows(tokens, COS_EPS)
    best = None
    for start in range(0, bank.shape[0], chunk):
        d = (1 - x @ bank[start:start + chunk].transpose(0, 1)).amin(dim=-1)
        best = d if best is None else torch.minimum(best, d)
    assert best is not None
    return best


class MVFAModel(nn.Module):
    """MVFA inference (and training) graph; see the module docstring for the outputs."""

    def __init__(self, cfg: MVFAConfig):
        super().__init__()
        from iqe.model.clip import VisionTransformer

        cfg.validate()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)  # duck-typed config: vision, grid, features, vision_heads, embed_dim
        w, e, k = cfg.vision.width, cfg.embed_dim, len(cfg.features)
        self.seg_adapters = nn.ModuleList(ClipAdapter(w, e) for _ in range(k))
        self.det_adapters = nn.ModuleList(ClipAdapter(w, e) for _ in range(k))
        self.register_buffer("text_features", torch.zeros(e, 2))  # columns: normal, abnormal
        # T of every reference data set (ORGAN_NAMES order): zero-shot training uses the other organs' prompts.
        self.register_buffer("organ_text_features", torch.zeros(len(ORGAN_NAMES), e, 2))
        if cfg.bank_rows:
            self.register_buffer("bank", torch.zeros(k, cfg.bank_rows, e))  # raw features, CLS rows included

    # -- stages --------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,S,S] -> (seg, det) bottleneck features [K, B, 1+G*G, E], CLS token first."""
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
        seg, det = [], []
        a, b, c = LEVEL_MIX
        last = self.cfg.features[-1]
        for i, block in enumerate(v.transformer.resblocks, start=1):
            x = block(x)
            if i in self.cfg.features:
                k = self.cfg.features.index(i)
                hs, ys = self.seg_adapters[k](x)
                hd, yd = self.det_adapters[k](x)
                x = a * x + b * ys + c * yd
                seg.append(hs)
                det.append(hd)
            if i == last:  # later blocks cannot change any output
                break
        return torch.stack(seg), torch.stack(det)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        """[K, B, L, C] patch values -> [K, B, C, S, S], bilinear with align_corners=True."""
        k, b, n, ch = x.shape
        g, s = self.cfg.grid, self.cfg.image_size
        x = x.permute(0, 1, 3, 2).reshape(k * b, ch, g, g)
        return F.interpolate(x, size=s, mode="bilinear", align_corners=True).view(k, b, ch, s, s)

    def zero_shot(self, seg: torch.Tensor, det: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score_zero [B], map_zero [B,S,S]) from patch features (CLS dropped here)."""
        t = self.text_features.to(det.dtype)
        logits_det = (LOGIT_SCALE * normalize_rows(det[:, :, 1:])) @ t
        score = logits_det.softmax(dim=-1)[..., 1].mean(dim=-1).sum(dim=0)
        logits_seg = (LOGIT_SCALE * normalize_rows(seg[:, :, 1:])) @ t
        maps = self._upsample(logits_seg).softmax(dim=2)[:, :, 1].sum(dim=0)  # softmax after upsampling
        return score, maps

    def few_shot(self, feats: torch.Tensor, bank: torch.Tensor | None = None) -> torch.Tensor:
        """map_few [B,S,S] from the bank head's features [K,B,1+G*G,E] (CLS dropped here).

        `bank`: the L2-normalised bank [K, N, E]; default: normalised from the stored one.
        """
        if bank is None:
            bank = normalize_rows(self.bank, COS_EPS)
        dist = torch.stack([nearest_distance(feats[k, :, 1:], bank[k], self.cfg.chunk_rows)
                            for k in range(feats.shape[0])])  # [K, B, L]
        return self._upsample(dist[..., None])[:, :, 0].sum(dim=0)

    def fuse(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add `score`, `map`, `map_smooth`, `map_max` (test_few.py fusion with fixed constants).

        Zero-shot bundle: score = score_zero, map = map_zero. With a bank, on segmentation
        sets map = 0.5 n_zero(map_zero) + 0.5 n_few(map_few) and score = max(map); on
        classification sets score = 0.5 n_zero(score_zero) + 0.5 n_few(score_few) and
        map = map_few. n(x) = (x - min) / (max - min) with the config's fusion constants
        (the reference takes them from the whole test set; here calibration or the user sets them).
        """
        c = self.cfg
        out = dict(out)
        if "map_few" not in out:
            out["score"], out["map"] = out["score_zero"], out["map_zero"]
        else:
            def norm(x: torch.Tensor, r: list[float]) -> torch.Tensor:
                return (x - r[0]) / (r[1] - r[0])

            if c.segmentation:
                out["map"] = 0.5 * norm(out["map_zero"], c.fusion_zero) + 0.5 * norm(out["map_few"], c.fusion_few)
                out["score"] = out["map"].flatten(1).amax(dim=1)
            else:
                out["score"] = 0.5 * norm(out["score_zero"], c.fusion_zero) + 0.5 * norm(out["score_few"], c.fusion_few)
                out["map"] = out["map_few"]
        out["map_smooth"] = out["map"]
        out["map_max"] = out["map"].flatten(1).amax(dim=1)
        return out

    def heads(self, seg: torch.Tensor, det: torch.Tensor, bank: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Raw branch outputs from the encoder's features, in the heads' dtype (float32; float64 for the
        noise-floor run); `bank` as in `few_shot`."""
        dtype = self.text_features.dtype
        seg, det = seg.to(dtype), det.to(dtype)
        score_zero, map_zero = self.zero_shot(seg, det)
        out = {"score_zero": score_zero, "map_zero": map_zero}
        if self.cfg.bank_rows:
            out["map_few"] = self.few_shot(seg if self.cfg.segmentation else det, bank)
            out["score_few"] = out["map_few"].flatten(1).mean(dim=1)
        return out

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """All outputs (see `output_names`) for a batch of preprocessed images."""
        return self.fuse(self.heads(*self.encode(images)))

    def output_names(self) -> tuple[str, ...]:
        few = ("score_few", "map_few") if self.cfg.bank_rows else ()
        return ("score", "score_zero", *few[:1], "map", "map_zero", *few[1:], "map_smooth", "map_max")

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> dict[str, Any]:
        """forward() as float32 NumPy arrays."""
        return {k: v.float().cpu().numpy() for k, v in self.forward(images).items()}


# -- text features --------------------------------------------------------------------------
class _TextTower(nn.Module):
    """OpenAI CLIP text encoder (causal mask, exact GELU, EOT pooling), for import only."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads or cfg.width // 64 or 1)
        self.ln_final = LayerNormFp32(cfg.width)
        self.text_projection = nn.Parameter(torch.zeros(cfg.width, embed_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding
        mask = causal_mask(ids.shape[1], x.dtype, x.device)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection  # EOT has the largest id


def prompt_sentences(organ_text: str) -> tuple[list[str], list[str]]:
    """(normal, abnormal) sentences: every state word in every template (245 and 175)."""
    def expand(states: tuple[str, ...]) -> list[str]:
        return [t.format(s.format(organ_text)) for s in states for t in TEMPLATES]

    return expand(NORMAL_STATES), expand(ABNORMAL_STATES)


@torch.no_grad()
def text_features(tower: _TextTower, organ_text: str, context_length: int) -> torch.Tensor:
    """T [E, 2]: per class, mean of the L2-normalised sentence embeddings, normalised again."""
    from iqe.model.tokenizer import default_tokenizer

    cols = []
    for sentences in prompt_sentences(organ_text):
        ids = torch.tensor(default_tokenizer().tokenize(sentences, context_length))
        emb = normalize_rows(tower(ids))
        mean = emb.mean(dim=0)
        cols.append(mean / mean.norm())
    return torch.stack(cols, dim=1)


# -- import of the reference's files -----------------------------------------------------------
def read_mvfa_checkpoint(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{'seg_adapters': state, 'det_adapters': state} as saved by train_*.py."""
    from iqe.model.reference import load_torch_checkpoint

    ckpt = load_torch_checkpoint(path)
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict) for k in ("seg_adapters", "det_adapters")):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise WeightsError(f"{path}: not an MVFA checkpoint (expected 'seg_adapters' and 'det_adapters' state dicts, "
                           f"found {found})")
    return ckpt


def _level_count(state: dict[str, torch.Tensor]) -> int:
    return len({m.group(1) for key in state if (m := re.match(r"^(\d+)\.", key))})


def import_mvfa(clip_path: str | Path, checkpoint_path: str | Path, organ: str, features: list[int] | None = None,
                image_size: int = 240, organ_text: str | None = None, all_organs: bool = False) -> MVFAModel:
    """Build an MVFAModel from OpenAI CLIP weights + an MVFA adapter checkpoint.

    CLIP weights get the reference's load-time numerics (fp16 rounding, resized positional
    table; shared with the IQE-CLIP import); the text features of `organ` are computed here,
    with `all_organs` also those of the six reference data sets (needed by zero-shot training).
    Raises InputError / WeightsError naming the key on any mismatch.
    """
    from iqe.model.bundle import check_state_dict
    from iqe.model.reference import _FP16_ROUNDED, _count_blocks, read_clip_weights, resize_positional_embedding

    if organ not in ORGAN_NAMES and organ_text is None:
        raise InputError(f"unknown organ '{organ}'; known: {', '.join(ORGAN_NAMES)} (or give --organ-text)")
    clip = {k: v.detach().float() for k, v in read_clip_weights(clip_path).items()}
    clip = {k: (v.half().float() if _FP16_ROUNDED.search(k) else v) for k, v in clip.items()}
    ckpt = read_mvfa_checkpoint(checkpoint_path)
    try:
        vision = VisionConfig(width=clip["visual.conv1.weight"].shape[0],
                              layers=_count_blocks(clip, "visual.transformer.resblocks."),
                              patch_size=clip["visual.conv1.weight"].shape[-1])
        text = TextConfig(width=clip["ln_final.weight"].shape[0], layers=_count_blocks(clip, "transformer.resblocks."),
                          context_length=clip["positional_embedding"].shape[0],
                          vocab_size=clip["token_embedding.weight"].shape[0])
        embed_dim = clip["text_projection"].shape[1]
    except KeyError as exc:
        raise WeightsError(f"{clip_path}: cannot infer the CLIP architecture: missing key {exc}") from None
    levels = _level_count(ckpt["seg_adapters"])
    if features is None:
        features = [6, 12, 18, 24] if vision.layers == 24 else None
        if features is None:
            raise InputError(f"{vision.layers}-block vision tower: give --features (the blocks the adapters sit after)")
    if levels != len(features) or _level_count(ckpt["det_adapters"]) != len(features):
        raise WeightsError(f"{checkpoint_path}: {levels} adapter levels but --features lists {len(features)} blocks "
                           f"({features})")
    cfg = MVFAConfig(name=f"mvfa-{organ}", image_size=image_size, embed_dim=embed_dim, vision=vision,
                     features=list(features), organ=organ, organ_text=organ_text or ORGAN_NAMES[organ],
                     segmentation=organ in SEGMENTATION_ORGANS).validate()
    model = MVFAModel(cfg)
    state: dict[str, torch.Tensor] = {}
    for key, value in clip.items():
        if key == "visual.positional_embedding":
            value = resize_positional_embedding(value, cfg.grid)
        if key.startswith("visual."):
            state[key] = value
    for group in ("seg_adapters", "det_adapters"):
        for key, value in ckpt[group].items():
            state[f"{group}.{key}"] = value.detach().float()
    tower = _TextTower(text, embed_dim)
    text_state = {k: v for k, v in clip.items() if not k.startswith("visual.") and k != "logit_scale"}
    check_state_dict(tower, text_state, f"{clip_path} (text tower)")
    tower.load_state_dict(text_state)
    texts = {*ORGAN_NAMES.values(), cfg.organ_text} if all_organs else {cfg.organ_text}
    by_text = {t: text_features(tower.eval(), t, text.context_length) for t in sorted(texts)}
    state["text_features"] = by_text[cfg.organ_text]
    zeros = torch.zeros_like(state["text_features"])
    state["organ_text_features"] = torch.stack([by_text.get(t, zeros) for t in ORGAN_NAMES.values()])
    check_state_dict(model, state, f"{clip_path} + {checkpoint_path}")
    model.load_state_dict(state)
    return model.eval()


def import_command(args: Any) -> int:
    """`iqe import-reference --family mvfa`: CLIP weights + adapter checkpoint -> bundle."""
    import sys

    from iqe.model.bundle import save_bundle

    model = import_mvfa(args.clip, args.checkpoint, args.organ, args.features, args.image_size, args.organ_text,
                        args.all_organs)
    c = model.cfg
    save_bundle(model, args.out, force=args.force, extra={"imported_from": {"family": FAMILY, "clip": str(args.clip),
                                                           "checkpoint": str(args.checkpoint), "organ": args.organ}})
    print(f"wrote {args.out}: MVFA {c.organ} ('{c.organ_text}', {'segmentation' if c.segmentation else 'classification'}"
          f" set), ViT width {c.vision.width} x {c.vision.layers} blocks, adapters after {c.features}, "
          f"{c.image_size} px; no memory bank yet (`iqe bank`)", file=sys.stderr)
    return 0
