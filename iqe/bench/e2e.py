"""End-to-end timing: files -> decode -> preprocess -> batch -> infer -> results on disk.

The pipeline is the runtime's public path (`iqe.runtime.sources.iter_items`: discovery,
DICOM/PNG decoding, Modality LUT and windowing, the reference's PIL resize; then a
runner's `infer`; then `ItemResult`s written by `iqe.runtime.results.write_results` as
`results.jsonl` and, by default, `maps.npz`). It runs sequentially so each stage's time
can be read off separately; on two cores decoding in a second thread would compete
with inference for the same cores anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iqe.runtime.results import SCORE_KEYS, ItemResult, write_results
from iqe.runtime.sources import iter_items

InferFn = Callable[[np.ndarray], dict[str, np.ndarray]]
STAGES = ("decode", "infer", "post", "write")


@dataclass
class PipelineRun:
    """One pass of the pipeline over a set of inputs.

    Attributes:
        wall_s: total wall-clock time, first file touched to last result written.
        images: items scored.
        errors: items that could not be read (their messages in `error_messages`).
        stages_s: seconds per stage: ``decode`` (discovery, reading, windowing, resizing),
            ``infer`` (the runner), ``post`` (per-item results), ``write`` (results files).
        scores: the ``score`` of every scored item, in input order (for parity checks).
    """

    wall_s: float
    images: int
    errors: int
    stages_s: dict[str, float]
    scores: np.ndarray
    error_messages: list[str] = field(default_factory=list)


def run_pipeline(inputs: Sequence[str | Path], infer: InferFn, image_size: int, batch: int, out_dir: str | Path,
                 save_maps: bool = True) -> PipelineRun:
    """Score `inputs` (files / folders / series) end to end and write the results to `out_dir`.

    Args:
        inputs: what `iqe score` would be given.
        infer: a runner's `infer` (float32 [B,3,S,S] -> outputs incl. `map`, `map_smooth`).
        image_size: model input side.
        batch: images per `infer` call (the last call may be smaller).
        out_dir: where results.jsonl (+ maps.npz) go.
        save_maps: also write maps.npz (`iqe score --save-maps`).
    Returns:
        The timings and scores of this pass.
    """
    stages = dict.fromkeys(STAGES, 0.0)
    results: list[ItemResult] = []
    pending: list[tuple[ItemResult, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        t = time.perf_counter()
        out = infer(np.stack([img for _, img in pending]))
        t1 = time.perf_counter()
        stages["infer"] += t1 - t
        for j, (r, _) in enumerate(pending):
            r.scores = {k: float(out[k][j]) for k in SCORE_KEYS if k in out}
            if save_maps:
                r.map, r.map_smooth = out["map"][j], out["map_smooth"][j]
        pending.clear()
        stages["post"] += time.perf_counter() - t1

    t0 = time.perf_counter()
    items = iter_items(inputs, image_size)  # discovery reads headers here
    stages["decode"] += time.perf_counter() - t0
    while True:
        t = time.perf_counter()
        item = next(items, None)
        stages["decode"] += time.perf_counter() - t
        if item is None:
            break
        r = ItemResult(path=item.key, error=item.error, extra={"source": item.source, "index": item.index})
        results.append(r)
        if item.image is not None:
            pending.append((r, item.image))
            if len(pending) == batch:
                flush()
    flush()
    t = time.perf_counter()
    write_results(out_dir, results, save_maps)
    stages["write"] += time.perf_counter() - t
    wall = time.perf_counter() - t0
    ok = [r for r in results if r.error is None]
    return PipelineRun(
        wall_s=wall, images=len(ok), errors=len(results) - len(ok), stages_s={k: round(v, 4) for k, v in stages.items()},
        scores=np.array([r.scores["score"] for r in ok if r.scores], dtype=np.float64),
        error_messages=[str(r.error) for r in results if r.error is not None],
    )
