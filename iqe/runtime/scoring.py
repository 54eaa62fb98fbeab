"""Batch scoring of image files with a torch model: read -> preprocess -> batch -> score.

Decoding runs in a thread pool ahead of inference, so reading the next batch overlaps
with scoring the current one. Every input gets a result or an error; one unreadable
file never costs the others their scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from iqe.errors import InputError
from iqe.model.preprocess import IMAGE_SUFFIXES, load_image
from iqe.runtime.results import ItemResult


@dataclass
class InputItem:
    """A path to score, or the reason it cannot be (found while expanding inputs)."""

    path: str
    error: str | None = None


def expand_inputs(inputs: Iterable[str | Path]) -> list[InputItem]:
    """Files stay as given; folders expand to their image files (recursive, sorted).

    Missing paths and folders without images become error items instead of aborting.
    """
    items: list[InputItem] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                items.append(InputItem(str(p), f"{p}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})"))
            items.extend(InputItem(str(f)) for f in found)
        elif p.is_file():
            items.append(InputItem(str(p)))
        else:
            items.append(InputItem(str(p), f"{p}: no such file or folder"))
    return items


def _read(item: InputItem, size: int) -> tuple[InputItem, np.ndarray | None, str | None]:
    if item.error:
        return item, None, item.error
    try:
        return item, load_image(item.path, size), None
    except InputError as exc:
        return item, None, str(exc)


def _prefetch(items: list[InputItem], size: int, workers: int) -> Iterator[tuple[InputItem, np.ndarray | None, str | None]]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda it: _read(it, size), items)


ScoreFn = Callable[[np.ndarray], dict[str, np.ndarray]]


def torch_score_fn(model: torch.nn.Module, device: str | torch.device = "cpu") -> ScoreFn:
    """Wrap an IQEModel as images [B,3,S,S] float32 -> smoothed outputs (NumPy)."""

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        return model.score(torch.from_numpy(batch).to(device))

    return run


def score_items(
    items: list[InputItem],
    score_fn: ScoreFn,
    image_size: int,
    batch_size: int = 8,
    keep_maps: bool = False,
    workers: int = 2,
    progress: bool = True,
    keep_images: bool = False,
) -> list[ItemResult]:
    """Score `items` in order.

    Args:
        items: from `expand_inputs`.
        score_fn: batch [B,3,S,S] -> dict of outputs (`score`, ..., `map`, `map_smooth`).
        image_size: model input side.
        batch_size: images per inference call.
        keep_maps: keep `map`/`map_smooth` per result (for maps.npz and overlays).
        workers: decoding threads.
        progress: show a progress bar.
        keep_images: keep the preprocessed input in `ItemResult.image` (for overlays).
    Returns:
        One ItemResult per item, same order.
    """
    if batch_size < 1:
        raise InputError(f"--batch must be >= 1, got {batch_size}")
    results: list[ItemResult] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        out = score_fn(np.stack([img for _, img in pending]))
        for j, (idx, img) in enumerate(pending):
            r = results[idx]
            r.scores = {k: float(out[k][j]) for k in ("score", "score_query", "score_text", "score_few", "map_max") if k in out}
            if keep_maps:
                r.map, r.map_smooth = out["map"][j], out["map_smooth"][j]
            if keep_images:
                r.image = img
        pending.clear()

    bar = tqdm(total=len(items), desc="scoring", unit="img", disable=not progress)
    for item, image, error in _prefetch(items, image_size, workers):
        results.append(ItemResult(path=item.path, error=error))
        if image is not None:
            pending.append((len(results) - 1, image))
            if len(pending) == batch_size:
                flush()
        bar.update(1)
    flush()
    bar.close()
    return results
