"""Clocks and latency summaries.

A call is timed with `time.perf_counter` on CPU. On a CUDA device the clock is a pair of
CUDA events recorded around the call and read after `torch.cuda.synchronize()`, so
queued GPU work is never mistaken for finished work. Warm-up calls are run and thrown
away before the first timed call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Self

import numpy as np
from tqdm import tqdm

PERCENTILES = (50, 90, 95, 99)


def summarize(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """n, mean, std, min, p50/p90/p95/p99, max of latencies in ms (linear-interpolated percentiles)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    out: dict[str, float | int] = {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                                   "min": float(a.min())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(a, p))
    out["max"] = float(a.max())
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


class Clock:
    """Times one call: CUDA events when `cuda` is true, else perf_counter.

    Use as `with clock: fn()`, then read `clock.ms`.
    """

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.ms = math.nan
        if cuda:
            import torch

            self._torch = torch
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    @property
    def kind(self) -> str:
        return "cuda_events" if self.cuda else "perf_counter"

    def __enter__(self) -> Self:
        if self.cuda:
            self._torch.cuda.synchronize()
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            self._torch.cuda.synchronize()
            self.ms = float(self._start.elapsed_time(self._end))
        else:
            self.ms = (time.perf_counter() - self._t0) * 1e3


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, min_time_s: float = 0.0, max_iters: int = 10_000,
               cuda: bool = False, desc: str = "", progress: bool = False) -> tuple[list[float], Any]:
    """Call `fn` `warmup` times untimed, then at least `iters` times timed.

    Timing continues past `iters` until `min_time_s` of timed calls have accumulated
    (capped at `max_iters`), so fast configurations get enough samples for p99 while slow
    ones stop at `iters`.

    Returns:
        (latencies in ms, the last call's return value).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    out = None
    bar = tqdm(total=warmup + iters, desc=desc, unit="call", leave=False, disable=not progress)
    for _ in range(warmup):
        out = fn()
        bar.update(1)
    clock = Clock(cuda)
    samples: list[float] = []
    while len(samples) < iters or (sum(samples) < min_time_s * 1e3 and len(samples) < max_iters):
        with clock:
            out = fn()
        samples.append(clock.ms)
        if len(samples) <= iters:
            bar.update(1)
    bar.close()
    return samples, out
