"""A small synthetic data set in the BMAD folder layout, for tests and the demo.

Each object gets an organ-like grayscale image (Brain: skull ring around a textured
interior; Liver: a lobed blob in the abdomen; Retina: curved layered bands; Chest: two
dark lungs beside a bright mediastinum; Histopathology: nuclei on a bright background)
with per-image jitter of shape and intensity, a smooth intensity field and mild noise.
Abnormal (``Ungood``) images carry 1-3 bright or dark irregular lesions inside the
organ; their masks mark exactly the changed pixels. Every image draws from its own RNG,
seeded by (seed, object, split, class, index), so a file does not change when the
counts of other splits or objects change.

Nothing here resembles patient data; the images only need to be learnable in a quick
training demo and to exercise every code path that reads BMAD folders.
"""

from __future__ import annotations

import difflib
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from iqe.errors import InputError
from iqe.model.data import (
    ABNORMAL_DIR,
    BMAD_OBJECTS,
    IMAGE_DIR,
    MASK_DIR,
    NORMAL_DIR,
    SPLITS,
    object_has_masks,
)

DEFAULT_OBJECTS = ("Brain", "Liver", "Retina_RESC", "Chest")
DEFAULT_COUNTS = {"train": 8, "valid": 8, "test": 12}  # images per class (good / Ungood) and split
REFERENCE_SIZE = 240  # lesion radii and noise scales are stated at this side length
LESION_RADIUS = (8.0, 30.0)  # px at REFERENCE_SIZE
LESION_CONTRAST = (55.0, 85.0)  # gray levels added or removed; organ texture spans about +-25
MIN_LESION_AREA = 40.0  # px at REFERENCE_SIZE: a lesion clipped to the organ must stay a blob

_LOBE_STEPS = 1024

