"""The output contract of `iqe score`, written as the run goes.

    OUT/results.jsonl      one JSON object per item, appended and flushed per batch
    OUT/maps/NNNNNN.npz    per item (--save-maps / --volumes): `map`, `map_smooth` [S, S] float32
    OUT/overlays/*.png     per item (--overlays): heatmap over the model input
    OUT/series.jsonl       per volume, written at the end (see `iqe.runtime.volumes`)
    OUT/volumes/*.nii.gz   per volume (--volumes)
    OUT/.iqe-run.jsonl     the run record: options, then every file the run writes

A results row: ``path`` (the item's key: the file, ``file#frame``, ``SeriesUID#slice``),
``file`` (the file it was read from), ``item`` (its running number in input order),
context (``series``/``slice``, modality, window, ...), ``flags`` when any (``"empty"``:
a (near-)constant image, scored but carrying no contrast), then either the scores
(`SCORE_KEYS`; a non-finite value is ``null``) with ``maps`` / ``overlay`` naming the
item's files, or ``error``. Rows are open to more keys: `RunOutput`'s ``annotate`` hook
adds them (e.g. a calibrated decision) before a row is written.

Safety of the output folder (`check_out_dir`, `RunOutput`): a run writes only into a new
or empty folder, or one holding an iqe run record; it then removes exactly the files that
record lists (files of the user beside them stay) — or, with ``resume``, keeps the
finished rows and goes on. Every file is named in the record before it is written, each
row is written whole after its files, and a torn last line (a killed process) is dropped
on resume, so `results.jsonl` always holds whole rows of finished items.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from iqe.atomic import atomic_open, atomic_write_text, fsync_dir
from iqe.errors import InputError

SCORE_KEYS = ("score", "score_query", "score_text", "score_few", "map_max", "score_zero")
BRANCH_MAP_KEYS = ("map_zero", "map_few")  # MVFA's raw per-branch maps, saved beside map/map_smooth
RESULTS = "results.jsonl"
RUN_RECORD = ".iqe-run.jsonl"
RECORD_VERSION = 1
_OUTPUT_DIRS = ("maps", "overlays", "volumes")

RowHook = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class ItemResult:
    """One input item's outcome: scores (+ maps) or an error message.

    Attributes:
        path: the item's key (`iqe.runtime.items.SliceItem.key`).
        scores: `SCORE_KEYS` -> value, None when not scored.
        map, map_smooth: [S, S] anomaly maps, kept only when asked for.
        error: message naming the item and the reason.
        extra: JSON-able context (series, slice, modality, window, ...).
        image: the preprocessed input, kept only for overlays.
        file: the file the item was read from.
        number: running number of the item in input order (stable across --resume).
        flags: remarks about a scored item, e.g. ``"empty"``.
        files: output files written for the item (``maps``, ``overlay``), relative to the run folder.
    """

    path: str
    scores: dict[str, float] | None = None
    map: np.ndarray | None = None
    map_smooth: np.ndarray | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    branch_maps: dict[str, np.ndarray] = field(default_factory=dict)  # BRANCH_MAP_KEYS the model returns
    image: np.ndarray | None = None
    file: str | None = None
    number: int | None = None
    flags: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The results.jsonl row (see the module docstring)."""
        row: dict[str, Any] = {"path": self.path}
        if self.file is not None:
            row["file"] = self.file
        if self.number is not None:
            row["item"] = self.number
        row.update(self.extra)
        if self.flags:
            row["flags"] = list(self.flags)
        if self.error is not None:
            row["error"] = self.error
        else:
            assert self.scores is not None
            row.update({k: _finite(self.scores[k]) for k in SCORE_KEYS if k in self.scores})
            row.update(self.files)
        return row


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def write_results(out_dir: str | Path, results: list[ItemResult], save_maps: bool) -> dict[str, Path]:
    """Write a finished in-memory run at once: results.jsonl (and maps.npz); returns the paths.

    For small runs held in memory (the demo). `iqe score` streams through `RunOutput`.
    maps.npz: `paths` [N], `map` and `map_smooth` [N, S, S] float32 of the scored items,
    `failed` (keys of the others).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"results": atomic_write_text(out_dir / RESULTS, "".join(json.dumps(r.to_json()) + "\n"
                                                                          for r in results))}
    if save_maps:
        ok = [r for r in results if r.error is None and r.map is not None and r.map_smooth is not None]
        pairs = [(r.map, r.map_smooth) for r in ok if r.map is not None and r.map_smooth is not None]
        maps = np.stack([m for m, _ in pairs]).astype(np.float32) if pairs else np.zeros((0, 0, 0), np.float32)
        smooth = np.stack([s for _, s in pairs]).astype(np.float32) if pairs else maps.copy()
        with atomic_open(out_dir / "maps.npz") as fh:
            np.savez(fh, paths=np.array([r.path for r in ok], dtype=str), map=maps, map_smooth=smooth,
                     **{k: np.stack([r.branch_maps[k] for r in ok]).astype(np.float32)
                        for k in BRANCH_MAP_KEYS if ok and all(k in r.branch_maps for r in ok)},
                     failed=np.array([r.path for r in results if r.error is not None], dtype=str))
        written["maps"] = out_dir / "maps.npz"
    return written


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Read results.jsonl back: whole rows only (a torn last line of a killed run is skipped)."""
    rows = []
    with open(Path(out_dir) / RESULTS) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "path" in row:
                rows.append(row)
    return rows


