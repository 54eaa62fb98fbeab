"""BMAD data access: split listing, zero-/few-shot splits, dataset items, batching."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from iqe.errors import InputError
from iqe.model.data import (
    BMAD_OBJECTS,
    Sample,
    SampleDataset,
    few_shot_split,
    find_objects,
    group_batches,
    list_split,
    parse_fewshot_seed,
    zero_shot_split,
)
from iqe.model.synth import write_synthetic_bmad

COUNTS = {"train": 2, "valid": 5, "test": 3}


@pytest.fixture(scope="module")
def bmad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Brain (pixel labels), Liver (pixel labels) and Chest (image labels only)."""
    return write_synthetic_bmad(
        tmp_path_factory.mktemp("bmad") / "data", objects=("Brain", "Liver", "Chest"), n_per_class=COUNTS
    )


@pytest.fixture
def bmad_copy(bmad: Path, tmp_path: Path) -> Path:
    """A private copy for tests that change the tree."""
    return Path(shutil.copytree(bmad, tmp_path / "data"))


def _files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def test_objects_constant() -> None:
    assert BMAD_OBJECTS == ("Brain", "Liver", "Retina_RESC", "Retina_OCT2017", "Chest", "Histopathology")


def test_find_objects(bmad: Path) -> None:
    assert find_objects(bmad) == ["Brain", "Chest", "Liver"]


def test_list_split_labels_order_and_masks(bmad: Path) -> None:
    samples = list_split(bmad, "Brain", "test")
    good = _files(bmad / "Brain_AD" / "test" / "good" / "img")
    ungood = _files(bmad / "Brain_AD" / "test" / "Ungood" / "img")
    assert [s.image for s in samples] == good + ungood
    assert [s.label for s in samples] == [0] * len(good) + [1] * len(ungood)
    assert all(s.obj == "Brain" for s in samples)
    assert [s.mask for s in samples] == [None] * len(good) + [
        bmad / "Brain_AD" / "test" / "Ungood" / "anomaly_mask" / p.name for p in ungood
    ]
    assert all(s.has_mask for s in samples)  # normal images of a masked object: known all-zero


def test_list_split_object_without_masks(bmad: Path) -> None:
    samples = list_split(bmad, "Chest", "valid")
    assert len(samples) == 2 * COUNTS["valid"]
    assert all(s.mask is None and not s.has_mask for s in samples)


def test_list_split_train_has_only_normals(bmad: Path) -> None:
    samples = list_split(bmad, "Liver", "train")
    assert len(samples) == COUNTS["train"] and {s.label for s in samples} == {0}


def test_missing_mask_file_leaves_image_label_only(bmad_copy: Path) -> None:
    mask_dir = bmad_copy / "Brain_AD" / "valid" / "Ungood" / "anomaly_mask"
    removed = _files(mask_dir)[0]
    removed.unlink()
    sample = next(s for s in list_split(bmad_copy, "Brain", "valid") if s.image.name == removed.name)
    assert sample.label == 1 and sample.mask is None and not sample.has_mask


def test_list_split_skips_non_images(bmad_copy: Path) -> None:
    (bmad_copy / "Liver_AD" / "test" / "good" / "img" / "notes.txt").write_text("x")
    assert len(list_split(bmad_copy, "Liver", "test")) == 2 * COUNTS["test"]


