"""Image preprocessing exactly as the reference evaluates (REFERENCE.md §1).

RGB (grayscale replicated) -> PIL bicubic resize to size x size -> divide by 255.
No CLIP mean/std normalisation: the reference never applies it, and adding it
changes every output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from iqe.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def pil_to_tensor_array(image: Image.Image, size: int) -> np.ndarray:
    """Convert a PIL image to the model input layout.

    Args:
        image: any PIL image; converted with ``convert('RGB')`` like the reference.
        size: output side length (240 for IQE-CLIP).

    Returns:
        float32 array [3, size, size] in [0, 1].
    """
    rgb = image.convert("RGB").resize((size, size), Image.BICUBIC)
    # uint8 -> float32 then /255 in float32: the same IEEE operation as torchvision's ToTensor.
    return np.asarray(rgb, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Read an image file and preprocess it (see `pil_to_tensor_array`).

    Raises:
        InputError: the file is missing or is not an image PIL can decode.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return pil_to_tensor_array(im, size)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})") from None


def load_mask(path: str | Path, size: int) -> np.ndarray:
    """Read a lesion mask as the reference does: L mode, nearest resize, binarised at 0.5.

    Returns:
        float32 array [size, size] of 0/1.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            m = im.convert("L").resize((size, size), Image.NEAREST)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: cannot read mask ({exc})") from None
    return (np.asarray(m, dtype=np.float32) / 255.0 > 0.5).astype(np.float32)


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders into a sorted list of image files (folders: recursive).

    Raises:
        InputError: a path does not exist, or a folder holds no images.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{p}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return out
