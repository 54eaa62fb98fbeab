"""Heatmap overlay PNGs: the input in gray with the anomaly map blended in colour."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from iqe.atomic import atomic_open

# Anchor colours of a perceptually ordered dark-to-bright map (inferno-like), interpolated.
_ANCHORS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]],
    dtype=np.float32,
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB [H, W, 3]."""
    v = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (v - lo)[..., None]
    return ((1 - t) * _ANCHORS[lo] + t * _ANCHORS[lo + 1]).astype(np.uint8)


def save_overlay(image: np.ndarray, heatmap: np.ndarray, path: str | Path, vmin: float = 0.0, vmax: float = 1.0,
                 opacity: float = 0.45) -> Path:
    """Blend `heatmap` (scaled from [vmin, vmax] to [0, 1]) over `image` and save a PNG (atomically).

    `iqe score` keeps the default range: maps are anomaly probabilities in [0, 1], so one
    fixed scale makes colours compare across images, series and runs, and each overlay
    is written as soon as its item is scored (nothing held for a study-wide range).

    Args:
        image: model input [3, S, S] or [S, S] in [0, 1].
        heatmap: [S, S] anomaly map.
        path: output PNG path.
        vmin, vmax: colour range; use one range for a whole study so colours compare.
        opacity: heatmap weight in the blend.
    """
    gray = image.mean(axis=0) if image.ndim == 3 else image
    base = np.repeat((np.clip(gray, 0, 1) * 255)[..., None], 3, axis=2)
    scaled = (heatmap - vmin) / max(vmax - vmin, 1e-12)
    blend = (1 - opacity) * base + opacity * colorize(scaled).astype(np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, durable=False) as fh:
        Image.fromarray(blend.clip(0, 255).astype(np.uint8)).save(fh, format="PNG")
    return path


def overlay_name(number: int, key: str) -> str:
    """File name of an item's overlay: running number (so slices of a series sort in order) + its key made safe."""
    base = re.sub(r"\.(png|jpe?g|bmp|tiff?|dcm|nii(\.gz)?)$", "", key.rsplit("/", 1)[-1], flags=re.I)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", base)
    return f"{number:05d}_{stem[-80:]}.png"
