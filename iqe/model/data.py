"""BMAD data access for training and evaluation (REFERENCE.md §7).

Layout read here (the BMAD benchmark's, which the reference trains on)::

    <root>/<Obj>_AD/{train,valid,test}/{good,Ungood}/img/*.png
    <root>/<Obj>_AD/{valid,test}/Ungood/anomaly_mask/*.png     same names as the images
    <root>/fewshot_seed/<Obj>/<K>-shot.txt                      optional few-shot picks

Only Brain, Liver and Retina_RESC have pixel labels in BMAD; the other objects contribute
image labels only. ``train/`` holds normal images only, so the reference builds its
training sets from the ``valid`` and ``test`` splits:

- zero-shot: leave one data set out; train on the ``test`` splits of all the others,
  one object per batch (`group_batches`);
- few-shot: K normal + K abnormal images from the target's ``valid`` split.
"""

from __future__ import annotations

import difflib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from iqe.errors import InputError
from iqe.model.preprocess import IMAGE_SUFFIXES, load_image, load_mask

logger = logging.getLogger(__name__)

BMAD_OBJECTS = ("Brain", "Liver", "Retina_RESC", "Retina_OCT2017", "Chest", "Histopathology")
MASKED_OBJECTS = frozenset({"Brain", "Liver", "Retina_RESC"})  # the BMAD sets with pixel labels
SPLITS = ("train", "valid", "test")
NORMAL_DIR = "good"
ABNORMAL_DIR = "Ungood"
IMAGE_DIR = "img"
MASK_DIR = "anomaly_mask"
SEED_DIR = "fewshot_seed"


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        image: the image file.
        label: 0 normal (``good``), 1 abnormal (``Ungood``).
        mask: the lesion mask file, None for normal images, objects without pixel labels
            and abnormal images whose mask file is missing.
        obj: the BMAD object (data set) name, e.g. ``"Brain"``.
    """

    image: Path
    label: int
    mask: Path | None
    obj: str

    @property
    def has_mask(self) -> bool:
        """Whether the pixel labels of this image are known.

        Normal images of an object with pixel labels count as known (all zero), as in the
        reference, which applies the segmentation losses to every image of such objects.
        """
        return object_has_masks(self.obj) and (self.label == 0 or self.mask is not None)


def object_has_masks(obj: str) -> bool:
    """Whether `obj` is one of the BMAD data sets with pixel-level lesion masks."""
    return obj in MASKED_OBJECTS


def find_objects(root: str | Path) -> list[str]:
    """Names of the ``<Obj>_AD`` folders under `root`, sorted.

    Raises:
        InputError: `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"{root}: no such data folder (expected the BMAD layout "
            "<Obj>_AD/{train,valid,test}/{good,Ungood}/img/*.png)"
        )
    return sorted(p.name[: -len("_AD")] for p in root.iterdir() if p.is_dir() and p.name.endswith("_AD"))


def _missing_object_message(root: Path, obj: str, present: list[str]) -> str:
    held = ", ".join(f"{o}_AD" for o in present) if present else "no <Obj>_AD folders"
    message = f"{root / f'{obj}_AD'}: no such folder; {root} holds {held}"
    near = difflib.get_close_matches(obj, present, n=1, cutoff=0.6)
    if near:
        message += f"; did you mean {near[0]!r}?"
    return message


def _image_files(folder: Path) -> list[Path]:
    # Other files (thumbnails' .db, .DS_Store, notes) are not samples.
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def list_split(root: str | Path, obj: str, split: str) -> list[Sample]:
    """List one split of one BMAD object: normal images first, then abnormal, each sorted.

    Args:
        root: the folder holding the ``<Obj>_AD`` folders.
        obj: object name, e.g. ``"Brain"``.
        split: ``"train"``, ``"valid"`` or ``"test"``.

    Returns:
        The samples; abnormal images of objects with pixel labels carry their
        ``anomaly_mask`` file of the same name when it exists.

    Raises:
        InputError: unknown split, missing root / object / split folder, or a split
            without any image.
    """
    root = Path(root)
    if split not in SPLITS:
        raise InputError(f"split {split!r}: unknown; choose one of {', '.join(SPLITS)}")
    present = find_objects(root)
    obj_dir = root / f"{obj}_AD"
    if not obj_dir.is_dir():
        raise InputError(_missing_object_message(root, obj, present))
    split_dir = obj_dir / split
    if not split_dir.is_dir():
        held = sorted(p.name for p in obj_dir.iterdir() if p.is_dir())
        raise InputError(f"{split_dir}: no such folder; {obj_dir.name} holds {', '.join(held) or 'nothing'}")

    samples: list[Sample] = []
    missing_masks = 0
    for label, class_dir in ((0, NORMAL_DIR), (1, ABNORMAL_DIR)):
        img_dir = split_dir / class_dir / IMAGE_DIR
        if not img_dir.is_dir():
            # BMAD's train/ has no Ungood folder; an absent class is simply empty.
            continue
        for image in _image_files(img_dir):
            mask = None
            if label == 1 and object_has_masks(obj):
                candidate = split_dir / class_dir / MASK_DIR / image.name
                if candidate.is_file():
                    mask = candidate
                else:
                    missing_masks += 1
            samples.append(Sample(image=image, label=label, mask=mask, obj=obj))
    if not samples:
        raise InputError(
            f"{split_dir}: no images (expected {NORMAL_DIR}/{IMAGE_DIR}/*.png and/or "
            f"{ABNORMAL_DIR}/{IMAGE_DIR}/*.png, suffixes {', '.join(IMAGE_SUFFIXES)})"
        )
    if missing_masks:
        logger.warning(
            "%s: %d abnormal images have no %s file; they get image labels only", split_dir, missing_masks, MASK_DIR
        )
    return samples


def zero_shot_split(root: str | Path, target: str) -> tuple[list[Sample], list[Sample]]:
    """Leave-one-data-set-out split for zero-shot training on `target`.

    Args:
        root: the folder holding the ``<Obj>_AD`` folders.
        target: the held-out object.

    Returns:
        ``(train, val)``: train = the ``test`` splits of every other ``<Obj>_AD`` under
        `root` (as the reference); val = the target's ``valid`` split when present, else
        its ``test`` split (the reference selects on ``test``).

    Raises:
        InputError: the target or another object's split is missing, or no other object
            is present.
    """
    root = Path(root)
    present = find_objects(root)
    if target not in present:
        raise InputError(_missing_object_message(root, target, present))
    others = [o for o in present if o != target]
    if not others:
        raise InputError(
            f"{root}: zero-shot training on {target!r} needs at least one other <Obj>_AD folder "
            f"(leave-one-out); only {target}_AD is present"
        )
    train = [s for o in others for s in list_split(root, o, "test")]
    val_split = "valid" if (root / f"{target}_AD" / "valid").is_dir() else "test"
    return train, list_split(root, target, val_split)


def parse_fewshot_seed(path: str | Path, iteration: int = 0) -> tuple[list[str], list[str]]:
    """Read a reference few-shot seed file (``fewshot_seed/<Obj>/<K>-shot.txt``).

    Lines look like ``n-0: a.png b.png`` (normal picks of iteration 0) and
    ``a-0: c.png d.png`` (abnormal picks).

    Args:
        path: the seed file.
        iteration: which iteration's lines to take.

    Returns:
        ``(normal_names, abnormal_names)`` in file order.

    Raises:
        InputError: the file is unreadable or lacks the iteration's ``n-`` or ``a-`` line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"{path}: cannot read few-shot seed file ({exc})") from None
    picks: dict[str, list[str]] = {}
    for line in lines:
        fields = line.split()
        if fields and fields[0] in (f"n-{iteration}:", f"a-{iteration}:"):
            picks.setdefault(fields[0][0], fields[1:])
    for key, what in (("n", "normal"), ("a", "abnormal")):
        if key not in picks:
            raise InputError(f"{path}: no '{key}-{iteration}:' line ({what} picks of iteration {iteration})")
    return picks["n"], picks["a"]


def few_shot_split(
    root: str | Path, target: str, shots: int, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """K-shot split: K normal + K abnormal images of `target` for training.

    The picks come from the target's ``valid`` split: iteration 0 of
    ``<root>/fewshot_seed/<target>/<K>-shot.txt`` when that file exists (the reference's
    fixed picks), otherwise a ``random.Random(seed)`` sample of the sorted file names.

    Args:
        root: the folder holding the ``<Obj>_AD`` folders.
        target: the object to adapt to.
        shots: K >= 1 (the paper uses 2, 4, 8, 16).
        seed: RNG seed for the picks when there is no seed file.

    Returns:
        ``(train, val)``: train = K abnormal then K normal samples; val = the target's
        ``test`` split.

    Raises:
        InputError: K is not a positive integer, the ``valid`` split has fewer than K
            images of a class, or the seed file names too few or unknown images.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise InputError(f"shots={shots!r}: must be a positive integer (e.g. 2, 4, 8, 16)")
    root = Path(root)
    pool = list_split(root, target, "valid")
    split_dir = root / f"{target}_AD" / "valid"
    by_class = {label: {s.image.name: s for s in pool if s.label == label} for label in (0, 1)}
    for label, class_dir in ((0, NORMAL_DIR), (1, ABNORMAL_DIR)):
        found = len(by_class[label])
        if found < shots:
            raise InputError(
                f"{split_dir / class_dir / IMAGE_DIR}: holds {found} images, {shots}-shot needs {shots}; "
                f"use shots <= {min(len(c) for c in by_class.values())}"
            )

    seed_file = root / SEED_DIR / target / f"{shots}-shot.txt"
    if seed_file.is_file():
        normal_names, abnormal_names = parse_fewshot_seed(seed_file, iteration=0)
        picked: dict[int, list[Sample]] = {}
        for label, names, key in ((0, normal_names, "n"), (1, abnormal_names, "a")):
            if len(names) < shots:
                raise InputError(f"{seed_file}: line {key}-0 lists {len(names)} images, {shots}-shot needs {shots}")
            unknown = [n for n in names[:shots] if n not in by_class[label]]
            if unknown:
                class_dir = NORMAL_DIR if label == 0 else ABNORMAL_DIR
                raise InputError(
                    f"{seed_file}: names {', '.join(unknown)}, not found in {split_dir / class_dir / IMAGE_DIR}"
                )
            # The reference keeps the first K names of the line.
            picked[label] = [by_class[label][n] for n in names[:shots]]
    else:
        rng = random.Random(seed)
        picked = {label: rng.sample(list(by_class[label].values()), shots) for label in (0, 1)}
    return picked[1] + picked[0], list_split(root, target, "test")


class SampleDataset(Dataset):
    """Loads `Sample` lists as the model sees them (REFERENCE.md §1 preprocessing).

    Each item is a dict: ``image`` float32 [3, S, S] in [0, 1], ``label`` float32 scalar,
    ``mask`` float32 [S, S] of 0/1 (zeros when no mask file), ``has_mask`` bool (see
    `Sample.has_mask`), ``path`` str. The default DataLoader collate stacks them.

    Args:
        samples: the images to serve, in order.
        size: side length S after resizing (240 for IQE-CLIP).

    Raises:
        InputError: `size` is not a positive integer.
    """

    def __init__(self, samples: Sequence[Sample], size: int = 240) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InputError(f"size={size!r}: must be a positive integer")
        self.samples = list(samples)
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | bool | str]:
        sample = self.samples[index]
        if sample.mask is not None:
            mask = load_mask(sample.mask, self.size)
        else:
            mask = np.zeros((self.size, self.size), dtype=np.float32)
        return {
            "image": torch.from_numpy(load_image(sample.image, self.size)),
            "label": torch.tensor(float(sample.label), dtype=torch.float32),
            "mask": torch.from_numpy(mask),
            "has_mask": sample.has_mask,
            "path": str(sample.image),
        }


def group_batches(samples: Sequence[Sample], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of indices into `samples`, each drawn from a single object, in shuffled order.

    The zero-shot reference trains on one data set per step (image and pixel losses
    differ between objects with and without masks), so samples are shuffled within each
    object, cut into batches of `batch_size` (the last batch of an object may be
    smaller), and the batches of all objects are shuffled together. Call again with
    another seed (e.g. ``seed + epoch``) for a new order each epoch.

    Args:
        samples: the training samples.
        batch_size: the most samples per batch, >= 1.
        seed: RNG seed; the same seed gives the same batches.

    Returns:
        A list of index lists, usable as a DataLoader ``batch_sampler`` over
        ``SampleDataset(samples)``.

    Raises:
        InputError: `batch_size` is not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: must be a positive integer")
    rng = random.Random(seed)
    by_obj: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        by_obj.setdefault(sample.obj, []).append(index)
    batches: list[list[int]] = []
    # Sorted object order: the result must not depend on the order objects first appear.
    for obj in sorted(by_obj):
        indices = by_obj[obj]
        rng.shuffle(indices)
        batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
    rng.shuffle(batches)
    return batches
