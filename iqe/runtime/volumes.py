"""Per-slice results -> per-volume outputs: a summary per series, an anomaly map volume.

    aggregate_series(rows)                    results.jsonl rows -> one summary per volume source
    write_anomaly_volume(src, maps, out)      per-slice 240x240 maps -> NIfTI on the input's voxel grid

A slice's model input is its display image resized to S x S (`iqe.runtime.sources`), so
an anomaly map lies in that display frame. Writing it back into the volume undoes each
step for the source kind:

- DICOM series: the display image is the pixel array (rows x columns), and
  `read_series_volume` stores slice k transposed, ``volume[column, row, k]``: the map is
  resized to rows x columns and transposed. The affine is `read_series_volume`'s.
- NIfTI: the stored volume was reoriented to LPS (`nifti_display_ornt`: flips and a
  permutation, never resampling) and slice k shown as ``lps[:, :, k].T``: the map is
  resized to that slice's shape, transposed into the LPS volume, and the LPS volume
  is flipped and permuted back to the stored axes. The affine is the input file's.

So voxel (i, j, k) of the anomaly volume lies on voxel (i, j, k) of the input volume,
and viewers overlay the two without resampling.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from iqe.errors import InputError
from iqe.atomic import atomic_write_text
from iqe.runtime.results import RunOutput, read_maps, read_results
from iqe.runtime.sources import NIFTI_SUFFIXES, Source, nifti_display_ornt, read_series_volume

_NIFTI_READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError)  # what nib.load raises on a bad file


def aggregate_series(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summarize the slices of each volume source in results.jsonl rows.

    A row belongs to a volume when it carries ``series`` (the source's `Source.name`)
    and ``slice`` (its index in the volume), as `iqe.runtime.scoring` writes for DICOM
    series, multi-frame files and NIfTI slices; plain 2-D files carry neither and get no
    summary.

    Args:
        rows: per-slice result dicts: ``path``, ``series``, ``slice`` and either
            ``score`` (None when the model gave a non-finite value) or ``error``.

    Returns:
        One dict per series, in order of first appearance: ``series``; ``slices``
        (rows seen); ``scored`` (rows with a numeric score); ``failed`` (the others: an
        error or a null score); ``score`` (the highest slice score, None when none was
        scored); ``argmax_slice`` and ``argmax_path`` (that slice's index and key, the
        lowest index on ties, None when none was scored); ``scores`` (by slice index,
        ``max index + 1`` long, None for failed or absent slices).

    Raises:
        InputError: one series lists a slice index twice (the same volume scored twice,
            e.g. its folder given twice: pass each volume once).
    """
    by_series: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        series, index = row.get("series"), row.get("slice")
        if series is None or index is None:
            continue
        slices = by_series.setdefault(series, {})
        if index in slices:
            raise InputError(f"{series}: slice {index} appears twice ({slices[index]['path']} and {row['path']}); "
                             f"was the volume given twice? pass each volume once")
        slices[index] = row

    summaries = []
    for series, slices in by_series.items():
        scores: list[float | None] = [None] * (max(slices) + 1)
        for index, row in slices.items():
            score = row.get("score") if row.get("error") is None else None
            # results.jsonl writes non-finite scores as null; guard raw NaN from other writers too
            if isinstance(score, (int, float)) and math.isfinite(score):
                scores[index] = float(score)
        scored = [i for i, s in enumerate(scores) if s is not None]
        best = max(scored, key=lambda i: (scores[i], -i)) if scored else None
        summaries.append({
            "series": series,
            "slices": len(slices),
            "scored": len(scored),
            "failed": len(slices) - len(scored),
            "score": scores[best] if best is not None else None,
            "argmax_slice": best,
            "argmax_path": slices[best]["path"] if best is not None else None,
            "scores": scores,
        })
    return summaries


