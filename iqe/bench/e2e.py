"""End-to-end timing: files -> decode -> preprocess -> batch -> infer -> results on disk.

The pipeline is `iqe score`'s own: `iqe.runtime.scoring.iter_input_items` (discovery,
DICOM/PNG decoding, Modality LUT and windowing, the reference's PIL resize), the one
batching loop `iqe.runtime.scoring.score_stream` around a runner's `infer`, and
`iqe.runtime.results.RunOutput` writing `results.jsonl` and, by default, `maps/` per
batch. It runs without the reader thread so each stage's time can be read off
separately; on two cores decoding in a second thread would compete with inference for
the same cores anyway.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iqe.runtime.results import RunOutput
from iqe.runtime.scoring import InferFn, Timings, iter_input_items, score_stream

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

    The loop is `iqe score`'s own (`score_stream` + `RunOutput`), run without the reader
    thread so the stages' times add up to the wall time.

    Args:
        inputs: what `iqe score` would be given.
        infer: a runner's `infer` (float32 [B,3,S,S] -> outputs incl. `map`, `map_smooth`).
        image_size: model input side.
        batch: images per `infer` call (the last call may be smaller).
        out_dir: where results.jsonl (+ maps/) go; a folder an earlier run wrote is reused.
        save_maps: also write maps/ (`iqe score --save-maps`).
    Returns:
        The timings and scores of this pass.
    """
    timings = Timings()
    write_s = 0.0
    scores: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    items = iter_input_items(inputs, image_size)
    with RunOutput(out_dir, {"inputs": [str(p) for p in inputs], "benchmark": True}, save_maps=save_maps) as output:
        for results in score_stream(items, infer, batch, keep_maps=save_maps, prefetch=False, timings=timings):
            t = time.perf_counter()
            output.write(results)
            write_s += time.perf_counter() - t
            for r in results:
                if r.error is None and r.scores:
                    scores.append(r.scores["score"])
                elif r.error is not None:
                    errors.append(r.error)
    wall = time.perf_counter() - t0
    stages = {**timings.as_dict(), "write": write_s}
    return PipelineRun(
        wall_s=wall, images=len(scores), errors=len(errors), stages_s={k: round(v, 4) for k, v in stages.items()},
        scores=np.array(scores, dtype=np.float64), error_messages=errors,
    )
