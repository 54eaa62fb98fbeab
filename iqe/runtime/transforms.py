"""Array transforms from decoded pixels to the model input, MONAI style.

Every step is an array transform doing the math, a callable that `monai.transforms.Compose`
accepts. `iqe.runtime.items.to_model_input` applies them top to bottom:

    values (HU, MR signal, 16-bit PNG) -> ScaleToUint8 -> InvertMonochrome1 -> ToModelInput

They do not derive from MONAI's `Transform` (nor have MONAI ``…d`` dictionary twins):
importing MONAI imports torch, and a PNG or DICOM run on ONNX Runtime must start without
it (`iqe score` start-up; MONAI is imported only when a NIfTI file is read).

The model was trained on 8-bit images (PNG) read through PIL, so every source ends the
same way: an 8-bit display image, then the exact PIL path of `iqe.model.preprocess`
(RGB, bicubic resize, /255). All transforms here take NumPy arrays (backend NUMPY).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from iqe.model.preprocess import pil_to_tensor_array

NUMPY = "numpy"  # the value of MONAI's TransformBackends.NUMPY, without importing MONAI (and torch)

Window = tuple[float, float]  # (center, width), in the units of the array it is applied to

DEFAULT_PERCENTILES = (0.5, 99.5)  # robust min-max: ignores the brightest/darkest 0.5 % of pixels


VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # DICOM (0028,1056) VOI LUT Function values


def range_window(lo: float, hi: float) -> Window:
    """The ``LINEAR_EXACT`` window that maps ``lo`` to 0 and ``hi`` to 255 exactly (a plain range)."""
    return (lo + hi) / 2, hi - lo


def voi_to_uint8(values: np.ndarray, window: Window, function: str = "LINEAR") -> np.ndarray:
    """The one intensity formula: a DICOM VOI window (PS3.3 C.11.2.1.2) onto 0..255, rounded to nearest.

    Every path that turns intensities into display values comes here: the file's window,
    ``--window``, the CT default, percentile and min-max ranges, so one centre/width gives
    the same grey levels wherever it came from. The window function itself is highdicom's
    `apply_voi_window` (the one highdicom applies to DICOM frames). ``LINEAR`` (a DICOM
    window: ``[c - w/2, c + w/2 - 1]`` onto the output) needs ``w > 1``; narrower windows
    use ``LINEAR_EXACT`` (``[c - w/2, c + w/2]``), as do plain ranges (`range_window`).
    A width <= 0 (a constant image) gives black, and NaN pixels are black.

    Args:
        values: intensities, any shape and real dtype.
        window: ``(center, width)`` in the units of `values`.
        function: ``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``; anything else is ``LINEAR``.

    Returns:
        uint8 array of the shape of `values`.
    """
    from highdicom.pixels import apply_voi_window  # lazy: keeps `import iqe.runtime` light

    center, width = float(window[0]), float(window[1])
    values = np.asarray(values, dtype=np.float64)
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    function = function if function in VOI_FUNCTIONS else "LINEAR"
    if function == "LINEAR" and width <= 1:
        function = "LINEAR_EXACT"
    finite = np.nan_to_num(values, nan=center - width, posinf=center + width, neginf=center - width)
    with np.errstate(over="ignore"):  # SIGMOID far from the centre: exp overflows to inf, the limit is right
        display = apply_voi_window(finite, window_center=center, window_width=width, voi_lut_function=function,
                                   output_range=(0.0, 255.0), dtype=np.float64)
    return np.rint(np.clip(display, 0.0, 255.0)).astype(np.uint8)


class ScaleToUint8:
    """Map intensities to 8-bit display values through a window (`voi_to_uint8`).

    With a window ``(center, width)`` the DICOM window function `function` (default
    ``LINEAR``, the DICOM formula) maps it onto ``0..255``. Without one, the window is
    the ``percentiles`` range of the image itself (``(0, 100)`` is plain min-max), applied
    as a plain range (``LINEAR_EXACT``: the lower percentile -> 0, the upper -> 255).

    Layout: any shape (HxW, HxWxC, a volume); the window is one for the whole array.
    Backends: NumPy in, NumPy out (float64 math).

    Args:
        window: fixed ``(center, width)``; None derives it from the percentiles.
        percentiles: ``(lower, upper)`` in percent, used when no window is given.
        function: VOI LUT function of a given window.
    """

    backend = [NUMPY]

    def __init__(self, window: Window | None = None, percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
                 function: str = "LINEAR") -> None:
        self.window = window
        self.percentiles = percentiles
        self.function = function

    def window_for(self, img: np.ndarray, window: Window | None = None) -> Window:
        """The ``(center, width)`` that `__call__` applies to `img`.

        Args:
            img: the intensities.
            window: per-call window; None falls back to the instance's, then percentiles.

        Returns:
            ``(center, width)`` as floats.
        """
        window = window if window is not None else self.window
        if window is not None:
            return float(window[0]), float(window[1])
        finite = np.asarray(img, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if finite.size == 0:
            return 0.0, 0.0
        lo, hi = np.percentile(finite, self.percentiles)
        return range_window(float(lo), float(hi))

    def function_for(self, window: Window | None = None, function: str | None = None) -> str:
        """The VOI function `__call__` uses: `function`, else the instance's for a window, else LINEAR_EXACT."""
        if window is None and self.window is None:
            return "LINEAR_EXACT"
        return function or self.function

    def __call__(self, img: np.ndarray, window: Window | None = None, function: str | None = None) -> np.ndarray:
        """Scale `img` to uint8.

        Args:
            img: intensities, any real dtype.
            window: per-call ``(center, width)``, overriding the instance's.
            function: per-call VOI LUT function for that window.

        Returns:
            uint8 array of the same shape.
        """
        return voi_to_uint8(img, self.window_for(img, window), self.function_for(window, function))


