"""Shared fixtures: tiny models and reference-format files written from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iqe.model.config import load_config
from iqe.model.iqe import IQEModel

REPO = Path(__file__).resolve().parents[1]


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial random values (no identity LayerNorms, no zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("prompt_temp"):
                p.fill_(float(np.log(1 / 0.07)) + 0.1)
            elif p.ndim == 1 and ("ln" in name or "LayerNorm" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def tiny_model() -> IQEModel:
    torch.manual_seed(0)
    return randomize_(IQEModel(load_config("tiny")), seed=1).eval()


def write_test_images(folder: Path, seed: int = 0) -> list[Path]:
    """A few deterministic 8-bit images of different sizes and modes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w, mode) in enumerate([(240, 240, "L"), (300, 260, "L"), (97, 131, "RGB"), (512, 384, "RGB")]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = 120 + 60 * np.sin(xx / (7 + i)) * np.cos(yy / 11) + rng.normal(0, 10, (h, w))
        base[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 6) ** 2] += 70
        arr = np.clip(base, 0, 255).astype(np.uint8)
        if mode == "RGB":
            arr = np.stack([arr, np.roll(arr, 5, axis=1), 255 - arr], axis=2)
        p = folder / f"img_{i}.png"
        Image.fromarray(arr, mode=mode).save(p)
        paths.append(p)
    return paths
