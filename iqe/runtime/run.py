"""One `iqe score` run into an output folder: read -> score (streamed) -> write per batch -> summaries.

The run is interruptible and resumable: SIGINT/SIGTERM end it after the batch in
flight (a second signal stops at once), `results.jsonl` then holds whole rows of
every finished item, and ``--resume`` skips them. See `iqe.runtime.results` for the
folder's contract and `iqe.runtime.scoring.score_stream` for the loop.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from tqdm import tqdm

from iqe.atomic import atomic_write_text
from iqe.runtime.results import RunOutput
from iqe.runtime.scoring import InferFn, iter_input_items, score_stream
from iqe.runtime.transforms import Window

META = "results.meta.json"  # the engine behind the run: backend, drift summary (iqe.export.fidelity)


@dataclass
class RunReport:
    """What a run did.

    Attributes:
        scored: items scored in this run.
        failed: items with an error in this run (their messages in `errors`).
        resumed: finished items kept from an earlier run (``--resume``).
        interrupted: the signal number that stopped the run early, else None.
        lines: log lines of the per-volume outputs (summaries, files, errors).
    """

    scored: int = 0
    failed: int = 0
    resumed: int = 0
    interrupted: int | None = None
    errors: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


class _StopRequest:
    """Signal handler: the first signal asks the loop to stop after its batch, a second stops now."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the batch in flight, then stopping "
              f"(send again to stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[_StopRequest]:
    """Route SIGINT/SIGTERM to a `_StopRequest` while the block runs (main thread only)."""
    request = _StopRequest()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def score_to_folder(inputs: list[str | Path], infer: InferFn, image_size: int, output: RunOutput, *,
                    batch_size: int = 8, windows: Mapping[str, Window] | None = None, volumes: bool = False,
                    progress: bool = True, meta: dict | None = None) -> RunReport:
    """Score `inputs` into `output` (already checked, not yet opened), batch by batch.

    Args:
        inputs: files and folders as given on the command line.
        infer: a runner's `infer`.
        image_size: model input side.
        output: the run folder (`RunOutput`); opened here (previous run cleaned or resumed).
        batch_size: items per `infer` call.
        windows: intensity window overrides.
        volumes: write NIfTI anomaly volumes at the end (needs ``output.save_maps``).
        progress: progress bar on stderr.
        meta: written as ``results.meta.json`` (the engine's identity and drift summary), a
            file of the run's record like every other.

    Returns:
        The run's `RunReport`.

    Raises:
        InputError: bad `windows` or `batch_size` (before anything is read or written).
    """
    items = iter_input_items(inputs, image_size, windows, exclude=[output.out], skip=output.done)
    report = RunReport()
    with stop_on_signals() as stop, output:
        report.resumed = output.rows_kept
        if meta is not None:
            atomic_write_text(output.claim(META), json.dumps(meta, indent=2) + "\n")
        stream = score_stream(items, infer, batch_size, keep_maps=output.save_maps or output.overlays,
                              keep_images=output.overlays,
                              skip=output.done, stop=stop.requested)
        with tqdm(desc="scoring", unit="item", disable=not progress, file=sys.stderr) as bar:
            for batch in stream:
                output.write(batch)
                for r in batch:
                    if r.error is None:
                        report.scored += 1
                    else:
                        report.failed += 1
                        report.errors.append(r.error)
                        if progress:
                            tqdm.write(f"error: {r.error}", file=sys.stderr)
                bar.update(len(batch))
        report.interrupted = stop.signum
        if report.interrupted is None:
            from iqe.runtime.volumes import write_series_outputs

            report.lines = write_series_outputs(inputs, output, volumes=volumes)
    return report
