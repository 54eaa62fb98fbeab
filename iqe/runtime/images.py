"""Plain image files (PNG/JPEG/BMP/TIFF) -> model inputs.

8-bit modes go straight to `pil_to_tensor_array`, exactly like `iqe.model.preprocess.load_image`.
For 16-bit, 32-bit and float modes (which ``convert('RGB')`` would clip) the values are
mapped to 0..255 first through the one intensity formula (`iqe.runtime.transforms.voi_to_uint8`):
min..max of the frame as a plain range, or the ``"*"`` override window, then the same PIL path.
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image

from iqe.model.preprocess import pil_to_tensor_array
from iqe.runtime.items import FILE_ERRORS, SliceItem, Source, describe, to_model_input, window_for
from iqe.runtime.transforms import Window, range_window

HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # PIL modes convert('RGB') would clip
MIN_MAX = (0.0, 100.0)  # percentiles meaning plain min-max


def iter_image(source: Source, size: int, windows: Mapping[str, Window],
               skip: Container[str] = ()) -> Iterator[SliceItem]:
    """One item per frame (pages of a multi-page TIFF); decoding problems become error items."""
    path = source.path
    try:
        im = Image.open(path)
    except FILE_ERRORS as exc:
        yield SliceItem(str(path), source.name, None, error=f"{path}: cannot decode image ({describe(exc)})",
                        file=str(path))
        return
    with im:
        try:
            frames = getattr(im, "n_frames", 1)
        except FILE_ERRORS as exc:
            yield SliceItem(str(path), source.name, None, error=f"{path}: cannot decode image ({describe(exc)})",
                            file=str(path))
            return
        for frame in range(frames):
            key, index = (str(path), None) if frames == 1 else (f"{path}#{frame}", frame)
            if key in skip:  # done in an earlier run
                yield SliceItem(key, source.name, index, file=str(path))
                continue
            meta: dict[str, Any] = {"format": im.format, "frames": frames}
            try:
                im.seek(frame)
                im.load()
                meta["mode"] = im.mode  # pages of a TIFF may differ
                if im.mode in HIGH_BIT_MODES:
                    override, label = window_for("", windows)
                    pixels = np.asarray(im)
                    if override is None:  # min..max as a plain range
                        image, meta["window"] = _min_max_input(pixels, size)
                    else:
                        image, meta["window"] = to_model_input(pixels, override, label or "", "MONOCHROME2", size)
                else:
                    image = pil_to_tensor_array(im, size)
            except FILE_ERRORS as exc:
                yield SliceItem(key, source.name, index, error=f"{key}: cannot decode image ({describe(exc)})",
                                meta=meta, file=str(path))
                continue
            yield SliceItem(key, source.name, index, image=image, meta=meta, file=str(path))


def _min_max_input(pixels: np.ndarray, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    finite = pixels[np.isfinite(pixels)] if pixels.dtype.kind == "f" else pixels
    window = range_window(float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return to_model_input(pixels, window, "min-max", "MONOCHROME2", size, function="LINEAR_EXACT")
