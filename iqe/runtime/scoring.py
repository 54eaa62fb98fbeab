"""Batch scoring: items -> batches -> infer -> per-item results, streamed.

    score_stream(items, infer, ...)    THE scoring loop (public API; `iqe score`, the end-to-end
                                       benchmark and the DICOM node all use it)
    iter_input_items(inputs, size)     command-line arguments -> items, in the order given
    score_inputs(inputs, infer, ...)   both, collected into a list (small runs, the demo)

Reading and preprocessing run in a producer thread feeding a bounded queue
(`prefetched`), so decoding the next slices overlaps inference on the current batch
while memory stays bounded. Results come back batch by batch in input order: arguments
in the order given, folders expanded in sorted order, series in volume order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from iqe.errors import InferenceFailed, InputError
from iqe.runtime.items import describe
from iqe.runtime.results import BRANCH_MAP_KEYS, SCORE_KEYS, ItemResult
from iqe.runtime.sources import SliceItem, Source, Window, check_windows, discover, iter_slices

InferFn = Callable[[np.ndarray], dict[str, np.ndarray]]

# Facts from the reader worth carrying into results.jsonl (never patient identity).
_META_FIELDS = ("modality", "SOPInstanceUID", "InstanceNumber", "slice_position", "frame", "window")
EMPTY_STD_LEVELS = 1.0  # an input whose grey levels vary by less than this (std, in 8-bit levels) is "empty"


def iter_input_items(inputs: Iterable[str | Path], size: int, windows: Mapping[str, Window] | None = None,
                     exclude: Iterable[str | Path] = (), skip: Container[str] = ()) -> Iterator[SliceItem]:
    """Items of every input argument in the order given (each argument discovered on its own).

    DICOM files of one series are grouped when they sit in one folder argument; files
    passed one by one are scored as single files. Files under `exclude` (the run's own
    output folder) are never read as inputs. Items whose key is in `skip` come bare, not decoded.

    Raises:
        InputError: `windows` is malformed (raised now, before anything is read).
    """
    checked = check_windows(windows)

    def items() -> Iterator[SliceItem]:
        for source in discover_in_order(inputs, exclude):
            yield from iter_slices(source, size, checked, skip)

    return items()


def discover_in_order(inputs: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> list[Source]:
    """Sources of every argument in the order given; a repeated argument is read once (see `discover`)."""
    seen: set[Path] = set()
    sources: list[Source] = []
    for raw in inputs:
        key = Path(raw).resolve()
        if key in seen:
            continue
        seen.add(key)
        sources.extend(discover([raw], exclude=exclude))
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


def prefetched(items: Iterator[SliceItem], depth: int) -> Iterator[SliceItem]:
    """`items` read ahead by up to `depth` in a background thread (exceptions re-raised here)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
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


def is_empty_image(image: np.ndarray) -> bool:
    """True for a (near-)constant model input: its grey levels vary by less than `EMPTY_STD_LEVELS`."""
    return float(np.std(image)) * 255.0 < EMPTY_STD_LEVELS


def result_for(item: SliceItem, number: int | None = None) -> ItemResult:
    """The result shell of an item (scores filled in after inference)."""
    extra: dict = {}
    if item.index is not None:
        extra["series"] = item.source
        extra["slice"] = item.index
    extra.update({k: item.meta[k] for k in _META_FIELDS if k in item.meta})
    flags = ["empty"] if item.image is not None and is_empty_image(item.image) else []
    error = " ".join(item.error.split()) if item.error is not None else None  # one line, whatever a header held
    return ItemResult(path=item.key, error=error, extra=extra, file=item.file, number=number, flags=flags)


class Timings:
    """Seconds spent per stage of `score_stream` (read = waiting for the reader, infer, post)."""

    def __init__(self) -> None:
        self.read = self.infer = self.post = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"decode": self.read, "infer": self.infer, "post": self.post}