def read_maps(out_dir: str | Path, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(map, map_smooth) of a results row whose maps were saved, else None."""
    name = row.get("maps")
    if not name:
        return None
    with np.load(Path(out_dir) / name) as data:
        return data["map"], data["map_smooth"]


def check_out_dir(out_dir: str | Path) -> Path:
    """Check that a run may write into `out_dir`, before any work: creatable, writable, not a file, ours.

    Returns:
        The folder, created when missing.

    Raises:
        InputError: it is a file; it cannot be created or written; it is not empty and
            holds no iqe run record (files of the user would sit among the results).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: folder is not writable")
    try:  # os.access says yes to root even on read-only mounts: try it
        probe = out / f".iqe-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write into the folder ({exc.strerror or exc})") from None
    if not (out / RUN_RECORD).is_file():
        others = sorted(p.name for p in out.iterdir())
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise InputError(f"--out {out}: folder is not empty ({shown}) and was not written by `iqe score` "
                             f"(no {RUN_RECORD}); choose a new or empty folder so no file of yours is mixed "
                             f"with or replaced by results")
    return out


def _safe_relative(out: Path, name: str) -> Path | None:
    """`out/name` when `name` is a plain relative path inside `out` (a record is data, never trusted blindly)."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return out / p


class RunOutput:
    """The output folder of one `iqe score` run: record, results rows, per-item files.

    Usage::

        out = RunOutput(folder, options, resume=False, save_maps=True, overlays=True)
        out.open()                       # cleans the previous run's files, or loads done keys (resume)
        for batch in ...: out.write(batch)   # maps/overlays, then rows appended + flushed
        out.close()

    Args:
        folder: checked with `check_out_dir` first.
        options: what defines the run (inputs, model, backend, window, outputs); a resumed
            run must match them.
        resume: keep finished rows and skip their items (`done`); error rows are retried.
        save_maps: write ``maps/NNNNNN.npz`` per scored item.
        overlays: write ``overlays/NNNNN_<name>.png`` per scored item (needs `ItemResult.image`).
        annotate: hook applied to every row before it is written (adds keys; never removes).

    Raises:
        InputError: the folder fails `check_out_dir`; ``resume`` with the record of a run
            with other options (the option is named). Nothing is written or removed here.
    """

    def __init__(self, folder: str | Path, options: dict[str, Any], resume: bool = False, save_maps: bool = False,
                 overlays: bool = False, annotate: RowHook | None = None) -> None:
        self.out = check_out_dir(folder)
        self.options = json.loads(json.dumps(options, default=str))  # as it round-trips through the record
        self.resume = resume
        self.save_maps = save_maps
        self.overlays = overlays
        self.annotate = annotate
        self.done: set[str] = set()
        self.rows_kept = 0
        self.written = 0
        self.failed = 0
        self._record: IO[str] | None = None
        self._results: IO[str] | None = None
        record = self.out / RUN_RECORD
        self._previous = self._read_record(record) if record.is_file() else None
        if resume and self._previous is not None:
            recorded = self._previous[0].get("options", {})
            for key in sorted(set(recorded) | set(self.options)):
                old, new = recorded.get(key), self.options.get(key)
                if old != new:
                    raise InputError(f"--resume: {key} differs from the run recorded in {self.out} "
                                     f"({old!r} then, {new!r} now); resume with the same inputs and options, "
                                     f"or drop --resume to start over")

    # -- lifecycle --------------------------------------------------------------------------
    def open(self) -> RunOutput:
        """Prepare the folder: resume the recorded run, or remove exactly its files and start a new one.

        Raises:
            OSError: the folder cannot be written.
        """
        record = self.out / RUN_RECORD
        previous = self._previous
        if self.resume and previous is not None:
            self._keep_finished_rows()
            self._record = open(record, "a")
        else:
            if previous is not None:
                self._remove_recorded(previous[1])
            with atomic_open(record, "w") as fh:
                fh.write(json.dumps({"iqe_run": RECORD_VERSION, "options": self.options}) + "\n")
                fh.write(json.dumps({"file": RESULTS}) + "\n")
            self._record = open(record, "a")
            (self.out / RESULTS).write_text("")
            fsync_dir(self.out)
        self._results = open(self.out / RESULTS, "a")
        return self

    def close(self) -> None:
        """Flush and close (safe to call twice)."""
        for fh in (self._results, self._record):
            if fh is not None and not fh.closed:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()

    def __enter__(self) -> RunOutput:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------
    def claim(self, name: str) -> Path:
        """Record that the run writes `name` (relative path), before writing it; returns its full path."""
        assert self._record is not None, "open() first"
        self._record.write(json.dumps({"file": name}) + "\n")
        self._record.flush()
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write(self, results: Iterable[ItemResult]) -> None:
        """Write a batch: each scored item's maps/overlay files, then all rows, appended and flushed.

        Results keep their maps and image only until here; callers drop them after.
        """
        assert self._results is not None, "open() first"
        lines = []
        for r in results:
            if r.error is None:
                self._write_files(r)
            else:
                self.failed += 1
            row = r.to_json()
            if self.annotate is not None:
                row = self.annotate(row)
            lines.append(json.dumps(row) + "\n")
        if lines:
            self._results.write("".join(lines))
            self._results.flush()
            os.fsync(self._results.fileno())
            self.written += len(lines)

    def _write_files(self, r: ItemResult) -> None:
        number = r.number if r.number is not None else self.rows_kept + self.written
        if self.save_maps and r.map is not None and r.map_smooth is not None:
            name = f"maps/{number:06d}.npz"
            with atomic_open(self.claim(name), durable=False) as fh:
                np.savez(fh, map=np.asarray(r.map, np.float32), map_smooth=np.asarray(r.map_smooth, np.float32),
                         **{k: np.asarray(v, np.float32) for k, v in r.branch_maps.items()})
            r.files["maps"] = name
        if self.overlays and r.image is not None and r.map_smooth is not None:
            from iqe.runtime.overlay import overlay_name, save_overlay

            name = f"overlays/{overlay_name(number, r.path)}"
            save_overlay(r.image, r.map_smooth, self.claim(name))
            r.files["overlay"] = name

    # -- previous runs ----------------------------------------------------------------------
    def _read_record(self, record: Path) -> tuple[dict[str, Any], list[str]]:
        header: dict[str, Any] = {}
        files: list[str] = []
        with open(record) as fh:
            for i, line in enumerate(fh):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line
                if i == 0 and isinstance(entry, dict) and "iqe_run" in entry:
                    header = entry
                elif isinstance(entry, dict) and isinstance(entry.get("file"), str):
                    files.append(entry["file"])
        return header, files

    def _remove_recorded(self, files: list[str]) -> None:
        """Remove exactly the files a previous run recorded (and its folders, when left empty)."""
        for name in dict.fromkeys(files):
            path = _safe_relative(self.out, name)
            if path is not None and path.is_file():
                path.unlink()
        for sub in _OUTPUT_DIRS:
            folder = self.out / sub
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def _keep_finished_rows(self) -> None:
        """Resume: keep whole rows of scored items; error rows (and a torn last line) are dropped to be retried."""
        path = self.out / RESULTS
        rows = read_results(self.out) if path.is_file() else []
        kept = [r for r in rows if "error" not in r and r["path"] not in self.done]
        for r in kept:
            self.done.add(r["path"])
        self.rows_kept = len(kept)
        with atomic_open(path, "w") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in kept))

