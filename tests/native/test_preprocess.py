"""iqe-native preprocessing vs the Python runtime.

Rules checked here:
- 8-bit PNG (every colour type, bit depth <= 8, interlaced, palette, alpha) and JPEG:
  the model input equals the Python one bit for bit (same decoding, Pillow's resampling
  reproduced with its 22-bit fixed point, pass order and rounding).
- DICOM: every model-input value within one grey level (1/255) of the Python one (the
  window is highdicom's apply_voi_window with its float64 operation order, so they come
  out equal in practice), and the same window record (center, width, function, source).
  The 8-bit display image itself is checked against a plain NumPy recomputation of the
  DICOM PS3.3 window formula.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from PIL import Image

from iqe.model.preprocess import load_image
from iqe.runtime.scoring import iter_input_items
from tests.native.conftest import SIZE, preprocess_native, pydicom_file, write_ct_series

LEVEL = 1 / 255


def python_items(inputs, windows=None) -> list:
    return list(iter_input_items(inputs, SIZE, windows))


def test_resampling_is_pillows_bit_for_bit(native_bin, tmp_path):
    """Grey PNGs of many shapes: up, down, mixed, tall (Pillow's vertical-first order), tiny, no-op."""
    rng = np.random.default_rng(0)
    shapes = [(240, 240), (300, 260), (260, 300), (241, 239), (239, 241), (500, 17), (17, 500), (1000, 999),
              (97, 131), (3, 5), (1, 1), (720, 480), (480, 720), (240, 1000), (1000, 240), (120, 600), (601, 239)]
    shapes += [tuple(int(v) for v in rng.integers(1, 900, 2)) for _ in range(20)]
    folder = tmp_path / "grey"
    folder.mkdir()
    for i, (h, w) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(folder / f"g{i:03d}.png")
    items = preprocess_native(native_bin, [folder], tmp_path / "out")
    assert len(items) == len(shapes)
    for item in items:
        assert item["error"] is None
        np.testing.assert_array_equal(item["image"], load_image(item["key"], SIZE), err_msg=item["key"])


def _png_variants(folder):
    """(name, PIL image) for the PNG colour types and depths PIL reads as 8-bit."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (173, 211, 4), dtype=np.uint8)
    yield "l.png", Image.fromarray(rgba[..., 0]), {}
    yield "rgb.png", Image.fromarray(rgba[..., :3]), {}
    yield "rgba.png", Image.fromarray(rgba), {}
    yield "la.png", Image.fromarray(rgba[..., :2].copy(), "LA"), {}
    yield "p.png", Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=37), {}
    yield "p_trns.png", Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE), {"transparency": 3}
    yield "one_bit.png", Image.fromarray(rgba[..., 0] > 128), {}
    yield "rgb_trns.png", Image.fromarray(rgba[..., :3]), {"transparency": (1, 2, 3)}
    yield "tall.png", Image.fromarray(rng.integers(0, 256, (900, 250, 3), dtype=np.uint8)), {}


def test_8bit_png_and_jpeg_equal_python_bit_for_bit(native_bin, tmp_path):
    folder = tmp_path / "png"
    folder.mkdir()
    for name, im, opts in _png_variants(folder):
        im.save(folder / name, **opts)
    rng = np.random.default_rng(2)
    smooth = np.clip(128 + 60 * np.sin(np.mgrid[0:203, 0:317][1] / 9.0)[..., None] + rng.normal(0, 8, (203, 317, 3)),
                     0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(folder / "colour.jpg", quality=90)
    Image.fromarray(smooth).save(folder / "subsampled.jpg", quality=70, subsampling=2)
    Image.fromarray(smooth[..., 1]).save(folder / "grey.jpeg", quality=85)
    Image.fromarray(smooth).save(folder / "progressive.jpg", quality=80, progressive=True)
    # 16-bit RGB PNG: PIL keeps the high byte (mode RGB).
    with open(folder / "rgb16.png", "wb") as fh:
        import zlib, struct

        h, w = 31, 45
        data = rng.integers(0, 65536, (h, w, 3), dtype=np.uint16).astype(">u2")
        raw = b"".join(b"\0" + data[y].tobytes() for y in range(h))
        chunk = lambda t, b: struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b) & 0xFFFFFFFF)
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                 + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    native = preprocess_native(native_bin, [folder], tmp_path / "out")
    python = python_items([folder])
    assert [i["key"] for i in native] == [i.key for i in python]
    for n, p in zip(native, python):
        assert n["error"] is None and p.error is None, (n["error"], p.error)
        np.testing.assert_array_equal(n["image"], p.image, err_msg=n["key"])


def test_16bit_grey_png_min_max_and_override(native_bin, tmp_path):
    values = np.random.default_rng(3).integers(100, 40000, (64, 80), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "s16.png")
    for windows, flags in [(None, []), ({"*": (20000.0, 10000.0)}, ["--window", "20000,10000"])]:
        out = tmp_path / f"out{len(flags)}"
        (native,) = preprocess_native(native_bin, [tmp_path / "s16.png"], out, *flags)
        (python,) = python_items([tmp_path / "s16.png"], windows)
        np.testing.assert_array_equal(native["image"], python.image)
        assert native["extra"]["window"] == python.meta["window"]
        # Independent, plain NumPy: min-max as a plain range; the override as the DICOM LINEAR
        # window (PS3.3 C.11.2.1.2: c - w/2 .. c + w/2 - 1 onto 0..255).
        x = values.astype(np.float64)
        if windows is None:
            scaled = (x - values.min()) / (float(values.max()) - float(values.min())) * 255
        else:
            assert native["extra"]["window"]["function"] == "LINEAR"
            scaled = ((x - (20000 - 0.5)) / (10000 - 1) + 0.5) * 255
        expect = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(native["display"], expect)


def _dicom_cases(folder):
    """DICOM files covering the window rules, MONOCHROME1, multi-frame, colour and rescale."""
    ct = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    mr = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ct.save_as(folder / "ct_default_window.dcm")
    mr.save_as(folder / "mr_file_window.dcm")
    no_window = copy.deepcopy(mr)
    del no_window.WindowCenter, no_window.WindowWidth
    no_window.SOPInstanceUID = no_window.SeriesInstanceUID = pydicom.uid.generate_uid()
    no_window.save_as(folder / "mr_percentile.dcm")
    win = copy.deepcopy(ct)
    win.WindowCenter, win.WindowWidth = 60, 300
    win.SOPInstanceUID = pydicom.uid.generate_uid()
    win.SeriesInstanceUID = pydicom.uid.generate_uid()
    win.save_as(folder / "ct_file_window.dcm")
    sig = copy.deepcopy(win)
    sig.VOILUTFunction = "SIGMOID"
    sig.SOPInstanceUID = sig.SeriesInstanceUID = pydicom.uid.generate_uid()
    sig.save_as(folder / "ct_sigmoid.dcm")
    m1 = copy.deepcopy(no_window)
    m1.PhotometricInterpretation = "MONOCHROME1"
    m1.SOPInstanceUID = m1.SeriesInstanceUID = pydicom.uid.generate_uid()
    m1.save_as(folder / "mr_monochrome1.dcm")
    rescaled = copy.deepcopy(mr)
    rescaled.RescaleSlope, rescaled.RescaleIntercept = 0.5, -7.25
    rescaled.Modality = "DX"
    rescaled.SOPInstanceUID = rescaled.SeriesInstanceUID = pydicom.uid.generate_uid()
    rescaled.save_as(folder / "dx_rescaled.dcm")
    multi = copy.deepcopy(mr)
    frames = np.stack([mr.pixel_array, mr.pixel_array[::-1], mr.pixel_array[:, ::-1] // 2])
    multi.NumberOfFrames = 3
    multi.PixelData = frames.astype(mr.pixel_array.dtype).tobytes()
    multi.SOPInstanceUID = multi.SeriesInstanceUID = pydicom.uid.generate_uid()
    multi.save_as(folder / "mr_multiframe.dcm")
    rgb = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    colour = np.random.default_rng(4).integers(0, 256, (rgb.Rows, rgb.Columns, 3), dtype=np.uint8)
    rgb.PhotometricInterpretation, rgb.SamplesPerPixel, rgb.PlanarConfiguration = "RGB", 3, 0
    rgb.BitsAllocated = rgb.BitsStored = 8
    rgb.HighBit, rgb.PixelRepresentation = 7, 0
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        delattr(rgb, keyword)
    rgb.PixelData = colour.tobytes()
    rgb.SOPInstanceUID = rgb.SeriesInstanceUID = pydicom.uid.generate_uid()
    rgb.save_as(folder / "rgb.dcm")


@pytest.mark.parametrize("flags, windows", [([], None), (["--window", "CT=50,350", "--window", "MR=800,1200"],
                                                         {"CT": (50.0, 350.0), "MR": (800.0, 1200.0)})])
def test_dicom_within_one_grey_level_of_python(native_bin, tmp_path, flags, windows):
    folder = tmp_path / "dicom"
    folder.mkdir()
    _dicom_cases(folder)
    write_ct_series(folder / "series", [10.0, 0.0, 5.0, 2.5])
    write_ct_series(folder / "sagittal", [-3.0, 4.0, 1.0], seed=1, sagittal=True)
    native = preprocess_native(native_bin, [folder], tmp_path / "out", *flags)
    python = python_items([folder], windows)
    assert [i["key"] for i in native] == [i.key for i in python]
    assert len(native) == 9 + 2 + 4 + 3  # 9 single files (one with 3 frames) + 4 axial + 3 sagittal slices
    for n, p in zip(native, python):
        assert n["error"] is None and p.error is None, (n["key"], n["error"], p.error)
        assert np.abs(n["image"] - p.image).max() <= LEVEL + 1e-6, n["key"]
        assert n["extra"]["window"] == p.meta["window"], n["key"]
        for key in ("modality", "SOPInstanceUID", "InstanceNumber"):
            assert n["extra"].get(key) == p.meta.get(key), (n["key"], key)
        assert n["extra"].get("slice_position") == pytest.approx(p.meta.get("slice_position"), abs=1e-9)


def test_dicom_display_follows_the_window_rules(native_bin, tmp_path):
    """The 8-bit display images against plain NumPy (CT default range window, MONOCHROME1, percentiles)."""
    folder = tmp_path / "dicom"
    folder.mkdir()
    _dicom_cases(folder)
    by_name = {i["key"].rsplit("/", 1)[-1]: i for i in preprocess_native(native_bin, [folder], tmp_path / "out")}
    ct = pydicom.dcmread(folder / "ct_default_window.dcm")
    hu = ct.pixel_array.astype(np.float64) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    # The CT default 40/400 is a DICOM LINEAR window like any other.
    expect = np.rint(np.clip(((hu - 39.5) / 399 + 0.5) * 255, 0, 255))
    assert np.abs(by_name["ct_default_window.dcm"]["display"] - expect).max() <= 1
    mr = pydicom.dcmread(folder / "mr_percentile.dcm").pixel_array.astype(np.float64)
    lo, hi = np.percentile(mr, (0.5, 99.5))
    expect = np.rint(np.clip((mr - lo) / (hi - lo) * 255, 0, 255))
    assert np.abs(by_name["mr_percentile.dcm"]["display"] - expect).max() <= 1
    np.testing.assert_array_equal(by_name["mr_monochrome1.dcm"]["display"], 255 - by_name["mr_percentile.dcm"]["display"])
    # The DICOM LINEAR file window (PS3.3 C.11.2.1.2), c=60, w=300, straight onto 0..255.
    x = hu
    lin = np.where(x <= 60 - 0.5 - 299 / 2, 0, np.where(x > 60 - 0.5 + 299 / 2, 255, ((x - 59.5) / 299 + 0.5) * 255))
    assert np.abs(by_name["ct_file_window.dcm"]["display"] - np.rint(lin)).max() <= 1


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_implicit.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "SC_rgb_small_odd.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm",
                                  "GDCMJ2K_TextGBR.dcm", "SC_rgb_gdcm_KY.dcm"])
def test_dicom_transfer_syntaxes_equal_python(native_bin, tmp_path, name):
    """DCMTK's decoders (RLE, JPEG, JPEG-LS), OpenJPEG (JPEG 2000, lossless and lossy, YBR_RCT) and the
    uncompressed encodings give Python's model input."""
    path = pydicom_file(name)
    native = preprocess_native(native_bin, [path], tmp_path / "out")
    python = python_items([path])
    assert [i["key"] for i in native] == [i.key for i in python]
    for n, p in zip(native, python):
        assert n["error"] is None and p.error is None, (n["error"], p.error)
        assert np.abs(n["image"] - p.image).max() <= LEVEL + 1e-6


def test_truncated_images_name_the_item_like_python(native_bin, tmp_path):
    """The reason after the prefix is the decoder's own (PIL's vs libpng's/libjpeg's wording)."""
    image = np.random.default_rng(5).integers(0, 256, (100, 120), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "ok.png")
    Image.fromarray(image).save(tmp_path / "ok.jpg")
    for name in ("ok.png", "ok.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
    inputs = [tmp_path / "cut_ok.png", tmp_path / "cut_ok.jpg"]
    native = preprocess_native(native_bin, inputs, tmp_path / "out")
    for n, p in zip(native, python_items(inputs)):
        prefix = f"{n['key']}: cannot decode image ("
        assert n["error"].startswith(prefix) and p.error.startswith(prefix), (n["error"], p.error)


def test_enhanced_multiframe_functional_groups_like_python(native_bin, tmp_path):
    """Per-frame rescale and window, shared orientation, frames ordered along the normal (not as stored)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    mr = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds = copy.deepcopy(mr)
    frames = np.stack([mr.pixel_array, mr.pixel_array[::-1], mr.pixel_array[:, ::-1] // 2])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.astype(mr.pixel_array.dtype).tobytes()
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)

    def group(**sequences):
        item = Dataset()
        for name, attrs in sequences.items():
            inner = Dataset()
            for k, v in attrs.items():
                setattr(inner, k, v)
            setattr(item, name, Sequence([inner]))
        return item

    per_frame = []
    for f, (z, slope) in enumerate([(5.0, 1.0), (-5.0, 2.0), (0.0, 0.5)]):  # stored order is not volume order
        groups = {"PlanePositionSequence": {"ImagePositionPatient": [0.0, 0.0, z]},
                  "PixelValueTransformationSequence": {"RescaleSlope": slope, "RescaleIntercept": -3.0 * f,
                                                       "RescaleType": "US"}}
        if f == 1:
            groups["FrameVOILUTSequence"] = {"WindowCenter": 900.0, "WindowWidth": 1200.0}
        per_frame.append(group(**groups))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.SharedFunctionalGroupsSequence = Sequence([group(
        PlaneOrientationSequence={"ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]})])
    ds.SOPInstanceUID = ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "enhanced.dcm")

    native = preprocess_native(native_bin, [tmp_path / "enhanced.dcm"], tmp_path / "out")
    python = python_items([tmp_path / "enhanced.dcm"])
    assert [i["key"] for i in native] == [i.key for i in python]
    assert [i.key.rsplit("#", 1)[1] for i in python] == ["1", "2", "0"]  # z = -5, 0, 5
    for n, p in zip(native, python):
        assert n["error"] is None and p.error is None, (n["key"], n["error"], p.error)
        assert np.abs(n["image"] - p.image).max() <= LEVEL + 1e-6, n["key"]
        assert n["extra"]["window"] == p.meta["window"], n["key"]
        assert n["extra"]["frame"] == p.meta["frame"]
        assert n["extra"].get("slice_position") == pytest.approx(p.meta.get("slice_position"), abs=1e-9)
    assert native[0]["extra"]["window"]["source"] == "file window (LINEAR)"  # frame 1's own window