def score_stream(
    items: Iterable[SliceItem],
    infer: InferFn,
    batch_size: int = 8,
    *,
    keep_maps: bool = False,
    keep_images: bool = False,
    skip: Container[str] = (),
    stop: Callable[[], bool] | None = None,
    prefetch: bool = True,
    timings: Timings | None = None,
) -> Iterator[list[ItemResult]]:
    """Score items in batches; yield each batch's results (input order) as soon as they exist.

    This is the one scoring loop of the package. The caller owns reading (`iter_input_items`,
    or its own `SliceItem`s, e.g. a DICOM node's received instances) and writing (e.g.
    `iqe.runtime.results.RunOutput.write` per yielded list), so memory stays bounded by a
    batch whatever the study size. Every item gets exactly one result:

    - an item that came with an `error` (unreadable file, ...) keeps it;
    - a batch whose `infer` raises is retried item by item, so only the items that fail
      alone get ``error = "<key>: inference failed (<reason>)"``, and the run goes on;
    - a scored item whose input is (near-)constant is flagged ``"empty"`` (still scored).

    Args:
        items: `SliceItem`s (`image` float32 [3, S, S] or `error`).
        infer: batch float32 [B, 3, S, S] -> dict with `SCORE_KEYS` [B] and ``map``,
            ``map_smooth`` [B, S, S] (a runner's `infer`).
        batch_size: items per `infer` call (the last may be smaller).
        keep_maps: keep ``map``/``map_smooth`` on each result (maps files, overlays, volumes).
        keep_images: keep the model input on each result (overlays).
        skip: keys of items already done (``--resume``): counted, neither scored nor yielded.
        stop: polled between batches; when it returns True the loop ends after the
            current batch (SIGINT/SIGTERM): items read but not scored are not yielded.
        prefetch: read ahead in a background thread.
        timings: filled with seconds per stage when given.

    Yields:
        Lists of `ItemResult` (``number`` = the item's running number in `items`,
        skipped ones included, so numbers are stable across resumed runs).

    Raises:
        InputError: `batch_size` < 1 (before anything is read).
    """
    if batch_size < 1:
        raise InputError(f"--batch must be >= 1, got {batch_size}")
    return _score_stream(items, infer, batch_size, keep_maps, keep_images, skip, stop, prefetch,
                         timings or Timings())


def _score_stream(items: Iterable[SliceItem], infer: InferFn, batch_size: int, keep_maps: bool, keep_images: bool,
                  skip: Container[str], stop: Callable[[], bool] | None, prefetch: bool,
                  timings: Timings) -> Iterator[list[ItemResult]]:
    source = prefetched(iter(items), 2 * batch_size) if prefetch else iter(items)
    waiting: list[ItemResult] = []  # results in input order, not yet yielded
    pending: list[tuple[ItemResult, np.ndarray]] = []  # the batch being filled

    def run_batch() -> None:
        t0 = time.perf_counter()
        try:
            _infer_into(pending, infer)
        except InferenceFailed as exc:  # a remote engine names the rows it could not score; the rest keep theirs
            _partial_into(pending, exc)
        except Exception:  # noqa: BLE001  one bad input must not cost the batch: isolate it
            for one in pending:
                try:
                    _infer_into([one], infer)
                except Exception as exc:  # noqa: BLE001
                    one[0].error = f"{one[0].path}: inference failed ({describe(exc)})"
                    one[0].flags.clear()
        t1 = time.perf_counter()
        for r, img in pending:
            if r.error is None:
                if keep_images:
                    r.image = img
                if not keep_maps:
                    r.map = r.map_smooth = None
                    r.branch_maps = {}
        pending.clear()
        timings.infer += t1 - t0
        timings.post += time.perf_counter() - t1

    number = 0
    try:
        while True:
            t = time.perf_counter()
            item = next(source, None)
            timings.read += time.perf_counter() - t
            if item is None:
                break
            number += 1
            if item.key in skip:
                continue
            r = result_for(item, number - 1)
            waiting.append(r)
            if item.image is not None:
                pending.append((r, item.image))
                if len(pending) < batch_size:
                    continue
                run_batch()
            elif pending or len(waiting) < batch_size:
                continue  # error items wait for the batch before them (input order), or for company
            yield waiting
            waiting = []
            if stop is not None and stop():
                return
        if pending:
            run_batch()
        if waiting:
            yield waiting
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _infer_into(batch: list[tuple[ItemResult, np.ndarray]], infer: InferFn) -> None:
    """Run `infer` on a batch and store scores and maps on its results (all or nothing).

    Raises:
        Whatever `infer` raises; ValueError when it gives no ``score`` or outputs of another length.
    """
    out = infer(np.stack([img for _, img in batch]))
    n = len(batch)
    if "score" not in out:
        raise ValueError("runner output has no 'score'")
    for k in (*SCORE_KEYS, "map", "map_smooth"):
        if k in out and len(out[k]) != n:
            raise ValueError(f"runner output {k!r} has {len(out[k])} entries for a batch of {n}")
    scores = [{k: float(out[k][j]) for k in SCORE_KEYS if k in out} for j in range(n)]
    for j, (r, _) in enumerate(batch):
        r.scores = scores[j]
        if "map" in out and "map_smooth" in out:
            r.map, r.map_smooth = np.asarray(out["map"][j]), np.asarray(out["map_smooth"][j])
            r.branch_maps = {k: np.asarray(out[k][j]) for k in BRANCH_MAP_KEYS if k in out}