class InvertMonochrome1:
    """Invert 8-bit display values of a MONOCHROME1 image (0 = white) to MONOCHROME2.

    DICOM applies the MONOCHROME1 inversion after the VOI window (PS3.3 C.7.6.3.1.2), so
    this runs on the output of `ScaleToUint8`. Any other photometric interpretation passes
    through unchanged.

    Layout: uint8, any shape. Backends: NumPy.
    """

    backend = [NUMPY]

    def __call__(self, img: np.ndarray, photometric: str = "MONOCHROME1") -> np.ndarray:
        """Return ``255 - img`` for MONOCHROME1, else `img`.

        Args:
            img: uint8 display values.
            photometric: the image's (0028,0004) Photometric Interpretation.

        Raises:
            TypeError: `img` is not uint8 (a caller bug: scale first).
        """
        if img.dtype != np.uint8:
            raise TypeError(f"InvertMonochrome1 expects uint8 display values, got {img.dtype}")
        return 255 - img if photometric == "MONOCHROME1" else img


class ToModelInput:
    """8-bit image -> model input through the exact PIL path of the reference.

    ``Image.fromarray`` (HxW -> mode L, HxWx3 -> RGB) then
    `iqe.model.preprocess.pil_to_tensor_array`: ``convert('RGB')``, bicubic resize to
    size x size, /255. An 8-bit PNG decoded to an array and passed here gives the same
    bytes as reading the PNG with `iqe.model.preprocess.load_image`.

    Layout: uint8 HxW or HxWx3 in, float32 [3, size, size] in [0, 1] out. Backends: NumPy.

    Args:
        size: output side length (240 for IQE-CLIP).
    """

    backend = [NUMPY]

    def __init__(self, size: int = 240) -> None:
        self.size = size

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """Convert one image.

        Raises:
            TypeError: `img` is not uint8 HxW / HxWx3 (a caller bug: scale first).
        """
        if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
            raise TypeError(f"ToModelInput expects uint8 HxW or HxWx3, got {img.dtype} {img.shape}")
        return pil_to_tensor_array(Image.fromarray(np.ascontiguousarray(img)), self.size)
