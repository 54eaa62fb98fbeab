"""Array transforms and the display pipeline against analytic cases."""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import Compose
from PIL import Image

from iqe.model.preprocess import pil_to_tensor_array
from iqe.runtime.items import to_model_input
from iqe.runtime.transforms import InvertMonochrome1, ScaleToUint8, ToModelInput


def test_scale_window_is_the_dicom_linear_formula():
    # PS3.3 C.11.2.1.2.1: window 50/100 maps 0..99 onto 0..255: v -> 255 v / 99, clipped, rounded.
    values = np.array([-10.0, 0.0, 25.0, 50.0, 99.0, 100.0, 150.0])
    out = ScaleToUint8(window=(50.0, 100.0))(values)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 0, 64, 129, 255, 255, 255])  # 25*255/99 = 64.4, 50*255/99 = 128.8


def test_full_range_window_of_8_bits_is_the_identity():
    values = np.arange(256, dtype=np.float64)
    np.testing.assert_array_equal(ScaleToUint8(window=(127.5, 255.0), function="LINEAR_EXACT")(values), values)
    np.testing.assert_array_equal(ScaleToUint8(window=(128.0, 256.0))(values), values)  # DICOM's 8-bit full window


def test_scale_percentiles_default_to_robust_min_max():
    values = np.arange(1001, dtype=np.float64)  # percentile p of 0..1000 is 10 p
    scaler = ScaleToUint8()
    assert scaler.window_for(values) == pytest.approx((500.0, 990.0))
    out = scaler(values)
    assert out[0] == 0 and out[5] == 0 and out[-1] == 255 and out[500] == 128


def test_scale_degenerate_and_nan_give_black():
    assert not ScaleToUint8()(np.full((4, 4), 7.0)).any()
    out = ScaleToUint8(window=(0.5, 1.0))(np.array([np.nan, 0.0, 1.0]))
    np.testing.assert_array_equal(out, [0, 0, 255])


def test_display_pipeline_uses_the_item_window_and_records_it():
    values = np.array([[0.0, 60.0, 100.0]])
    image, record = to_model_input(values, (50.0, 100.0), "file window", "MONOCHROME2", 3, function="LINEAR_EXACT")
    expected = pil_to_tensor_array(Image.fromarray(np.array([[0, 153, 255]], np.uint8)), 3)  # 0..100 -> 0..255
    assert image.tobytes() == expected.tobytes()
    assert record == {"center": 50.0, "width": 100.0, "function": "LINEAR_EXACT", "source": "file window"}
    # LINEAR 0/2 maps -1..0 onto 0..255: every value here is 255, then MONOCHROME1 inverts it
    image, record = to_model_input(values, (0.0, 2.0), "override", "MONOCHROME1", 3)
    expected = pil_to_tensor_array(Image.fromarray(255 - np.array([[255, 255, 255]], np.uint8)), 3)
    assert image.tobytes() == expected.tobytes() and record["function"] == "LINEAR"
    values = np.arange(1001, dtype=np.float64)[None]  # no window: the 0.5-99.5 percentile range, 5..995
    _, record = to_model_input(values, None, "percentile", "MONOCHROME2", 3)
    assert (record["center"], record["width"], record["function"]) == (pytest.approx(500.0), pytest.approx(990.0),
                                                                        "LINEAR_EXACT")


def test_invert_monochrome1_only():
    img = np.array([[0, 10], [200, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(InvertMonochrome1()(img, "MONOCHROME1"), 255 - img)
    np.testing.assert_array_equal(InvertMonochrome1()(img, "MONOCHROME2"), img)
    with pytest.raises(TypeError, match="uint8"):
        InvertMonochrome1()(img.astype(np.float32))


@pytest.mark.parametrize("shape", [(37, 53), (37, 53, 3)])
def test_to_model_input_is_the_pil_path(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    expected = pil_to_tensor_array(Image.fromarray(img), 24)
    out = Compose([ToModelInput(24)])(img)  # a plain callable, so MONAI pipelines can use it
    assert out.dtype == np.float32 and out.shape == (3, 24, 24)
    assert out.tobytes() == expected.tobytes()
    with pytest.raises(TypeError, match="uint8 HxW or HxWx3"):
        ToModelInput(24)(img.astype(np.uint16))