Organ = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise of unit-ish amplitude: `cells` x `cells` normals, bicubic upsampled."""
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.BICUBIC))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _lobe_curve(rng: np.random.Generator, orders: Sequence[int], amp: tuple[float, float]) -> np.ndarray:
    """Radial scale 1 + sum_k a_k cos(k phi + p_k), tabulated over phi in [-pi, pi).

    A table lookup per pixel is several times cheaper than cosines per pixel, and
    `_LOBE_STEPS` steps are far finer than a pixel on any outline drawn here.
    """
    phi = np.linspace(-np.pi, np.pi, _LOBE_STEPS, endpoint=False)
    curve = np.ones(_LOBE_STEPS)
    for k in orders:
        curve += rng.uniform(*amp) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return curve.astype(np.float32)


def _ellipse_radius(
    yy: np.ndarray,
    xx: np.ndarray,
    centre: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    lobes: np.ndarray | None = None,
) -> np.ndarray:
    """Normalised radius of every pixel: < 1 inside the (optionally lobed) rotated ellipse.

    Args:
        yy, xx: pixel coordinates (same shape).
        centre: (y, x) of the centre.
        radii: (y, x) semi-axes before rotation.
        angle: rotation in radians.
        lobes: a `_lobe_curve` table that scales the outline with the polar angle.
    """
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    dx, dy = xx - np.float32(centre[1]), yy - np.float32(centre[0])
    u = (dx * c + dy * s) / np.float32(radii[1])
    v = (dy * c - dx * s) / np.float32(radii[0])
    r = np.sqrt(u * u + v * v)
    if lobes is None:
        return r
    # arctan2 is the costly step, so only lobed outlines pay for it.
    index = ((np.arctan2(v, u) + np.float32(np.pi)) * np.float32(_LOBE_STEPS / (2 * np.pi))).astype(np.intp)
    return r / lobes[index % _LOBE_STEPS]


def _brain(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size)
    r, _ = _ellipse_radius(
        yy,
        xx,
        size * (0.5 + rng.uniform(-0.03, 0.03)),
        size * (0.5 + rng.uniform(-0.03, 0.03)),
        size * rng.uniform(0.39, 0.44),
        size * rng.uniform(0.31, 0.36),
        rng.uniform(-0.15, 0.15),
    )
    texture = _smooth_noise(rng, size, max(4, size // 12))
    field = _smooth_noise(rng, size, 4)
    img = np.full((size, size), 8.0, dtype=np.float32)
    interior = r < 0.94
    img[interior] = (rng.uniform(95, 120) + 12 * field + 14 * texture)[interior]
    skull = (r >= 0.96) & (r < 1.06)
    img[skull] = rng.uniform(200, 225) + 8 * field[skull]
    return img, r < 0.8


def _liver(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size)
    body, _ = _ellipse_radius(yy, xx, size * 0.5, size * 0.5, size * 0.4, size * 0.47, 0.0)
    r, phi = _ellipse_radius(
        yy,
        xx,
        size * (0.45 + rng.uniform(-0.04, 0.04)),
        size * (0.45 + rng.uniform(-0.04, 0.04)),
        size * rng.uniform(0.26, 0.31),
        size * rng.uniform(0.3, 0.36),
        rng.uniform(-0.3, 0.3),
    )
    r = r / _lobes(rng, phi, (2, 3, 4), (0.03, 0.09))
    texture = _smooth_noise(rng, size, max(4, size // 10))
    field = _smooth_noise(rng, size, 4)
    img = np.zeros((size, size), dtype=np.float32)
    img[body < 1] = (rng.uniform(55, 70) + 8 * texture)[body < 1]
    liver = r < 1
    img[liver] = (rng.uniform(125, 150) + 12 * field + 10 * texture)[liver]
    return img, r < 0.8


def _retina(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size)
    x = xx[0] / size - 0.5
    # Curved, gently waving layer boundaries, top to bottom (OCT B-scan look).
    top = size * (rng.uniform(0.27, 0.34) + rng.uniform(0.1, 0.25) * x**2) + size * 0.02 * np.sin(
        2 * np.pi * x * rng.uniform(0.5, 1.5) + rng.uniform(0, 2 * np.pi)
    )
    thickness = size * rng.uniform(0.05, 0.09, size=5)
    levels = rng.uniform(-12, 12, size=5) + np.array([175.0, 95.0, 135.0, 80.0, 205.0])
    texture = _smooth_noise(rng, size, max(4, size // 8))
    img = (18 + 6 * texture).astype(np.float32)  # vitreous
    upper = np.broadcast_to(top, (size, size))
    for thick, level in zip(thickness, levels):
        lower = upper + thick
        band = (yy >= upper) & (yy < lower)
        img[band] = (level + 12 * texture)[band]
        upper = lower
    img[yy >= upper] = (55 + 15 * texture)[yy >= upper]  # choroid
    margin = 0.015 * size
    return img, (yy >= top + margin) & (yy < upper - margin)


def _chest(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size)
    field = _smooth_noise(rng, size, 4)
    texture = _smooth_noise(rng, size, max(4, size // 10))
    body, _ = _ellipse_radius(yy, xx, size * 0.55, size * 0.5, size * 0.55, size * 0.46, 0.0)
    img = np.full((size, size), 10.0, dtype=np.float32)
    img[body < 1] = (rng.uniform(140, 165) + 10 * field)[body < 1]
    mediastinum = np.abs(xx - size * 0.5) < size * 0.06
    img[mediastinum & (body < 1)] += 35
    lungs = np.zeros((size, size), dtype=bool)
    region = np.zeros((size, size), dtype=bool)
    for side in (-1, 1):
        r, phi = _ellipse_radius(
            yy,
            xx,
            size * (0.5 + rng.uniform(-0.02, 0.02)),
            size * (0.5 + side * rng.uniform(0.19, 0.23)),
            size * rng.uniform(0.28, 0.33),
            size * rng.uniform(0.12, 0.15),
            side * rng.uniform(0.0, 0.15),
        )
        r = r / _lobes(rng, phi, (2, 3), (0.02, 0.06))
        lungs |= r < 1
        region |= r < 0.78
    img[lungs] = (rng.uniform(45, 65) + 10 * field + 8 * texture)[lungs]
    return img, region


def _histopathology(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    field = _smooth_noise(rng, size, 4)
    nuclei = _smooth_noise(rng, size, max(4, size // 6)) > rng.uniform(1.0, 1.3)
    img = (rng.uniform(185, 205) + 10 * field).astype(np.float32)
    img[nuclei] = rng.uniform(80, 100) + 10 * field[nuclei]
    region = np.zeros((size, size), dtype=bool)
    edge = int(0.1 * size)
    region[edge:-edge, edge:-edge] = True
    return img, region


ORGANS: dict[str, Organ] = {
    "Brain": _brain,
    "Liver": _liver,
    "Retina_RESC": _retina,
    "Retina_OCT2017": _retina,
    "Chest": _chest,
    "Histopathology": _histopathology,
}


def _add_lesions(rng: np.random.Generator, img: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Paint 1-3 non-touching lesions inside `region` in place; return their mask (bool)."""
    size = img.shape[0]
    scale = size / REFERENCE_SIZE
    centres = np.flatnonzero(region)
    mask = np.zeros(img.shape, dtype=bool)
    wanted = int(rng.integers(1, 4))
    placed = 0
    # A few spare tries: a draw may land on an earlier lesion or be clipped too small.
    for _ in range(20 * wanted):
        if placed == wanted:
            break
        cy, cx = divmod(int(rng.choice(centres)), size)
        radius = rng.uniform(*LESION_RADIUS) * scale
        reach = int(np.ceil(radius * 1.5)) + 2
        y0, y1, x0, x1 = max(cy - reach, 0), min(cy + reach, size), max(cx - reach, 0), min(cx + reach, size)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        r, phi = _ellipse_radius(yy, xx, cy, cx, radius * rng.uniform(0.6, 1.0), radius, rng.uniform(0, np.pi))
        r = r / _lobes(rng, phi, (3, 5), (0.04, 0.12))
        blob = (r < 1) & region[y0:y1, x0:x1]
        # Keep a gap to earlier lesions so each connected component is one lesion.
        if blob.sum() < MIN_LESION_AREA * scale**2 or (mask[y0:y1, x0:x1] & (r < 1.4)).any():
            continue
        patch = img[y0:y1, x0:x1]
        base = float(patch[blob].mean())
        delta = rng.choice((-1.0, 1.0)) * rng.uniform(*LESION_CONTRAST)
        if not 20 <= base + delta <= 235:  # no headroom on this side: flip instead of clipping
            delta = -delta
        patch[blob] += delta * (1 + 0.08 * rng.standard_normal(int(blob.sum())).astype(np.float32))
        mask[y0:y1, x0:x1] |= blob
        placed += 1
    if placed == 0:
        raise RuntimeError("synthetic lesion placement failed: organ region too small")  # a bug, not bad input
    return mask


