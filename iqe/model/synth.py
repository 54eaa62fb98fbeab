"""A small synthetic data set in the BMAD folder layout, for tests and the demo.

Each object gets an organ-like grayscale image (Brain: an axial slice of the MNI152
ICBM 2009a T1 template -- real anatomy, shipped as a small derived array in
``iqe/data/mni152_slices.npz``, see ``iqe/data/MNI152_LICENSE.txt`` -- resampled with a
random pose, intensity curve and bias field; Liver: a lobed blob in the abdomen; Retina: curved layered bands; Chest: two
dark lungs beside a bright mediastinum; Histopathology: nuclei on a bright background)
with per-image jitter of shape and intensity, a smooth intensity field and mild noise.
Abnormal (``Ungood``) images carry 1-3 bright or dark irregular lesions inside the
organ (Brain: inside the grey/white matter, of widely varied size, contrast and shape);
their masks mark exactly the changed pixels. Every image draws from its own RNG,
seeded by (seed, object, split, class, index), so a file does not change when the
counts of other splits or objects change.

Nothing here resembles patient data; the images only need to be learnable in a quick
training demo and to exercise every code path that reads BMAD folders.
"""

from __future__ import annotations

import difflib
import functools
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

import iqe

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
LESION_RADIUS = (12.0, 34.0)  # px at REFERENCE_SIZE
LESION_CONTRAST = (55.0, 85.0)  # lesion level minus the tissue mean under it; texture spans about +-25
# Brain lesions vary more (size, contrast, polarity, shape) so the demo's scores spread.
BRAIN_LESION_RADIUS = (8.0, 30.0)
BRAIN_LESION_CONTRAST = (50.0, 100.0)
BRAIN_DARK_FRACTION = 0.3  # the rest are hyperintense (enhancing / T1-bright lesions)
BRAIN_WINDOW = 0.7  # template gray levels scaled by this: white matter ~165, leaving room for bright lesions
MNI_SLICES = Path(iqe.__file__).parent / "data" / "mni152_slices.npz"
MNI_PARENCHYMA = 128  # grey + white matter probability (0..255 each) above which a pixel is brain tissue
MIN_LESION_AREA = 40.0  # px at REFERENCE_SIZE: a lesion clipped to the organ must stay a blob

_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)