def write_anomaly_volume(source: Source, slice_maps: dict[int, np.ndarray], out_path: str | Path) -> Path:
    """Write per-slice anomaly maps as a float32 NIfTI on the input volume's voxel grid.

    Each map is resized bilinearly to its slice's in-plane size, pixel edges aligned as
    in PIL's resize that made the model input, then placed as described in the module
    docstring. Slices without a map (failed or not scored) are NaN, so "no result" never
    reads as "normal".

    Args:
        source: a ``dicom_series`` or ``nifti`` source from `discover`.
        slice_maps: slice index (`SliceItem.index`, results' ``slice``) -> 2-D map in
            the model input's pixel frame, e.g. `ItemResult.map_smooth` [240, 240].
        out_path: ``.nii.gz`` (or ``.nii``) file to write; its folder must exist. Written
            under a temporary name in the same folder and renamed, so a reader never sees
            a partial file.

    Returns:
        `out_path` as a Path.

    Raises:
        InputError: `out_path` is not NIfTI; the source is not a volume (another kind);
            the NIfTI input cannot be read; the DICOM series does not form a volume (see
            `read_series_volume`).
        ValueError: a slice index outside the volume or a map that is not 2-D (a
            caller bug).
    """
    out_path = Path(out_path)
    if not out_path.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputError(f"{out_path}: anomaly volumes are NIfTI; name it {', '.join(NIFTI_SUFFIXES)}")
    if source.kind == "dicom_series":
        image = _dicom_series_volume(source, slice_maps)
    elif source.kind == "nifti":
        image = _nifti_volume(source, slice_maps)
    else:
        raise InputError(f"{source.name}: no anomaly volume for a {source.kind} source; only DICOM series and "
                         f"NIfTI volumes have a 3-D grid to write onto")
    # nibabel picks the format (and gzip) from the suffix, so the temporary name keeps it
    suffix = ".nii.gz" if out_path.name.lower().endswith(".nii.gz") else ".nii"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp{suffix}")
    try:
        nib.save(image, tmp)
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


def _dicom_series_volume(source: Source, slice_maps: dict[int, np.ndarray]) -> nib.Nifti1Image:
    """DICOM series: slice k = pixel array of file k; the volume holds it transposed."""
    series = read_series_volume(source)  # decodes the pixels too: it checks the series forms a volume
    columns, rows, count = series.volume.shape
    volume = np.full((columns, rows, count), np.nan, dtype=np.float32)
    for k, m in _checked(slice_maps, count, source).items():
        volume[:, :, k] = _resize(m, (rows, columns)).T
    image = nib.Nifti1Image(volume, series.affine)
    # DICOM positions are patient coordinates of the scanner, in millimetres
    image.set_sform(series.affine, code="scanner")
    image.set_qform(series.affine, code="scanner")
    image.header.set_xyzt_units("mm")
    return image


