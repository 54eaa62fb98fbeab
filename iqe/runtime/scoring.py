"""Batch scoring: sources -> slices -> batches -> runner -> per-item results.

Reading and preprocessing (`iqe.runtime.sources`) run in a producer thread that feeds a
bounded queue, so decoding the next slices overlaps with inference on the current batch
while memory stays bounded. Every item gets a result or an error; one unreadable file
never costs the others their scores. Results come back in input order: arguments in the
order given, folders expanded in sorted order, series in volume order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from iqe.errors import InputError
from iqe.runtime.results import BRANCH_MAP_KEYS, SCORE_KEYS, ItemResult
from iqe.runtime.sources import SliceItem, Source, Window, check_windows, discover, iter_slices

InferFn = Callable[[np.ndarray], dict[str, np.ndarray]]

# Facts from the reader worth carrying into results.jsonl (never patient identity).
_META_FIELDS = ("modality", "SOPInstanceUID", "InstanceNumber", "slice_position", "window")


def iter_input_items(inputs: Iterable[str | Path], size: int, windows: Mapping[str, Window] | None = None
                     ) -> Iterator[SliceItem]:
    """Items of every input argument in the order given (each argument discovered on its own).

    DICOM files of one series are grouped when they sit in one folder argument; files
    passed one by one are scored as single files.
    """
    checked = check_windows(windows)
    for source in discover_in_order(inputs):
        yield from iter_slices(source, size, checked)


def discover_in_order(inputs: Iterable[str | Path]) -> list[Source]:
    """Sources of every argument in the order given; a repeated argument is read once."""
    seen: set[Path] = set()
    sources: list[Source] = []
    for raw in inputs:
        key = Path(raw).resolve()
        if key in seen:
            continue
        seen.add(key)
        sources.extend(discover([raw]))
    return sources


def _produce(items: Iterator[SliceItem], out: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in items:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
    except BaseException as exc:  # surfaced in the consumer: a reader bug must not be silent
        out.put(exc)
        return
    out.put(None)


def _prefetched(items: Iterator[SliceItem], depth: int) -> Iterator[SliceItem]:
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    worker = threading.Thread(target=_produce, args=(items, q, stop), daemon=True, name="iqe-reader")
    worker.start()
    try:
        while True:
            got = q.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        worker.join(timeout=5)


def _result_for(item: SliceItem) -> ItemResult:
    extra: dict = {}
    if item.index is not None:
        extra["series"] = item.source
        extra["slice"] = item.index
    extra.update({k: item.meta[k] for k in _META_FIELDS if k in item.meta})
    return ItemResult(path=item.key, error=item.error, extra=extra)


def score_inputs(
    inputs: Iterable[str | Path],
    infer: InferFn,
    image_size: int,
    batch_size: int = 8,
    keep_maps: bool = False,
    keep_images: bool = False,
    windows: Mapping[str, Window] | None = None,
    progress: bool = True,
) -> list[ItemResult]:
    """Score files, folders, DICOM series and NIfTI volumes.

    Args:
        inputs: paths as given on the command line.
        infer: batch float32 [B,3,S,S] -> dict with `score`, ..., `map`, `map_smooth` (a Runner's infer).
        image_size: model input side.
        batch_size: slices per inference call.
        keep_maps: keep `map`/`map_smooth` per result (maps.npz, overlays, volumes).
        keep_images: keep the preprocessed input in `ItemResult.image` (overlays).
        windows: intensity window overrides, {modality or "*": (center, width)}.
        progress: show a progress bar.
    Returns:
        One ItemResult per slice item, in input order.
    Raises:
        InputError: bad `batch_size` or `windows` (before anything is read).
    """
    if batch_size < 1:
        raise InputError(f"--batch must be >= 1, got {batch_size}")
    items = iter_input_items(inputs, image_size, windows)  # validates windows now
    results: list[ItemResult] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        out = infer(np.stack([img for _, img in pending]))
        for j, (idx, img) in enumerate(pending):
            r = results[idx]
            r.scores = {k: float(out[k][j]) for k in SCORE_KEYS if k in out}
            if keep_maps:
                r.map, r.map_smooth = out["map"][j], out["map_smooth"][j]
                r.branch_maps = {k: out[k][j] for k in BRANCH_MAP_KEYS if k in out}
            if keep_images:
                r.image = img
        pending.clear()

    bar = tqdm(desc="scoring", unit="slice", disable=not progress)
    for item in _prefetched(items, depth=2 * batch_size):
        results.append(_result_for(item))
        if item.image is not None:
            pending.append((len(results) - 1, item.image))
            if len(pending) == batch_size:
                flush()
        bar.update(1)
    flush()
    bar.close()
    return results
