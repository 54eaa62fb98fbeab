"""Which images a calibration uses, and their labels.

`--data` may be:
- a CSV file of ``path,label`` rows (optional header; label 0/1, normal/abnormal,
  good/Ungood; relative paths are relative to the CSV's folder);
- a BMAD root holding ``<Obj>_AD`` folders (``--target`` picks the object, ``--split`` the
  split, default ``valid``);
- a split folder holding the class folders ``good/`` and ``Ungood/`` (images directly
  inside or under ``img/``);
- for ``--normals-only``: also a plain folder of images (all taken as normal).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from iqe.errors import InputError
from iqe.model.data import ABNORMAL_DIR, IMAGE_DIR, NORMAL_DIR, find_objects, list_split
from iqe.model.preprocess import IMAGE_SUFFIXES

_LABEL_WORDS = {"0": 0, "1": 1, "normal": 0, "good": 0, "abnormal": 1, "ungood": 1}


@dataclass
class LabelledSet:
    """Images, their labels (0 normal / 1 abnormal) and a description for calibration.json."""

    paths: list[Path]
    labels: list[int]
    target: str  # the entry key suggested by the data (BMAD object) or "default"
    description: str


def _images_in(folder: Path) -> list[Path]:
    inner = folder / IMAGE_DIR if (folder / IMAGE_DIR).is_dir() else folder
    return sorted(p for p in inner.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_csv(path: Path) -> LabelledSet:
    """Rows ``path,label``; a first row whose label is not a label word is taken as a header."""
    paths, labels = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise InputError(f"{path}:{line_no}: expected 'path,label', got {','.join(row)!r}")
            value = row[1].strip().lower()
            if value not in _LABEL_WORDS:
                if line_no == 1:
                    continue  # header
                raise InputError(f"{path}:{line_no}: label {row[1]!r} is not one of 0, 1, normal, abnormal, good, Ungood")
            image = Path(row[0].strip())
            paths.append(image if image.is_absolute() else path.parent / image)
            labels.append(_LABEL_WORDS[value])
    if not paths:
        raise InputError(f"{path}: no 'path,label' rows")
    return LabelledSet(paths, labels, "default", f"CSV {path} ({len(paths)} rows)")


def read_labelled(data: Path, target: str | None = None, split: str = "valid", normals_only: bool = False) -> LabelledSet:
    """Resolve `--data` into images + labels (see the module docstring).

    Raises:
        InputError: no such path, a folder that matches none of the layouts (listing what it
            holds), unknown target or split.
    """
    if not data.exists():
        raise InputError(f"{data}: no such file or directory")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise InputError(f"{data}: expected a CSV of path,label rows or a folder")
        return read_csv(data)
    objects = find_objects(data)
    if objects:
        if target is None:
            if len(objects) > 1:
                raise InputError(f"{data}: holds {', '.join(o + '_AD' for o in objects)}; pick one with --target")
            target = objects[0]
        samples = list_split(data, target, split)
        return LabelledSet([s.image for s in samples], [s.label for s in samples], target,
                           f"BMAD {data} {target}_AD/{split}")
    children = sorted(p.name for p in data.iterdir() if p.is_dir())
    if NORMAL_DIR in children or ABNORMAL_DIR in children:
        unknown = [c for c in children if c not in (NORMAL_DIR, ABNORMAL_DIR, IMAGE_DIR, "anomaly_mask")]
        if unknown:
            raise InputError(f"{data}: unexpected folder(s) {', '.join(unknown)}; class folders are "
                             f"{NORMAL_DIR}/ and {ABNORMAL_DIR}/")
        paths, labels = [], []
        for label, name in ((0, NORMAL_DIR), (1, ABNORMAL_DIR)):
            if (data / name).is_dir():
                found = _images_in(data / name)
                paths += found
                labels += [label] * len(found)
        return LabelledSet(paths, labels, target or "default", f"class folders {data}/{{{NORMAL_DIR},{ABNORMAL_DIR}}}")
    images = _images_in(data)
    if normals_only and images:
        return LabelledSet(images, [0] * len(images), target or "default", f"folder of normal images {data}")
    held = ", ".join(children[:8]) or "no subfolders"
    raise InputError(f"{data}: no labels found (holds {held}); expected a CSV of path,label, a BMAD root with "
                     f"<Obj>_AD folders, or class folders {NORMAL_DIR}/ and {ABNORMAL_DIR}/"
                     + ("" if normals_only else "; for a folder of normal images use --normals-only"))