def synth_image(
    obj: str, abnormal: bool, rng: np.random.Generator, size: int = REFERENCE_SIZE
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw one synthetic image of `obj`.

    Args:
        obj: a BMAD object name (see `ORGANS`).
        abnormal: add lesions and return their mask.
        rng: the image's own generator.
        size: side length in pixels.

    Returns:
        ``(image, mask)``: uint8 [size, size]; mask uint8 0/255 for abnormal images, else None.
    """
    img, region = ORGANS[obj](rng, size)
    img = img * np.float32(rng.uniform(0.92, 1.08)) + np.float32(rng.uniform(-6, 6))
    mask = _add_lesions(rng, img, region) if abnormal else None
    img += rng.normal(0.0, rng.uniform(2.5, 5.0), size=img.shape).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, None if mask is None else mask.astype(np.uint8) * 255


def _check_objects(objects: Sequence[str]) -> list[str]:
    if isinstance(objects, str):
        objects = [objects]
    if not objects:
        raise InputError(f"objects: empty; choose from {', '.join(BMAD_OBJECTS)}")
    out: list[str] = []
    for obj in objects:
        if obj not in ORGANS:
            near = difflib.get_close_matches(obj, BMAD_OBJECTS, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise InputError(f"object {obj!r}: unknown; choose from {', '.join(BMAD_OBJECTS)}{hint}")
        if obj in out:
            raise InputError(f"object {obj!r}: listed twice")
        out.append(obj)
    return out


def _check_counts(n_per_class: Mapping[str, int] | None) -> dict[str, int]:
    counts = dict(DEFAULT_COUNTS)
    for split, n in (n_per_class or {}).items():
        if split not in SPLITS:
            raise InputError(f"n_per_class: unknown split {split!r}; use {', '.join(SPLITS)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(f"n_per_class[{split!r}]={n!r}: must be an integer >= 0")
        counts[split] = n
    return counts


def _write_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Level 1: the noisy images barely compress better at higher levels, but encode slower.
    Image.fromarray(array, mode="L").save(path, format="PNG", compress_level=1)


def write_synthetic_bmad(
    out_dir: str | Path,
    objects: Sequence[str] = DEFAULT_OBJECTS,
    n_per_class: Mapping[str, int] | None = None,
    size: int = REFERENCE_SIZE,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic data set in the BMAD folder layout.

    Writes ``<out>/<Obj>_AD/{train,valid,test}/{good,Ungood}/img/*.png`` (``train``:
    ``good`` only, as in BMAD) and, for objects with pixel labels in BMAD (Brain, Liver,
    Retina_RESC), ``<Obj>_AD/{valid,test}/Ungood/anomaly_mask/*.png`` with the image's
    name and values 0/255. Images are 8-bit grayscale PNG named ``good_0000.png`` /
    ``ungood_0000.png``. A ``README.txt`` records layout, seed and counts.

    Args:
        out_dir: destination folder (created if needed).
        objects: BMAD object names to generate; default Brain, Liver, Retina_RESC, Chest.
        n_per_class: images per class and split, e.g. ``{"train": 8, "valid": 8,
            "test": 12}`` (the default); missing keys keep their default.
        size: image side length in pixels (>= 64; lesion sizes scale with it).
        seed: the same seed writes byte-identical files.
        overwrite: replace existing ``<Obj>_AD`` folders of the listed objects; without
            it an existing one is an error.

    Returns:
        `out_dir` as a Path.

    Raises:
        InputError: unknown or repeated object, bad count or size, or an ``<Obj>_AD``
            folder exists and `overwrite` is False.
    """
    out = Path(out_dir)
    objs = _check_objects(objects)
    counts = _check_counts(n_per_class)
    if isinstance(size, bool) or not isinstance(size, int) or size < 64:
        raise InputError(f"size={size!r}: must be an integer >= 64 (lesions are {LESION_RADIUS} px at 240)")
    for obj in objs:
        folder = out / f"{obj}_AD"
        if folder.exists():
            if not overwrite:
                raise InputError(f"{folder}: exists; pass overwrite=True to replace it or choose another folder")
            shutil.rmtree(folder)

    for obj in objs:
        for split_index, split in enumerate(SPLITS):
            # BMAD keeps only normal images for training.
            classes = ((0, NORMAL_DIR),) if split == "train" else ((0, NORMAL_DIR), (1, ABNORMAL_DIR))
            for label, class_dir in classes:
                img_dir = out / f"{obj}_AD" / split / class_dir / IMAGE_DIR
                img_dir.mkdir(parents=True, exist_ok=True)
                for i in range(counts[split]):
                    # Seed by identity, not by position in the loop: counts don't shift other files.
                    rng = np.random.default_rng([seed, BMAD_OBJECTS.index(obj), split_index, label, i])
                    image, mask = synth_image(obj, abnormal=label == 1, rng=rng, size=size)
                    name = f"{class_dir.lower()}_{i:04d}.png"
                    _write_png(image, img_dir / name)
                    if mask is not None and object_has_masks(obj):
                        _write_png(mask, img_dir.parent / MASK_DIR / name)

    _write_readme(out, objs, counts, size, seed)
    return out


def _write_readme(out: Path, objs: list[str], counts: dict[str, int], size: int, seed: int) -> None:
    masked = [o for o in objs if object_has_masks(o)]
    lines = [
        "Synthetic BMAD-layout data set written by iqe.model.synth.write_synthetic_bmad.",
        "Not medical data: organ-like shapes with painted lesions, for tests and demos.",
        "",
        f"seed: {seed}",
        f"size: {size} x {size} px, 8-bit grayscale PNG",
        f"objects: {', '.join(objs)}",
        "images per class (good / Ungood): " + ", ".join(f"{s} {counts[s]}" for s in SPLITS),
        "train/ holds good images only (BMAD convention).",
        "",
        "layout:",
        "  <Obj>_AD/{train,valid,test}/good/img/good_NNNN.png",
        "  <Obj>_AD/{valid,test}/Ungood/img/ungood_NNNN.png",
        "  <Obj>_AD/{valid,test}/Ungood/anomaly_mask/ungood_NNNN.png   0/255, same name as the image",
        f"pixel masks for: {', '.join(masked) if masked else 'none'} (as in BMAD)",
        "",
        "Ungood images hold 1-3 bright or dark lesions inside the organ; the mask marks them.",
    ]
    (out / "README.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