def test_list_split_errors(bmad: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nowhere: no such data folder \(expected the BMAD layout"):
        list_split(tmp_path / "nowhere", "Brain", "test")
    with pytest.raises(InputError, match=r"Retina_RESC_AD: no such folder; .* holds Brain_AD, Chest_AD, Liver_AD$"):
        list_split(bmad, "Retina_RESC", "test")
    with pytest.raises(InputError, match=r"brain_AD: no such folder; .*did you mean 'Brain'\?"):
        list_split(bmad, "brain", "test")
    with pytest.raises(InputError, match=r"split 'val': unknown; choose one of train, valid, test"):
        list_split(bmad, "Brain", "val")
    empty = tmp_path / "empty"
    (empty / "Brain_AD" / "test").mkdir(parents=True)
    with pytest.raises(InputError, match=r"Brain_AD/valid: no such folder; Brain_AD holds test"):
        list_split(empty, "Brain", "valid")
    with pytest.raises(InputError, match=r"Brain_AD/test: no images"):
        list_split(empty, "Brain", "test")
    with pytest.raises(InputError, match=r"holds no <Obj>_AD folders"):
        list_split(tmp_path, "Brain", "test")


def test_zero_shot_leaves_target_out(bmad: Path) -> None:
    train, val = zero_shot_split(bmad, "Brain")
    assert {s.obj for s in train} == {"Liver", "Chest"}
    # Training uses the others' test splits only (as the reference).
    assert {s.image.parent.parent.parent.name for s in train} == {"test"}
    assert len(train) == 2 * 2 * COUNTS["test"]
    assert {(s.obj, s.image.parent.parent.parent.name) for s in val} == {("Brain", "valid")}
    assert len(val) == 2 * COUNTS["valid"]


def test_zero_shot_validates_on_test_without_valid(bmad_copy: Path) -> None:
    shutil.rmtree(bmad_copy / "Chest_AD" / "valid")
    _, val = zero_shot_split(bmad_copy, "Chest")
    assert {s.image.parent.parent.parent.name for s in val} == {"test"}
    assert len(val) == 2 * COUNTS["test"]


def test_zero_shot_errors(bmad: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "lonely"
    shutil.copytree(bmad / "Brain_AD", lonely / "Brain_AD")
    with pytest.raises(InputError, match=r"needs at least one other <Obj>_AD folder .*only Brain_AD is present"):
        zero_shot_split(lonely, "Brain")
    with pytest.raises(InputError, match=r"Liver_AD: no such folder; .* holds Brain_AD"):
        zero_shot_split(lonely, "Liver")


def test_few_shot_picks_k_plus_k_from_valid(bmad: Path) -> None:
    train, val = few_shot_split(bmad, "Liver", shots=2, seed=0)
    assert [s.label for s in train] == [1, 1, 0, 0]
    assert len({s.image for s in train}) == 4
    assert {s.image.parent.parent.parent.name for s in train} == {"valid"}
    assert all(s.mask is not None for s in train if s.label == 1)
    assert val == list_split(bmad, "Liver", "test")


def test_few_shot_is_seed_deterministic(bmad: Path) -> None:
    picks = {seed: [s.image.name for s in few_shot_split(bmad, "Brain", 2, seed=seed)[0]] for seed in range(6)}
    assert picks[0] == [s.image.name for s in few_shot_split(bmad, "Brain", 2, seed=0)[0]]
    assert len({tuple(p) for p in picks.values()}) > 1  # 100 possible picks: six seeds cannot all agree


def test_few_shot_all_images(bmad: Path) -> None:
    train, _ = few_shot_split(bmad, "Chest", shots=COUNTS["valid"])
    assert sorted(s.image for s in train) == sorted(s.image for s in list_split(bmad, "Chest", "valid"))


def test_few_shot_errors(bmad: Path) -> None:
    with pytest.raises(InputError, match=r"holds 5 images, 6-shot needs 6; use shots <= 5"):
        few_shot_split(bmad, "Brain", 6)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(InputError, match=r"must be a positive integer"):
            few_shot_split(bmad, "Brain", bad)  # type: ignore[arg-type]


def _write_seed_file(root: Path, obj: str, shots: int, text: str) -> Path:
    path = root / "fewshot_seed" / obj / f"{shots}-shot.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_parse_fewshot_seed(tmp_path: Path) -> None:
    path = tmp_path / "2-shot.txt"
    path.write_text("a-0: x.png y.png\nn-0: p.png q.png\na-1: z.png w.png\nn-1: r.png s.png")
    assert parse_fewshot_seed(path) == (["p.png", "q.png"], ["x.png", "y.png"])
    assert parse_fewshot_seed(path, iteration=1) == (["r.png", "s.png"], ["z.png", "w.png"])
    with pytest.raises(InputError, match=r"no 'n-2:' line \(normal picks of iteration 2\)"):
        parse_fewshot_seed(path, iteration=2)
    with pytest.raises(InputError, match=r"cannot read few-shot seed file"):
        parse_fewshot_seed(tmp_path / "missing.txt")


def test_few_shot_follows_seed_file(bmad_copy: Path) -> None:
    good = [p.name for p in _files(bmad_copy / "Brain_AD" / "valid" / "good" / "img")]
    ungood = [p.name for p in _files(bmad_copy / "Brain_AD" / "valid" / "Ungood" / "img")]
    # Iteration 1 lines come first: only iteration 0 counts, and extra names beyond K are ignored.
    _write_seed_file(
        bmad_copy,
        "Brain",
        2,
        f"a-1: {ungood[0]} {ungood[1]}\nn-1: {good[0]} {good[1]}\n"
        f"a-0: {ungood[4]} {ungood[2]} {ungood[0]}\nn-0: {good[3]} {good[1]}\n",
    )
    for seed in (0, 1):  # the file wins over the seed
        train, _ = few_shot_split(bmad_copy, "Brain", 2, seed=seed)
        assert [(s.image.name, s.label) for s in train] == [(ungood[4], 1), (ungood[2], 1), (good[3], 0), (good[1], 0)]
    assert all(s.mask is not None and s.mask.name == s.image.name for s in train if s.label == 1)


def test_few_shot_seed_file_errors(bmad_copy: Path) -> None:
    good = [p.name for p in _files(bmad_copy / "Brain_AD" / "valid" / "good" / "img")]
    ungood = [p.name for p in _files(bmad_copy / "Brain_AD" / "valid" / "Ungood" / "img")]
    _write_seed_file(bmad_copy, "Brain", 2, f"a-0: {ungood[0]} nope.png\nn-0: {good[0]} {good[1]}\n")
    with pytest.raises(InputError, match=r"2-shot.txt: names nope.png, not found in .*valid/Ungood/img"):
        few_shot_split(bmad_copy, "Brain", 2)
    _write_seed_file(bmad_copy, "Brain", 2, f"a-0: {ungood[0]} {ungood[1]}\nn-0: {good[0]}\n")
    with pytest.raises(InputError, match=r"2-shot.txt: line n-0 lists 1 images, 2-shot needs 2"):
        few_shot_split(bmad_copy, "Brain", 2)


def test_sample_dataset_items(bmad: Path) -> None:
    samples = list_split(bmad, "Brain", "valid")
    dataset = SampleDataset(samples, size=240)
    assert len(dataset) == len(samples)
    normal, abnormal = dataset[0], dataset[len(samples) - 1]

    # Independent truth: the PNG files read with PIL (240 px, so no resize is involved).
    pixels = np.asarray(Image.open(samples[-1].image), dtype=np.float32) / 255
    truth_mask = (np.asarray(Image.open(samples[-1].mask)) > 127).astype(np.float32)
    assert abnormal["image"].dtype == torch.float32 and abnormal["image"].shape == (3, 240, 240)
    for channel in range(3):
        np.testing.assert_allclose(abnormal["image"][channel].numpy(), pixels, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(abnormal["mask"].numpy(), truth_mask)
    assert abnormal["label"].dtype == torch.float32 and abnormal["label"].shape == () and abnormal["label"] == 1
    assert abnormal["has_mask"] is True and abnormal["path"] == str(samples[-1].image)

    assert normal["label"] == 0 and normal["has_mask"] is True
    assert normal["mask"].shape == (240, 240) and not normal["mask"].any()


def test_sample_dataset_resizes_and_unmasked(bmad: Path) -> None:
    item = SampleDataset(list_split(bmad, "Chest", "test"), size=64)[-1]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (64, 64)
    assert item["label"] == 1 and item["has_mask"] is False and not item["mask"].any()
    with pytest.raises(InputError, match=r"size=0: must be a positive integer"):
        SampleDataset([], size=0)


def _fake_samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(Path(f"{obj}_{i}.png"), i % 2, None, obj) for obj, n in counts.items() for i in range(n)]


def test_group_batches_one_object_per_batch() -> None:
    counts = {"Brain": 7, "Liver": 5, "Chest": 1}
    samples = _fake_samples(counts)
    batches = group_batches(samples, batch_size=3, seed=0)
    flat = sorted(i for batch in batches for i in batch)
    assert flat == list(range(len(samples)))  # every sample exactly once
    assert all(len({samples[i].obj for i in batch}) == 1 for batch in batches)
    assert all(1 <= len(batch) <= 3 for batch in batches)
    # ceil(7/3) + ceil(5/3) + ceil(1/3): a partial batch per object, never mixed.
    assert len(batches) == 3 + 2 + 1


def test_group_batches_seeded_shuffle() -> None:
    samples = _fake_samples({"Brain": 12, "Liver": 12, "Chest": 12})
    assert group_batches(samples, 4, seed=1) == group_batches(samples, 4, seed=1)
    assert group_batches(samples, 4, seed=1) != group_batches(samples, 4, seed=2)
    # Object order of the input does not matter, only the seed.
    reordered = sorted(samples, key=lambda s: s.obj)
    by_image = [[samples[i].image for i in b] for b in group_batches(samples, 4, seed=3)]
    assert by_image == [[reordered[i].image for i in b] for b in group_batches(reordered, 4, seed=3)]
    # Batches of different objects interleave rather than coming object by object.
    objs = [samples[b[0]].obj for b in group_batches(samples, 4, seed=1)]
    assert objs != sorted(objs)
    with pytest.raises(InputError, match=r"batch_size=0: must be a positive integer"):
        group_batches(samples, 0, seed=0)


def test_group_batches_drive_a_dataloader(bmad: Path) -> None:
    train, _ = zero_shot_split(bmad, "Chest")
    loader = DataLoader(SampleDataset(train, size=32), batch_sampler=group_batches(train, 4, seed=0))
    seen = 0
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 32, 32)
        assert len({Path(p).parts[-5] for p in batch["path"]}) == 1  # <Obj>_AD of every image
        assert batch["has_mask"].dtype == torch.bool
        seen += len(batch["path"])
    assert seen == len(train)