def _partial_into(batch: list[tuple[ItemResult, np.ndarray]], failed: InferenceFailed) -> None:
    """Store the rows of a partly failed batch: per-row errors where the engine gave one, scores elsewhere."""
    out = failed.outputs
    for j, (r, _) in enumerate(batch):
        if failed.errors[j] is not None:
            r.error = f"{r.path}: inference failed ({failed.errors[j]})"
            r.flags.clear()
            continue
        r.scores = {k: float(out[k][j]) for k in SCORE_KEYS if k in out}
        if "map" in out and "map_smooth" in out:
            r.map, r.map_smooth = np.asarray(out["map"][j]), np.asarray(out["map_smooth"][j])
            r.branch_maps = {k: np.asarray(out[k][j]) for k in BRANCH_MAP_KEYS if k in out}


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
    """Score files, folders, DICOM series and NIfTI volumes into a list (small runs; see `score_stream`).

    Args:
        inputs: paths as given on the command line.
        infer: batch float32 [B,3,S,S] -> dict with `score`, ..., `map`, `map_smooth` (a Runner's infer).
        image_size: model input side.
        batch_size: slices per inference call.
        keep_maps: keep `map`/`map_smooth` per result.
        keep_images: keep the preprocessed input in `ItemResult.image` (overlays).
        windows: intensity window overrides, {modality or "*": (center, width)}.
        progress: show a progress bar.
    Returns:
        One ItemResult per slice item, in input order.
    Raises:
        InputError: bad `batch_size` or `windows` (before anything is read).
    """
    return score_items(iter_input_items(inputs, image_size, windows), infer, batch_size, keep_maps=keep_maps,
                       keep_images=keep_images, progress=progress)


def score_items(items: Iterable[SliceItem], infer: InferFn, batch_size: int = 8, keep_maps: bool = False,
                keep_images: bool = False, progress: bool = True) -> list[ItemResult]:
    """Score a stream of items (from `iter_slices`) into a list: `score_stream` collected (see `score_inputs`)."""
    results: list[ItemResult] = []
    with tqdm(desc="scoring", unit="slice", disable=not progress) as bar:
        for batch in score_stream(items, infer, batch_size, keep_maps=keep_maps, keep_images=keep_images):
            results.extend(batch)
            bar.update(len(batch))
    return results
