"""Synthetic BMAD data: layout, masks, determinism and visible lesions."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from iqe.errors import InputError
from iqe.model.synth import DEFAULT_COUNTS, write_synthetic_bmad

SMALL = {"train": 2, "valid": 3, "test": 4}
OBJECTS = ("Brain", "Liver", "Retina_RESC", "Chest", "Histopathology")
MASKED = {"Brain", "Liver", "Retina_RESC"}  # BMAD's pixel-labelled sets, stated independently of the code


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_bmad(tmp_path_factory.mktemp("synth") / "data", objects=OBJECTS, n_per_class=SMALL, seed=3)


def test_layout_and_counts(small_set: Path) -> None:
    assert sorted(p.name for p in small_set.iterdir() if p.is_dir()) == sorted(f"{o}_AD" for o in OBJECTS)
    for obj in OBJECTS:
        base = small_set / f"{obj}_AD"
        # BMAD convention: train/ holds normal images only.
        assert _names(base / "train") == ["good"]
        assert len(_names(base / "train" / "good" / "img")) == SMALL["train"]
        for split in ("valid", "test"):
            assert _names(base / split) == ["Ungood", "good"]
            assert len(_names(base / split / "good" / "img")) == SMALL[split]
            assert len(_names(base / split / "Ungood" / "img")) == SMALL[split]
            assert not (base / split / "good" / "anomaly_mask").exists()


def test_images_are_8bit_grayscale(small_set: Path) -> None:
    for path in small_set.rglob("img/*.png"):
        with Image.open(path) as im:
            assert (im.mode, im.size) == ("L", (240, 240)), path


def test_masks_match_ungood_images_of_masked_objects(small_set: Path) -> None:
    for obj in OBJECTS:
        for split in ("valid", "test"):
            ungood = small_set / f"{obj}_AD" / split / "Ungood"
            if obj not in MASKED:
                assert not (ungood / "anomaly_mask").exists(), f"{obj} has no pixel labels in BMAD"
                continue
            assert _names(ungood / "anomaly_mask") == _names(ungood / "img")
            for path in (ungood / "anomaly_mask").iterdir():
                mask = np.asarray(Image.open(path))
                assert mask.dtype == np.uint8 and mask.shape == (240, 240)
                assert set(np.unique(mask)) == {0, 255}, path  # non-empty, binary 0/255


@pytest.mark.parametrize("obj", sorted(MASKED))
def test_lesions_differ_from_their_surroundings(small_set: Path, obj: str) -> None:
    """Each lesion (8-connected mask component) is a blob whose mean intensity is far from
    that of a 3-pixel ring around it; texture and noise stay well below the threshold."""
    min_contrast = 20.0  # gray levels; lesions add or remove 55-85, a ring can straddle layers
    min_area = 40  # pixels: never a speck
    for split in ("valid", "test"):
        ungood = small_set / f"{obj}_AD" / split / "Ungood"
        for mask_path in sorted((ungood / "anomaly_mask").iterdir()):
            image = np.asarray(Image.open(ungood / "img" / mask_path.name), dtype=np.float64)
            labels, count = ndimage.label(np.asarray(Image.open(mask_path)) > 0, structure=np.ones((3, 3)))
            assert 1 <= count <= 3, mask_path
            for component in range(1, count + 1):
                inside = labels == component
                ring = ndimage.binary_dilation(inside, iterations=3) & ~inside
                contrast = abs(image[inside].mean() - image[ring].mean())
                assert inside.sum() >= min_area, f"{mask_path} lesion {component}: {inside.sum()} px"
                assert contrast > min_contrast, f"{mask_path} lesion {component}: contrast {contrast:.1f}"


def test_brain_lesions_are_mostly_bright_and_all_visible() -> None:
    """Brain lesions come in both polarities, most of them hyperintense (the template is windowed
    with headroom above white matter, so a bright lesion is not flipped to dark), each far from
    the tissue around it. Polarity and contrast are measured on the written pixels."""
    from iqe.model.synth import synth_image

    signs, contrasts = [], []
    for i in range(40):
        image, mask = synth_image("Brain", True, np.random.default_rng([11, i]))
        labels, count = ndimage.label(mask > 0, structure=np.ones((3, 3)))
        for component in range(1, count + 1):
            inside = labels == component
            ring = ndimage.binary_dilation(inside, iterations=3) & ~inside
            diff = image[inside].mean() - image[ring].mean()
            signs.append(diff > 0)
            contrasts.append(abs(diff))
    bright = float(np.mean(signs))
    assert 0.55 <= bright <= 0.85, bright  # asked for 70 % bright, 30 % dark
    # 50-100 gray levels above the ring's mean, less a trace of texture and the ring's own spread
    assert np.percentile(contrasts, 5) > 30, sorted(contrasts)[:5]


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"objects": ("Brain", "Chest"), "n_per_class": {"train": 1, "valid": 1, "test": 2}}
    a = _all_files(write_synthetic_bmad(tmp_path / "a", seed=5, **kwargs))
    b = _all_files(write_synthetic_bmad(tmp_path / "b", seed=5, **kwargs))
    c = _all_files(write_synthetic_bmad(tmp_path / "c", seed=6, **kwargs))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in images)


def test_files_do_not_depend_on_other_counts(tmp_path: Path) -> None:
    small = write_synthetic_bmad(tmp_path / "s", objects=("Liver",), n_per_class={"train": 1, "valid": 1, "test": 1})
    large = write_synthetic_bmad(
        tmp_path / "l", objects=("Liver", "Brain"), n_per_class={"train": 3, "valid": 2, "test": 2}
    )
    for name, data in _all_files(small / "Liver_AD").items():
        assert (large / "Liver_AD" / name).read_bytes() == data, name


def test_default_counts_and_speed(tmp_path: Path) -> None:
    start = time.perf_counter()
    root = write_synthetic_bmad(tmp_path / "d")
    elapsed = time.perf_counter() - start
    expected = ["Brain_AD", "Chest_AD", "Liver_AD", "README.txt", "Retina_RESC_AD"]
    assert sorted(p.name for p in root.iterdir()) == expected
    for split, n in DEFAULT_COUNTS.items():
        assert len(list((root / "Brain_AD" / split / "good" / "img").iterdir())) == n
    # About 2 s on a 2-core CPU; the margin absorbs a busy CI machine.
    assert elapsed < 10, f"default data set took {elapsed:.1f} s"


def test_readme_records_seed_and_counts(small_set: Path) -> None:
    text = (small_set / "README.txt").read_text()
    assert "seed: 3" in text
    assert "train 2, valid 3, test 4" in text
    assert "Brain, Liver, Retina_RESC" in text


def test_smaller_size_scales(tmp_path: Path) -> None:
    counts = {"train": 0, "valid": 0, "test": 2}
    root = write_synthetic_bmad(tmp_path / "s", objects=("Brain",), n_per_class=counts, size=96)
    mask_dir = root / "Brain_AD" / "test" / "Ungood" / "anomaly_mask"
    for path in mask_dir.iterdir():
        mask = np.asarray(Image.open(path))
        assert mask.shape == (96, 96) and mask.any()


def test_existing_folder_needs_overwrite(tmp_path: Path) -> None:
    kwargs = {"objects": ("Chest",), "n_per_class": {"train": 1, "valid": 1, "test": 1}}
    write_synthetic_bmad(tmp_path, **kwargs)
    stray = tmp_path / "Chest_AD" / "test" / "good" / "img" / "stray.png"
    stray.write_bytes(b"")
    with pytest.raises(InputError, match=r"Chest_AD: exists; pass overwrite=True"):
        write_synthetic_bmad(tmp_path, **kwargs)
    write_synthetic_bmad(tmp_path, overwrite=True, **kwargs)
    assert not stray.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objects": ("Brian",)}, r"object 'Brian': unknown; choose from Brain, .*did you mean 'Brain'\?"),
        ({"objects": ("Brain", "Brain")}, r"object 'Brain': listed twice"),
        ({"objects": ()}, r"objects: empty"),
        ({"n_per_class": {"tset": 3}}, r"unknown split 'tset'; use train, valid, test"),
        ({"n_per_class": {"test": -1}}, r"n_per_class\['test'\]=-1: must be an integer >= 0"),
        ({"size": 32}, r"size=32: must be an integer >= 64"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        write_synthetic_bmad(tmp_path, **kwargs)
