"""Files and folders -> sources: images, NIfTI, DICOM files, DICOM series, and errors.

Folders are scanned recursively; DICOM files are recognized by content and grouped by
SeriesInstanceUID into series ordered for the volume (position along the slice normal,
else InstanceNumber). Reading pixels is the readers' job (`iqe.runtime.sources.iter_slices`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from iqe.errors import InputError
from iqe.model.preprocess import IMAGE_SUFFIXES
from iqe.runtime.dicom import geometry, instance_number, read_dicom
from iqe.runtime.items import FILE_ERRORS, NIFTI_SUFFIXES, Source, describe, error_source


def discover(inputs: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> list[Source]:
    """Expand files and folders into sources, sorted by path.

    Folders are scanned recursively (hidden files and folders skipped: OS metadata such
    as ``.DS_Store``). Images and NIfTI are recognized by suffix; every other file by
    content: DICOM with a DICM marker, or a raw data set (no preamble, no file meta).
    DICOM files are grouped by SeriesInstanceUID across all inputs: a group of several
    files is one ``dicom_series`` ordered for the volume, a lone file is ``dicom``. A
    file given twice is read once; a second file with the same SOPInstanceUID is an error.

    Args:
        inputs: files and folders.
        exclude: folders whose files are skipped when a folder is scanned (an output folder).

    Returns:
        Sources in deterministic order (by their first file path). Missing paths, empty
        folders and unreadable or unknown files are ``error`` sources, never exceptions.
    """
    sources: list[Source] = []
    candidates: list[Path] = []
    skipped = [Path(x).resolve() for x in exclude]
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                           and not any(f.resolve().is_relative_to(x) for x in skipped))
            if not found:
                sources.append(error_source(p, f"{p}: empty folder (no files to read)"))
            candidates.extend(found)
        elif p.is_file():
            candidates.append(p)
        else:
            sources.append(error_source(p, f"{p}: no such file or folder"))

    seen: set[Path] = set()
    series: dict[str, list[_Member]] = {}
    for f in candidates:
        if (resolved := f.resolve()) in seen:
            continue
        seen.add(resolved)
        if f.name.lower().endswith(NIFTI_SUFFIXES):
            sources.append(Source("nifti", f, (f,)))
        elif f.suffix.lower() in IMAGE_SUFFIXES:
            sources.append(Source("image", f, (f,)))
        else:
            try:
                header = read_dicom(f, header_only=True)
                uid = str(header.get("SeriesInstanceUID", "") or "")
                sop = str(header.get("SOPInstanceUID", "") or "")
                member = _Member(f, sop, geometry(header), instance_number(header))  # the header is not kept
            except InputError as exc:
                sources.append(error_source(f, str(exc)))
                continue
            except FILE_ERRORS as exc:
                sources.append(error_source(f, f"{f}: cannot read DICOM header ({describe(exc)})"))
                continue
            if uid:
                series.setdefault(uid, []).append(member)
            else:
                sources.append(Source("dicom", f, (f,)))
    for uid, members in series.items():
        sources.extend(_series_sources(uid, members))
    return sorted(sources, key=lambda s: (min(str(f) for f in s.files) if s.files else str(s.path), s.kind))


class _Member(NamedTuple):
    """What grouping and ordering need of one DICOM file of a series."""

    path: Path
    sop: str  # SOPInstanceUID
    placement: tuple[np.ndarray, np.ndarray] | None  # (ImagePositionPatient, slice normal)
    number: int | None  # InstanceNumber


def _series_sources(uid: str, members: list[_Member]) -> list[Source]:
    """One series group -> its source (plus error sources for duplicated instances)."""
    out: list[Source] = []
    unique: list[_Member] = []
    first_of: dict[str, Path] = {}
    for member in sorted(members, key=lambda m: str(m.path)):
        f, sop = member.path, member.sop
        if sop and sop in first_of:
            # Two copies of one instance would put two slices at one position.
            out.append(error_source(f, f"{f} (series {uid}): skipped, same SOPInstanceUID as {first_of[sop]}"))
            continue
        first_of[sop] = f
        unique.append(member)
    if len(unique) == 1:
        out.append(Source("dicom", unique[0].path, (unique[0].path,), series_uid=uid))
        return out
    files, ordered_by = _order_slices(unique)
    try:
        folder = Path(os.path.commonpath([str(f.parent) for f in files]))
    except ValueError:  # relative and absolute paths mixed
        folder = Path(os.path.commonpath([str(f.parent.absolute()) for f in files]))
    out.append(Source("dicom_series", folder, files, series_uid=uid, ordered_by=ordered_by))
    return out


def _order_slices(members: list[_Member]) -> tuple[tuple[Path, ...], str]:
    """Volume order: ImagePositionPatient projected on the slice normal, else InstanceNumber.

    The normal is that of the first file (by path), so oblique and sagittal stacks sort
    along their own axis, not along z. Ties fall back to InstanceNumber, then path.
    """
    placed = [m.placement for m in members if m.placement is not None]
    if len(placed) == len(members):
        normal = placed[0][1]
        keys = [(float(np.dot(position, normal)), m.number if m.number is not None else math.inf, str(m.path))
                for m, (position, _) in zip(members, placed)]
        ordered_by = "ImagePositionPatient"
    else:
        keys = [(m.number if m.number is not None else math.inf, 0.0, str(m.path)) for m in members]
        ordered_by = "InstanceNumber"
    order = sorted(range(len(members)), key=lambda i: keys[i])
    return tuple(members[i].path for i in order), ordered_by
