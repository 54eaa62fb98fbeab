"""The MVFA few-shot memory bank (the `iqe bank` command line is in iqe.model.bank_command).

As the reference builds it (test_few.py, utils.augment; MVFA.md §4): K normal support
images, each augmented 11x (itself; rotations by -pi/8, -pi/16, pi/16, pi/8 and
translations by (+-0.1, +-0.1) in normalised coordinates, both by affine_grid + bilinear
grid_sample with reflection padding; horizontal and vertical flips); every augmented image
contributes the adapter features of all its 1 + G*G tokens, CLS included, in float32, per
level, from the head the organ uses (seg on segmentation sets, det otherwise). The bank is
stored in the bundle's model.safetensors (`bank` [K_levels, 11*K*(1+G*G), E]) and its
provenance (support files and their sha256) in config.json, so the engine cache, keyed on
both files, rebuilds when the bank changes. `--calibrate DIR` fits the fusion's min-max
constants on a calibration set (the reference uses the whole test set; see MVFAModel.fuse).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from iqe.errors import InputError

ROTATIONS = (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)
TRANSLATIONS = ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
AUGMENT_FACTOR = 1 + len(ROTATIONS) + len(TRANSLATIONS) + 2


def _warp(images: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """affine_grid + grid_sample (bilinear, reflection padding, align_corners=False) with one 2x3 matrix.

    The matrix is computed in float64 and rounded to float32, as the reference's tensor does.
    """
    mat = torch.tensor(theta, dtype=torch.float64).float()[None].repeat(images.shape[0], 1, 1)
    grid = F.affine_grid(mat, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment(images: torch.Tensor) -> torch.Tensor:
    """[K,3,S,S] -> [11K,3,S,S]: originals, 4 rotations, 4 translations, h-flip, v-flip."""
    out = [images]
    for angle in ROTATIONS:
        c, s = math.cos(angle), math.sin(angle)
        out.append(_warp(images, [[c, -s, 0.0], [s, c, 0.0]]))
    for a, b in TRANSLATIONS:
        out.append(_warp(images, [[1.0, 0.0, a], [0.0, 1.0, b]]))
    out += [images.flip(-1), images.flip(-2)]
    return torch.cat(out)


@torch.no_grad()
def bank_features(model, images: torch.Tensor, batch: int = 8, progress: bool = False) -> torch.Tensor:
    """Bank rows [K_levels, 11*N*(1+G*G), E] (float32) for N preprocessed support images."""
    from tqdm import tqdm

    head = 1 if not model.cfg.segmentation else 0
    aug = augment(images.float())
    parts = []
    for start in tqdm(range(0, len(aug), batch), desc="bank", unit="batch", disable=not progress):
        feats = model.float().eval().encode(aug[start:start + batch])[head]  # [K, b, T, E]
        parts.append(feats.flatten(1, 2))
    return torch.cat(parts, dim=1).contiguous()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def select_support(folder: Path, shots: int, seed_file: Path | None = None, iteration: int = 0) -> list[Path]:
    """The K support images: those a reference seed file names (`n-<it>:` line), else the first K sorted."""
    from iqe.model.preprocess import list_images

    if not folder.is_dir():
        raise InputError(f"{folder}: support folder does not exist")
    files = list_images([folder])
    if seed_file is not None:
        from iqe.model.data import parse_fewshot_seed

        names = parse_fewshot_seed(seed_file, iteration)[0][:shots]
        by_name = {p.name: p for p in files}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise InputError(f"{folder}: support images named in {seed_file} not found: {', '.join(missing)}")
        files = [by_name[n] for n in names]
    if len(files) < shots:
        raise InputError(f"{folder}: {shots} shots asked for, {len(files)} image(s) found")
    return files[:shots]


def with_bank(model, bank: torch.Tensor, support: list[Path], shots: int):
    """A new MVFAModel equal to `model` plus the bank (config records the support set)."""
    from iqe.model.mvfa import MVFAModel

    cfg = dataclasses.replace(model.cfg, bank={
        "shots": shots, "rows": int(bank.shape[1]), "head": model.cfg.bank_head, "augment": f"reference {AUGMENT_FACTOR}x",
        "support": [{"file": p.name, "sha256": sha256_of(p)} for p in support]})
    new = MVFAModel(cfg)
    state = {k: v for k, v in model.state_dict().items() if k != "bank"}
    new.load_state_dict({**state, "bank": bank})
    return new.eval()


@torch.no_grad()
def fit_fusion(model, images: torch.Tensor, source: str, batch: int = 8):
    """Min-max constants of both branches over `images` (maps on segmentation sets, scores otherwise)."""
    zero_key, few_key = ("map_zero", "map_few") if model.cfg.segmentation else ("score_zero", "score_few")
    lo = {zero_key: math.inf, few_key: math.inf}
    hi = {zero_key: -math.inf, few_key: -math.inf}
    for start in range(0, len(images), batch):
        out = model.heads(*model.encode(images[start:start + batch]))
        for k in lo:
            lo[k], hi[k] = min(lo[k], float(out[k].min())), max(hi[k], float(out[k].max()))
    for k in lo:
        if not hi[k] > lo[k]:
            raise InputError(f"calibration set gives a constant {k} ({lo[k]}); use more or different images")
    cfg = dataclasses.replace(model.cfg, fusion_zero=[lo[zero_key], hi[zero_key]], fusion_few=[lo[few_key], hi[few_key]],
                              fusion_source=source)
    new = type(model)(cfg.validate())
    new.load_state_dict(model.state_dict())
    return new.eval()


def _load_images(paths: list[Path], size: int) -> torch.Tensor:
    from iqe.model.preprocess import load_image

    return torch.from_numpy(np.stack([load_image(p, size) for p in paths]))
