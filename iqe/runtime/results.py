"""The output contract of `iqe score`: `results.jsonl` and `maps.npz`.

results.jsonl: one JSON object per input, in input order: `path`, `score`, `score_query`,
`score_text`, `score_few`, `map_max` (plus optional context such as `series`/`slice`),
or `path` and `error` for an input that could not be scored.
maps.npz (with --save-maps): `paths` [N], `map` and `map_smooth` [N, S, S] float32 in the
same order, failed inputs omitted from the arrays and listed in `failed`.

Both files are written under a temporary name and renamed, so a reader never sees a
half-written file under the final name.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCORE_KEYS = ("score", "score_query", "score_text", "score_few", "map_max", "score_zero")
BRANCH_MAP_KEYS = ("map_zero", "map_few")  # MVFA's raw per-branch maps, saved in maps.npz when present


@dataclass
class ItemResult:
    """One input's outcome: scores (+ maps) or an error message."""

    path: str
    scores: dict[str, float] | None = None
    map: np.ndarray | None = None
    map_smooth: np.ndarray | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able context (series, slice, ...)
    branch_maps: dict[str, np.ndarray] = field(default_factory=dict)  # BRANCH_MAP_KEYS the model returns
    image: np.ndarray | None = None  # preprocessed input, kept only for overlays

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"path": self.path, **self.extra}
        if self.error is not None:
            row["error"] = self.error
        else:
            assert self.scores is not None
            row.update({k: _finite(self.scores[k]) for k in SCORE_KEYS if k in self.scores})
        return row


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_results(out_dir: str | Path, results: list[ItemResult], save_maps: bool) -> dict[str, Path]:
    """Write results.jsonl (and maps.npz) for `results` in their order; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    jsonl = out_dir / "results.jsonl"

    def _write_jsonl(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            for r in results:
                fh.write(json.dumps(r.to_json()) + "\n")

    _atomic_write(jsonl, _write_jsonl)
    written["results"] = jsonl
    if save_maps:
        ok = [r for r in results if r.error is None and r.map is not None]
        size = ok[0].map.shape[-1] if ok else 0
        maps = np.stack([r.map for r in ok]).astype(np.float32) if ok else np.zeros((0, size, size), np.float32)
        smooth = np.stack([r.map_smooth for r in ok]).astype(np.float32) if ok else maps.copy()
        npz = out_dir / "maps.npz"

        def _write_npz(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    paths=np.array([r.path for r in ok], dtype=str),
                    map=maps,
                    map_smooth=smooth,
                    **{k: np.stack([r.branch_maps[k] for r in ok]).astype(np.float32)
                       for k in BRANCH_MAP_KEYS if ok and all(k in r.branch_maps for r in ok)},
                    failed=np.array([r.path for r in results if r.error is not None], dtype=str),
                )

        _atomic_write(npz, _write_npz)
        written["maps"] = npz
    return written


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Read results.jsonl back (for tests, demo summaries and downstream tools)."""
    with open(Path(out_dir) / "results.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]