def _nifti_volume(source: Source, slice_maps: dict[int, np.ndarray]) -> nib.Nifti1Image:
    """NIfTI: build the map in the display (LPS) frame, then flip/permute back to the stored axes."""
    try:
        original = nib.load(source.path)
    except _NIFTI_READ_ERRORS as exc:
        raise InputError(f"{source.path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    if not isinstance(original, nib.Nifti1Image):  # NIfTI-2 is a subclass; a .nii suffix on anything else is not
        raise InputError(f"{source.path}: not a NIfTI image (nibabel reads it as {type(original).__name__})")
    header = original.header
    stored = tuple(int(n) for n in header.get_data_shape())
    if len(stored) != 3 and not (len(stored) == 4 and stored[3] == 1):  # the volumes `iter_slices` reads
        raise InputError(f"{source.path}: expected a 3-D volume, got shape {stored}")
    shape = stored[:3]
    ornt = nifti_display_ornt(original.affine)
    display_shape = [0, 0, 0]
    for axis, (display_axis, _) in enumerate(ornt):
        display_shape[display_axis] = shape[axis]
    display = np.full(display_shape, np.nan, dtype=np.float32)
    for k, m in _checked(slice_maps, display_shape[2], source).items():
        display[:, :, k] = _resize(m, (display_shape[1], display_shape[0])).T
    volume = np.ascontiguousarray(nib.orientations.apply_orientation(display, _inverse_ornt(ornt)))
    image = nib.Nifti1Image(volume, original.affine)
    # Same codes as the input, so every reader picks the same affine for both files.
    image.set_sform(original.affine, code=int(header["sform_code"]))
    image.set_qform(original.affine, code=int(header["qform_code"]))
    image.header.set_xyzt_units(*header.get_xyzt_units())
    return image


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes `ornt` (display axis j -> the stored axis it came from)."""
    inverse = np.empty_like(ornt)
    for axis, (display_axis, flip) in enumerate(ornt):
        inverse[display_axis] = (axis, flip)
    return inverse


def _checked(slice_maps: dict[int, np.ndarray], count: int, source: Source) -> dict[int, np.ndarray]:
    """Validate slice indices and map shapes against a volume of `count` slices.

    Raises:
        ValueError: an index outside ``0..count-1`` or a map that is not 2-D.
    """
    checked = {}
    for k, m in slice_maps.items():
        m = np.asarray(m, dtype=np.float32)
        if not 0 <= k < count:
            raise ValueError(f"{source.name}: slice {k} outside the volume's {count} slices")
        if m.ndim != 2:
            raise ValueError(f"{source.name}: slice {k}: expected a 2-D map, got shape {m.shape}")
        checked[k] = m
    return checked


def _resize(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to `shape` with pixel edges aligned (PIL's convention, which made the model input)."""
    from scipy import ndimage  # lazy: only anomaly volumes (--volumes) need it, not every run's series summary

    return ndimage.zoom(m, (shape[0] / m.shape[0], shape[1] / m.shape[1]), order=1, mode="nearest",
                        grid_mode=True)


def write_series_outputs(inputs: list, output: RunOutput, volumes: bool = False) -> list[str]:
    """`series.jsonl` (one summary per volume, see `aggregate_series`) and, with `volumes`,
    a NIfTI anomaly volume per DICOM series / NIfTI input under ``volumes/``.

    Works from what the run wrote (results.jsonl rows, ``maps/`` files), so it also
    covers items finished by an earlier, interrupted run (``--resume``). Each file is
    recorded in the run record before it is written.

    Args:
        inputs: the scored arguments (re-discovered here: headers only).
        output: the run's open `RunOutput` (maps saved when `volumes`).
        volumes: also write the anomaly volumes.
    Returns:
        Log lines for the user (summaries, files written, per-volume errors).
    """
    from iqe.runtime.scoring import discover_in_order

    rows = read_results(output.out)
    try:
        summaries = aggregate_series(rows)
    except InputError as exc:
        return [f"error: no series summary ({exc})"]
    if not summaries:
        return []
    atomic_write_text(output.claim("series.jsonl"), "".join(json.dumps(s) + "\n" for s in summaries))
    lines = [f"{s['series']}: score {s['score']:.4f} at slice {s['argmax_slice']} of {s['slices']}"
             if s["score"] is not None else f"{s['series']}: nothing scored" for s in summaries]
    if not volumes:
        return lines
    by_series: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        if row.get("error") is None and row.get("maps") and "series" in row:
            by_series.setdefault(row["series"], {})[row["slice"]] = row
    sources = [s for s in discover_in_order(inputs) if s.kind in ("dicom_series", "nifti")]
    for i, source in enumerate(sources):
        slice_rows = by_series.get(source.name)
        if not slice_rows:
            continue
        stem = source.series_uid or re.sub(r"\.nii(\.gz)?$", "", source.path.name)
        try:
            maps = {k: m[1] for k, row in slice_rows.items() if (m := read_maps(output.out, row)) is not None}
            name = f"volumes/anomaly_{i:03d}_{stem}.nii.gz"
            lines.append(f"wrote {write_anomaly_volume(source, maps, output.claim(name))}")
        except (InputError, OSError, ValueError) as exc:
            lines.append(f"error: {source.name}: no anomaly volume ({exc})")
    return lines