Organ = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise of unit-ish amplitude: `cells` x `cells` normals, bicubic upsampled."""
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.BICUBIC))


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (float32), shared between images, hence read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


Lobes = tuple[tuple[int, float, float], ...]  # (order k, amplitude a_k, phase p_k) terms


def _draw_lobes(rng: np.random.Generator, orders: Sequence[int], amp: tuple[float, float]) -> Lobes:
    """Random terms of the outline scale 1 + sum_k a_k cos(k phi + p_k) (see `_ellipse_radius`)."""
    return tuple((k, rng.uniform(*amp), rng.uniform(0, 2 * np.pi)) for k in orders)


def _ellipse_radius(
    yy: np.ndarray,
    xx: np.ndarray,
    centre: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    lobes: Lobes = (),
) -> np.ndarray:
    """Normalised radius of every pixel: < 1 inside the (optionally lobed) rotated ellipse.

    Args:
        yy, xx: pixel coordinates (same shape).
        centre: (y, x) of the centre.
        radii: (y, x) semi-axes before rotation.
        angle: rotation in radians.
        lobes: `_draw_lobes` terms that scale the outline with the polar angle phi.
    """
    # Few, reused temporaries: fresh full-frame arrays cost page faults that outweigh
    # the arithmetic at this image size.
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - np.float32(centre[1]), yy - np.float32(centre[0])
    u = dx * np.float32(c / radii[1])
    u += dy * np.float32(s / radii[1])
    v = dy * np.float32(c / radii[0])
    v -= dx * np.float32(s / radii[0])
    r = np.hypot(u, v)
    if not lobes:
        return r
    # cos(k phi), sin(k phi) by complex powers of (u + iv) / r: a few multiplies per
    # pixel instead of arctan2 and cosines, the slowest steps of drawing an image.
    norm = np.maximum(r, np.float32(1e-6))
    cos1, sin1 = np.divide(u, norm, out=u), np.divide(v, norm, out=v)
    terms = {k: (a, p) for k, a, p in lobes}
    scale = np.ones_like(r)
    cos_k, sin_k = cos1, sin1
    for k in range(1, max(terms) + 1):
        if k > 1:
            cos_k, sin_k = cos_k * cos1 - sin_k * sin1, cos_k * sin1 + sin_k * cos1
        if k in terms:
            a, p = terms[k]
            scale += np.float32(a * np.cos(p)) * cos_k
            scale -= np.float32(a * np.sin(p)) * sin_k
    return np.divide(r, scale, out=r)


def _ellipse_map(
    size: int,
    centre: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    lobes: Lobes = (),
    extent: float = 1.1,
) -> np.ndarray:
    """`_ellipse_radius` over the whole image, computed only in the shape's bounding box.

    Pixels whose normalised radius exceeds `extent` may read +inf: callers only compare
    radii below it, and skipping the rest of the frame halves the drawing time.
    """
    # r_lobed < extent needs r < extent * max scale, i.e. distance < max radius times that.
    reach = max(radii) * extent * (1 + sum(abs(a) for _, a, _ in lobes)) + 1
    y0, y1 = max(int(centre[0] - reach), 0), min(int(np.ceil(centre[0] + reach)) + 1, size)
    x0, x1 = max(int(centre[1] - reach), 0), min(int(np.ceil(centre[1] + reach)) + 1, size)
    yy, xx = _grid(size)
    out = np.full((size, size), np.inf, dtype=np.float32)
    out[y0:y1, x0:x1] = _ellipse_radius(yy[y0:y1, x0:x1], xx[y0:y1, x0:x1], centre, radii, angle, lobes)
    return out


@functools.lru_cache(maxsize=8)
def _fixed_ellipse(size: int, centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    """Inside mask of an ellipse that does not vary between images (given as fractions of
    `size`); cached, hence read-only."""
    inside = _ellipse_map(size, (centre[0] * size, centre[1] * size), (radii[0] * size, radii[1] * size), 0.0) < 1
    inside.flags.writeable = False
    return inside


@functools.lru_cache(maxsize=1)
def _mni_slices() -> tuple[np.ndarray, np.ndarray]:
    """(t1 [N, H, W] float32 0..255, parenchyma [N, H, W] float32 0/1), read-only."""
    with np.load(MNI_SLICES) as f:
        t1 = f["t1"].astype(np.float32)
        tissue = np.unpackbits(f["parenchyma"], axis=-1, count=t1.shape[-1]).astype(np.float32)
    t1.flags.writeable = False
    tissue.flags.writeable = False
    return t1, tissue


def derive_mni_slices(t1_nifti: str | Path, gm_nifti: str | Path, wm_nifti: str | Path, out: str | Path = MNI_SLICES,
                      z_range: tuple[int, int, int] = (45, 131, 5)) -> Path:
    """Write the packaged anatomy array from the ICBM 2009a templates (how the shipped file was made).

    The inputs are nilearn's copies (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``,
    1 mm, RAS). Axial slices ``range(*z_range)`` are turned to display orientation (anterior up),
    cropped to the brain's bounding box and stored as uint8 T1 plus a packed bit mask of
    grey + white matter.
    """
    import nibabel as nib

    t1, gm, wm = (np.asarray(nib.load(str(p)).dataobj) for p in (t1_nifti, gm_nifti, wm_nifti))
    zs = list(range(*z_range))
    slices = np.stack([t1[:, :, z].T[::-1] for z in zs])
    tissue = np.stack([(gm[:, :, z].astype(np.int32) + wm[:, :, z] > MNI_PARENCHYMA).T[::-1] for z in zs])
    head = (slices > 10).any(axis=0)
    ys, xs = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    crop = (slice(None), slice(max(ys[0] - 2, 0), ys[-1] + 3), slice(max(xs[0] - 2, 0), xs[-1] + 3))
    out = Path(out)
    np.savez_compressed(out, t1=np.clip(slices[crop], 0, 255).astype(np.uint8),
                        parenchyma=np.packbits(tissue[crop], axis=-1), z=np.array(zs))
    return out


def _brain(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Axial T1 MRI: a template slice (interpolated between two stored ones) in a random pose.

    Subject-like variation: rotation +-12 deg, scale, shift, a gamma curve, a smooth bias field,
    fine texture. The lesion region is grey/white matter away from the brain's edge.
    """
    t1, tissue = _mni_slices()
    n, h, w = t1.shape
    pos = rng.uniform(0, n - 1)
    i, frac = int(pos), np.float32(pos - int(pos))
    j = min(i + 1, n - 1)
    src = (1 - frac) * t1[i] + frac * t1[j]
    src_tissue = (1 - frac) * tissue[i] + frac * tissue[j]
    # Output pixel (r, c) -> source (y, x): rotate and scale about the centres.
    scale = rng.uniform(0.78, 0.92) * size / max(h, w)
    angle = rng.uniform(-0.21, 0.21)
    c, s = np.cos(angle), np.sin(angle)
    matrix = np.array([[c, -s], [s, c]]) / scale
    shift = rng.uniform(-0.04, 0.04, size=2) * size
    offset = np.array([h / 2, w / 2]) - matrix @ (np.array([size / 2, size / 2]) + shift)
    img = ndimage.affine_transform(src, matrix, offset, output_shape=(size, size), order=1, cval=0.0)
    region = ndimage.affine_transform(src_tissue, matrix, offset, output_shape=(size, size), order=1, cval=0.0) > 0.5
    region = ndimage.binary_erosion(region, iterations=max(1, size // 80))
    # Display window with headroom above white matter: a bright lesion keeps its contrast
    # instead of clipping or flipping to dark (parenchyma would otherwise reach 235).
    img = 255.0 * BRAIN_WINDOW * (np.clip(img, 0, 255) / 255.0) ** np.float32(rng.uniform(0.8, 1.25))
    brain = img > 8
    field = 1 + np.float32(0.08) * _smooth_noise(rng, size, 4)
    texture = _smooth_noise(rng, size, max(4, size // 10))
    img = np.where(brain, img * field + 5 * texture, img).astype(np.float32)
    return img, region


def _liver(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Abdominal CT look: a bright lobed liver inside a darker soft-tissue body."""
    body = _fixed_ellipse(size, (0.5, 0.5), (0.4, 0.47))
    r = _ellipse_map(
        size,
        (size * (0.45 + rng.uniform(-0.04, 0.04)), size * (0.45 + rng.uniform(-0.04, 0.04))),
        (size * rng.uniform(0.26, 0.31), size * rng.uniform(0.3, 0.36)),
        rng.uniform(-0.3, 0.3),
        _draw_lobes(rng, (2, 3, 4), (0.03, 0.09)),
    )
    texture = _smooth_noise(rng, size, max(4, size // 10))
    field = _smooth_noise(rng, size, 4)
    img = np.zeros((size, size), dtype=np.float32)
    img[body] = (rng.uniform(55, 70) + 8 * texture)[body]
    liver = r < 1
    img[liver] = (rng.uniform(125, 150) + 12 * field + 10 * texture)[liver]
    return img, r < 0.8


def _retina(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """OCT B-scan look: curved, gently waving layers between dark vitreous and choroid."""
    yy, xx = _grid(size)
    x = xx[0] / size - 0.5
    top = size * (rng.uniform(0.2, 0.27) + rng.uniform(0.1, 0.25) * x**2) + size * 0.02 * np.sin(
        2 * np.pi * x * rng.uniform(0.5, 1.5) + rng.uniform(0, 2 * np.pi)
    )
    # Five layers of 8-11 % of the side each: thick enough for a 30 px lesion at 240 px.
    thickness = size * rng.uniform(0.08, 0.11, size=5)
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
    margin = 0.02 * size
    return img, (yy >= top + margin) & (yy < upper - margin)


def _chest(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Chest X-ray look: two dark lobed lungs beside a bright mediastinum."""
    yy, xx = _grid(size)
    field = _smooth_noise(rng, size, 4)
    texture = _smooth_noise(rng, size, max(4, size // 10))
    body = _fixed_ellipse(size, (0.55, 0.5), (0.55, 0.46))
    img = np.full((size, size), 10.0, dtype=np.float32)
    img[body] = (rng.uniform(140, 165) + 10 * field)[body]
    img[body & (np.abs(xx - size * 0.5) < size * 0.06)] += 35  # mediastinum / spine
    lungs = np.zeros((size, size), dtype=bool)
    region = np.zeros((size, size), dtype=bool)
    for side in (-1, 1):
        r = _ellipse_map(
            size,
            (size * (0.5 + rng.uniform(-0.02, 0.02)), size * (0.5 + side * rng.uniform(0.19, 0.23))),
            (size * rng.uniform(0.28, 0.33), size * rng.uniform(0.12, 0.15)),
            side * rng.uniform(0.0, 0.15),
            _draw_lobes(rng, (2, 3), (0.02, 0.06)),
        )
        lungs |= r < 1
        region |= r < 0.78
    img[lungs] = (rng.uniform(45, 65) + 10 * field + 8 * texture)[lungs]
    return img, region


def _histopathology(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stained-slide look: dark nuclei scattered over a bright, uneven background."""
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


def _add_lesions(rng: np.random.Generator, img: np.ndarray, region: np.ndarray,
                 radius_range: tuple[float, float] = LESION_RADIUS,
                 contrast_range: tuple[float, float] = LESION_CONTRAST, dark_fraction: float = 0.0,
                 min_aspect: float = 0.6, max_lobe: float = 0.12, level_from_ring: bool = False,
                 fit_to_room: bool = False) -> np.ndarray:
    """Paint 1-3 non-touching lesions inside `region` in place; return their mask (bool).

    Radii (px at REFERENCE_SIZE) and contrasts are drawn per lesion from the ranges; a
    `dark_fraction` of them are hypointense; a lesion whose contrast does not fit in 20..235
    flips polarity (with `fit_to_room`: only when not even the minimum of `contrast_range`
    fits, else it takes the room there is). Shapes:
    ellipses with axis ratio in [min_aspect, 1] and lobed outlines up to `max_lobe`.
    `level_from_ring`: the contrast is relative to a 3 px ring around the lesion instead of
    the tissue it replaces.
    """
    size = img.shape[0]
    scale = size / REFERENCE_SIZE
    centres = np.flatnonzero(region)
    yy, xx = _grid(size)
    mask = np.zeros(img.shape, dtype=bool)
    wanted = int(rng.integers(1, 4))
    placed = 0
    # A few spare tries: a draw may land on an earlier lesion or be clipped too small.
    for _ in range(20 * wanted):
        if placed == wanted:
            break
        cy, cx = divmod(int(rng.choice(centres)), size)
        radius = rng.uniform(*radius_range) * scale
        reach = int(np.ceil(radius * 1.5)) + 2
        y0, y1, x0, x1 = max(cy - reach, 0), min(cy + reach, size), max(cx - reach, 0), min(cx + reach, size)
        r = _ellipse_radius(
            yy[y0:y1, x0:x1],
            xx[y0:y1, x0:x1],
            (cy, cx),
            (radius * rng.uniform(min_aspect, 1.0), radius),
            rng.uniform(0, np.pi),
            _draw_lobes(rng, (3, 5), (0.04, max_lobe)),
        )
        # Clipping to a non-convex organ (lungs) can split a lesion: keep the part at its centre.
        pieces, _ = ndimage.label((r < 1) & region[y0:y1, x0:x1], structure=_EIGHT_NEIGHBOURS)
        blob = pieces == pieces[cy - y0, cx - x0]
        # Keep a gap to earlier lesions so each connected component is one lesion.
        if blob.sum() < MIN_LESION_AREA * scale**2 or (mask[y0:y1, x0:x1] & (r < 1.4)).any():
            continue
        patch = img[y0:y1, x0:x1]
        base = float(patch[blob].mean())
        if level_from_ring:  # contrast against what surrounds the lesion (tissue varies a lot across a brain)
            ring = ndimage.binary_dilation(blob, iterations=3) & ~blob
            base = float(patch[ring].mean()) if ring.any() else base
        # Hyperintense unless drawn dark (`dark_fraction`).
        delta = rng.uniform(*contrast_range)
        if dark_fraction and rng.uniform() < dark_fraction:  # no extra draw otherwise: keeps other organs' files
            delta = -delta
        if not 20 <= base + delta <= 235:  # no headroom on this side: less contrast, else flip
            room = 235 - base if delta > 0 else base - 20
            delta = float(np.sign(delta)) * room if fit_to_room and room >= contrast_range[0] else -delta
        # A lesion replaces tissue: a level of its own, keeping a trace of the texture under it
        # (adding to it instead lets a lesion across bright and dark layers clip and fade).
        patch[blob] = np.float32(base + delta) + np.float32(0.3) * (patch[blob] - np.float32(base))
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

    Raises:
        InputError: `obj` is not a BMAD object name.
    """
    _check_objects([obj])
    img, region = ORGANS[obj](rng, size)
    img *= np.float32(rng.uniform(0.92, 1.08))
    img += np.float32(rng.uniform(-6, 6))
    if not abnormal:
        mask = None
    elif obj == "Brain":
        mask = _add_lesions(rng, img, region, BRAIN_LESION_RADIUS, BRAIN_LESION_CONTRAST, dark_fraction=BRAIN_DARK_FRACTION,
                            min_aspect=0.4, max_lobe=0.2, level_from_ring=True, fit_to_room=True)
    else:
        mask = _add_lesions(rng, img, region)
    img += np.float32(rng.uniform(2.5, 5.0)) * rng.standard_normal(img.shape, dtype=np.float32)
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
